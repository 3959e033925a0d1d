"""What `awq-edge quantize` is asked to do, checked before torch loads: a wrong option, a missing
model or an existing output is one line at once, not after seconds of imports."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .packing import GROUP_SIZES

# Where a calibration sequence or an evaluation window starts: plain (mid-text) or deployed (as a
# deployed prompt does: evaluate.window_prefix)
PROTOCOLS = ("plain", "deployed")


@dataclass
class QuantizeSettings:
    method: str = "awq"  # awq | rtn
    group_size: int = 128
    calib_samples: int = 64
    calib_seqlen: int = 512
    calib_seed: int = 0  # shuffles the calibration texts: another seed, another sample of them
    loss_samples: int = 16  # sequences whose outputs the scale-search loss compares
    scale_grid: int = 20  # alpha = i / scale_grid, i = 0 .. scale_grid-1
    # refine: coarse_to_fine over that grid (~13 of its 20 losses; finds the same alpha when the
    # loss is unimodal in alpha, docs/quantizer.md session 20) | full: every alpha
    scale_search: str = "refine"
    duo_scaling: bool = False  # s = x_mean^a / w_mean^(1-a) (AutoAWQ) instead of x_mean^a (paper)
    clip_grid: int = 20  # clip ratios from 1.0 down to 1 - clip_max_shrink
    clip_max_shrink: float = 0.5
    clip_tokens: int = 512  # tokens the clip search compares on
    rounding: str = "gptq"  # gptq: see gptq_round | nearest: round-to-nearest, as the AWQ reference
    gptq_damp: float = 1.0  # gptq_round's damping, a fraction of the mean diagonal of H
    # linears whose H sums over every calibration token, not the loss tokens (docs/quantizer.md)
    gptq_all_tokens: tuple = ("down_proj",)
    # linears whose H sums over the strided token sample of all sequences (the per-token linears'
    # loss tokens) instead of their captured whole sequences: v_proj is the one it changes
    gptq_strided: tuple = ()
    # after the rounding, each (row, group)'s scale refit to its levels by least squares under H
    # (refit_scales): none | full (H) | diag (H's diagonal only); refit_damp as gptq_damp. Only with
    # rounding gptq, the linears that have an H (not q/k) and are named in refit_linears
    scale_refit: str = "none"
    refit_damp: float = 1.0
    refit_linears: tuple = ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # after the rounding, SignRound (Cheng et al. 2023) on each whole block: every linear's levels
    # (within +-0.5 of the value they were rounded from) tuned together by signed gradient descent on
    # the MSE of the block's output, float inputs in, float outputs as targets (tune_block_outputs;
    # the grid, scales and zeros, is kept). 0 steps: off. docs/quantizer.md session 18
    block_tune_steps: int = 20
    block_tune_batch: int = 2  # sequences per step
    block_tune_lr: float = 0.25  # x 1 / steps: how far a level's value may travel in all (x 0.5)
    batch_size: int = 8  # sequences per forward
    device: str = "cpu"
    # plain: calibration sequences start mid-text (the AWQ reference); deployed: each starts as a
    # deployed prompt does (evaluate.deployed_prefix: the BOS where the tokenizer or chat template
    # adds one), counted everywhere: every later token reads the sink through attention, so its
    # activations must be in the statistics, H and the losses (leaving them out measured worse
    # than RTN, docs/quantizer.md session 17)
    calib_protocol: str = "plain"

    def validate(self) -> None:
        if self.method not in ("awq", "rtn"):
            raise UserError(f"--method {self.method} is unknown; use awq or rtn")
        if self.rounding not in ("nearest", "gptq"):
            raise UserError(f"--rounding {self.rounding} is unknown; use nearest or gptq")
        if self.scale_search not in ("refine", "full"):
            raise UserError(f"--scale-search {self.scale_search} is unknown; use refine or full")
        if self.scale_refit not in ("none", "full", "diag"):
            raise UserError(f"--scale-refit {self.scale_refit} is unknown; use none, full or diag")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"--group-size {self.group_size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
        if self.calib_protocol not in PROTOCOLS:
            raise UserError(f"--calib-protocol {self.calib_protocol} is unknown; use {', '.join(PROTOCOLS)}")
        if self.block_tune_steps < 0 or self.block_tune_batch < 1:
            raise UserError("--tune-steps must be >= 0 (0: no block tuning)")
        if self.calib_samples < 1 or self.calib_seqlen < 16:
            raise UserError("--calib-samples must be >= 1 and --calib-seqlen >= 16")


def check_request(source: str, output, settings: QuantizeSettings, checkpoint_format: str = "awq",
                  force: bool = False):
    """The checks before loading: settings, format, output, a float model of a family we export, and
    (compressed-tensors) no short last group. Returns (model dir, its config, family)."""
    from .checkpoint import CHECKPOINT_FORMATS
    from .ct_checkpoint import check_group_fits
    from .export.spec import all_linear_shapes, model_spec
    from .model import check_causal_lm, is_quantized_checkpoint, read_config, resolve_source

    settings.validate()
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UserError(f"--format {checkpoint_format} is unknown; use {' or '.join(CHECKPOINT_FORMATS)}")
    if Path(output).exists() and not force:
        raise UserError(f"output {output} already exists; choose another path or pass --force to replace it")
    model_dir = resolve_source(source)
    config = read_config(model_dir)
    family = check_causal_lm(config, str(model_dir))
    spec = model_spec(config, str(model_dir / "config.json"), "re-download the model")  # exportable: checked now
    if is_quantized_checkpoint(config):
        raise UserError(f"{source} is already a quantized checkpoint; give the float model to quantize")
    if spec.moe_layers:
        settings.group_size = expert_group_size(spec, settings.group_size)
    if checkpoint_format == "compressed-tensors":
        check_group_fits({name: shape[1] for name, shape in all_linear_shapes(spec).items()}, settings.group_size)
    return model_dir, config, family


def expert_group_size(spec, group_size: int) -> int:
    """The group size for a mixture of experts: ONNX Runtime's QMoE and the native decode's moe op hold its
    experts only where the group divides hidden and the expert width (gpt-oss's 2880: 64, not 128), else
    every expert runs on every token; the largest that does, at most the one asked for (a note says so)."""
    fitting = [g for g in (128, 64, 32) if g <= group_size and spec.hidden % g == 0 and spec.expert_width % g == 0]
    if not fitting or fitting[0] == group_size:
        return group_size
    print(f"note: group size {fitting[0]}, not {group_size}: {spec.model_type}'s experts ({spec.hidden} x "
          f"{spec.expert_width}) run as one ONNX Runtime QMoE node only where the group divides both", file=sys.stderr)
    return fitting[0]
