"""Quantized checkpoints on disk: AutoAWQ "gemm" (the default) or compressed-tensors, plus our metadata.

Directory layout (what `awq-edge quantize` writes, and what AutoAWQ writes too):
    config.json             the model config + quantization_config
                            {quant_method: awq, bits: 4, group_size, zero_point: true, version: gemm}
    model.safetensors       per quantized linear `<prefix>.qweight/.qzeros/.scales` (+ `.bias`),
                            every other tensor (embeddings, norms, lm_head) in fp16
    tokenizer files         tokenizer.json, tokenizer_config.json (with the chat template), ...
    awq_edge.json           ours: settings, calibration source, per-layer loss, timings

`--format compressed-tensors` writes llm-compressor's layout instead (ct_checkpoint.py), and
read_checkpoint reads either into the same Checkpoint. docs/formats.md describes both.

Reading needs numpy only (our own safetensors reader, no torch), so the exporter can use it on a
device; a quantized linear is read when an exporter asks for it (Linears), so a build holds one.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from . import packing
from .errors import UserError
from .families import FAMILIES, SUPPORTED_TYPES, family_for, find_family
from .untrusted import Fields, read_json

# (and an LFM2 short convolution's in_proj and out_proj; AFMoE's gate on the attention's output; Qwen3.5's delta
# nets' in_proj_qkv, in_proj_z, out_proj)
QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "in_proj", "out_proj",
                     "out_gate_proj", "in_proj_qkv", "in_proj_z")
# what a checkpoint may store quantized: those, or a family's fused ones (Phi-3's qkv_proj, gate_up_proj)
STORED_LINEARS = QUANTIZED_LINEARS + tuple(sorted({fused.rsplit(".", 1)[1] for family in FAMILIES.values()
                                                   for fused, _ in family.fused_linears}))
# linears the engines keep float that another tool's checkpoint may store quantized: LFM3's head gates, Qwen3.5's
# delta nets' b and a (one row a value head; float_gates dequantizes them at reading)
FLOAT_LINEARS = ("g_proj", "in_proj_b", "in_proj_a")
METADATA_FILE = "awq_edge.json"
GPTQ_ZERO_OFFSET = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> what its stored zeros lack
# a quantized linear's tensors in AutoAWQ's and GPTQ's layouts (the first three always there)
LINEAR_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx", ".bias")
CHECKPOINT_FORMATS = ("awq", "compressed-tensors")  # what `awq-edge quantize --format` writes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


# A vision-language checkpoint (Gemma 3 from 4B on, Mistral Small 3.1, Qwen2.5-VL, Qwen3-VL, SmolVLM,
# LLaVA, InternVL, Aya Vision) wraps a language model of a supported family: awq-edge reads that
# model alone and never the vision tower.
# transformers < 4.52 saved its weights as language_model.model.* and language_model.lm_head.*, later
# versions as model.language_model.* and lm_head.*; Qwen2-VL's and Qwen2.5-VL's hub checkpoints keep
# the language model's own names (model.layers.*, beside visual.*); SmolVLM's (Idefics3's) name it
# model.text_model.*.
LANGUAGE_MODEL_KEYS = (("language_model.model.", "model."), ("model.language_model.", "model."),
                       ("model.text_model.", "model."),
                       ("language_model.lm_head.", "lm_head."), ("lm_head.", "lm_head."),
                       *((f"model.{part}.", f"model.{part}.") for part in ("layers", "embed_tokens", "norm")))
# Text models that are, on text, a causal LM of another model_type: Qwen2-VL's and Qwen2.5-VL's
# are Qwen2's, Qwen3-VL's Qwen3's (their RoPE sections turn every text position as one RoPE does)
TEXT_MODEL_TYPES = {"qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2", "qwen3_vl_text": "qwen3"}
# Wrappers whose hub configs are flat (no text_config: the language model's keys at the top level)
FLAT_WRAPPERS = {"qwen2_vl": "qwen2_vl_text", "qwen2_5_vl": "qwen2_5_vl_text"}


def is_vision_language(config: dict) -> bool:
    return config.get("model_type") not in SUPPORTED_TYPES and (
        isinstance(config.get("text_config"), dict) or config.get("model_type") in FLAT_WRAPPERS)


def text_config(config: dict) -> dict:
    """A vision-language config's language model config as written: its text_config, or a flat
    one's own keys (all but vision_config), under the model_type of the causal LM it is on text."""
    wrapper_type = config.get("model_type")
    if wrapper_type in FLAT_WRAPPERS and not isinstance(config.get("text_config"), dict):
        text = {k: v for k, v in config.items() if k != "vision_config"}
        text["model_type"] = FLAT_WRAPPERS[wrapper_type]
    else:
        text = dict(config["text_config"])
    text_type = text.get("model_type")
    if isinstance(text_type, str) and text_type in TEXT_MODEL_TYPES:
        text["model_type"] = TEXT_MODEL_TYPES[text_type]
        for key in ("rope_scaling", "rope_parameters"):  # "mrope", as the causal LM names it on text (its RoPE)
            rope = text.get(key)
            if isinstance(rope, dict) and "mrope" in (rope.get("type"), rope.get("rope_type")):
                text[key] = {**{k: v for k, v in rope.items() if k != "type"}, "rope_type": "default"}
    return text


def language_model_key(stored: str) -> str | None:
    """A vision-language checkpoint's tensor name -> its language model's name (None: not of it)."""
    for prefix, ours in LANGUAGE_MODEL_KEYS:
        if stored.startswith(prefix):
            return ours + stored[len(prefix):]
    return None


def our_names(config: dict, ours: bool = True):
    """A stored tensor name -> ours (Family.our_name: EXAONE 3's GPT-2 names, Phi's dense and fc1, ...);
    ours False: -> transformers' (Family.transformers_name: what a transformers model of it loads);
    None for a tensor that holds no weights (Family.ignored_tensors)."""
    family = find_family(config.get("model_type"), config)
    if family is None or not (family.tensor_renames or family.module_renames or family.ignored_tensors):
        return lambda name: name
    rename = family.our_name if ours else family.transformers_name
    return lambda name: None if family.ignored(name) else rename(name)  # (GPT-NeoX's mask buffers: not read)


def language_model_view(config: dict, ours: bool = True):
    """(config, tensor-name map) of a quantized checkpoint: its own and its family's our_names; for a
    vision-language one, its language model's text_config (export.spec fills in the defaults
    transformers would, families.Family.config_defaults) with the wrapper's quantization_config,
    eos_token_id and tie_word_embeddings carried over, and language_model_key."""
    if not is_vision_language(config):
        return config, our_names(config, ours)
    text = {**text_config(config), "quantization_config": config.get("quantization_config")}
    for key in ("eos_token_id", "tie_word_embeddings"):  # the wrapper's decide, as in transformers
        if config.get(key) is not None:
            text[key] = config[key]
    rename = our_names(text, ours)
    return text, lambda name: None if (inner := language_model_key(name)) is None else rename(inner)


def settle_tie(config: dict, wrapper: dict, tensors: dict) -> None:
    """A vision-language wrapper that does not say whether its head is tied: tied where no lm_head is stored."""
    if is_vision_language(wrapper) and wrapper.get("tie_word_embeddings") is None:
        config["tie_word_embeddings"] = "lm_head.weight" not in tensors


@dataclass
class QuantizedLinear:
    q: np.ndarray  # uint8 [out, in]
    scales: np.ndarray  # fp16 [out, groups]
    zeros: np.ndarray  # uint8 [out, groups]
    group_size: int
    bias: np.ndarray | None = None
    # GPTQ act-order: column j of q is input order[j] (its groups contiguous, packing.from_gptq); the
    # engines gather x by it first. None: the natural order
    order: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        """w_hat [out, in] with the inputs in their natural order."""
        w = packing.dequantize(self.q, self.scales, self.zeros, self.group_size)
        if self.order is None:
            return w
        natural = np.empty_like(w)
        natural[:, self.order] = w
        return natural

    def rows(self, index) -> "QuantizedLinear":
        """These output rows alone (a slice or an index array), each with its own scales and zeros."""
        return QuantizedLinear(self.q[index], self.scales[index], self.zeros[index], self.group_size,
                               None if self.bias is None else self.bias[index], self.order)


def concat_linears(linears: list[QuantizedLinear]) -> QuantizedLinear:
    """Stack linears that read the same input (q, k, v) into one with N = sum of their N."""
    group_sizes = {lin.group_size for lin in linears}
    if len(group_sizes) != 1 or len({lin.q.shape[1] for lin in linears}) != 1:
        raise ValueError("only linears with the same K and group size can be fused")
    orders = [lin.order for lin in linears]
    if any(o is not None for o in orders) and not all(o is not None and np.array_equal(o, orders[0]) for o in orders):
        raise ValueError("only linears that read their inputs in one order (GPTQ act-order's) can be fused")
    biases = [lin.bias for lin in linears]
    bias = None
    if any(b is not None for b in biases):
        bias = np.concatenate([b if b is not None else np.zeros(lin.q.shape[0], np.float32)
                               for b, lin in zip(biases, linears)])
    return QuantizedLinear(np.concatenate([lin.q for lin in linears]),
                           np.concatenate([lin.scales for lin in linears]),
                           np.concatenate([lin.zeros for lin in linears]),
                           group_sizes.pop(), bias, orders[0])


@dataclass(frozen=True)
class LinearInfo:
    """What a linear is, known from its checkpoint's headers without reading its weights."""
    shape: tuple[int, int]  # [out, in]
    group_size: int
    bias: int | None  # the bias's length; None: no bias
    act_order: bool  # GPTQ act-order: its inputs read out of order

    @classmethod
    def of(cls, lin: QuantizedLinear) -> "LinearInfo":
        return cls(tuple(lin.q.shape), lin.group_size, None if lin.bias is None else len(lin.bias),
                   lin.order is not None)


class Linears(MutableMapping):
    """prefix -> QuantizedLinear, each read from the checkpoint's files when asked for, and not kept.

    The exporters pack a linear at a time, so a build holds one linear's unpacked levels, never a
    model's (a 7B's are 6.5 GB at a byte a level, more than an 8 GB board has to spare). `info`
    answers shape, group size, bias and act-order without reading; `transform` adds a step (rows
    reordered, scales multiplied) to a linear's reading. A linear set in (the quantizer's) is kept."""

    def __init__(self, linears: Mapping | None = None):
        self._read: dict[str, Callable[[], QuantizedLinear]] = {}
        self._info: dict[str, LinearInfo] = {}
        if isinstance(linears, Linears):
            self._read, self._info = dict(linears._read), dict(linears._info)
        else:
            self.update(linears or {})

    def add(self, name: str, info: LinearInfo, read: Callable[[], QuantizedLinear]) -> None:
        self._read[name], self._info[name] = read, info

    def info(self, name: str) -> LinearInfo:
        return self._info[name]

    def reader(self, name: str) -> Callable[[], QuantizedLinear]:
        return self._read[name]

    def transform(self, name: str, step: Callable[[QuantizedLinear], QuantizedLinear], rows: int | None = None):
        """name's linear read, then step applied; rows: how many rows step leaves (None: as many)."""
        read, info = self._read[name], self._info[name]
        self._read[name] = lambda: step(read())
        if rows is not None:
            self._info[name] = replace(info, shape=(rows, info.shape[1]), bias=None if info.bias is None else rows)

    def __getitem__(self, name: str) -> QuantizedLinear:
        return self._read[name]()

    def __setitem__(self, name: str, lin: QuantizedLinear) -> None:
        self.add(name, LinearInfo.of(lin), lambda: lin)

    def __delitem__(self, name: str) -> None:
        del self._read[name], self._info[name]

    def __iter__(self):
        return iter(self._read)

    def __len__(self) -> int:
        return len(self._read)


@dataclass
class Checkpoint:
    config: dict
    group_size: int
    linears: Linears  # "model.layers.0.self_attn.q_proj" -> weights, read on demand (a dict is wrapped)
    tensors: dict[str, np.ndarray]  # everything else, float
    metadata: dict

    def __post_init__(self):
        if not isinstance(self.linears, Linears):
            self.linears = Linears(self.linears)


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": packing.BITS, "group_size": group_size,
            "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


def split_fused(linears: Mapping[str, QuantizedLinear], spec, where: str) -> Linears:
    """The family's fused linears (Phi-3's qkv_proj, gate_up_proj; GPT-NeoX's by head) as their parts,
    by the rows the config gives each (export.spec.fused_part_rows); every other linear as it is."""
    from .export.spec import stored_fused

    out = Linears(linears)
    for fused, parts, rows in stored_fused(spec):
        for name in [n for n in out if n.endswith("." + fused)]:
            layer, info, read = name[: -len(fused)], out.info(name), out.reader(name)
            del out[name]
            if info.shape[0] != sum(map(len, rows)):
                raise UserError(f"{where}: {name} has {info.shape[0]} rows, its config.json implies "
                                f"{sum(map(len, rows))} ({' + '.join(str(len(r)) for r in rows)}); the checkpoint is "
                                "corrupt or of another model")
            for part, index in zip(parts, rows):  # (each part reads the fused linear and keeps its rows)
                out.add(layer + part, replace(info, shape=(len(index), info.shape[1]),
                                              bias=None if info.bias is None else len(index)),
                        lambda read=read, index=index: read().rows(index))
    return out


def fuse_linears(linears: dict, spec) -> dict:
    """The inverse of split_fused: the parts stacked again under the fused name, as the family's
    checkpoints and its transformers model hold them (the quantizer's Qwen3.5 q_proj is whole already).
    linears: QuantizedLinear values (concat_linears)."""
    from .export.spec import fused_rows_back, stored_fused

    out = dict(linears)
    for fused, parts, rows in stored_fused(spec):
        back = fused_rows_back(rows)
        for name in [n for n in out if n.endswith("." + parts[0])]:
            layer = name[: -len(parts[0])]
            if not all(layer + part in out for part in parts):
                continue
            stacked = concat_linears([out.pop(layer + part) for part in parts])
            out[layer + fused] = stacked if back is None else stacked.rows(back)
    return out


def fused_float(state: dict, spec) -> dict:
    """fuse_linears on float weights and biases (name -> torch tensor): the parts of each of the model's stored
    fused linears stacked under the fused name, as its transformers model holds them (a Mamba-2's in_proj, whose dt
    rows are float once read: float_gates)."""
    import torch

    from .export.spec import fused_rows_back, stored_fused

    out = dict(state)
    for fused, parts, rows in stored_fused(spec):
        back = fused_rows_back(rows)
        for name in [n for n in out if n.endswith(f".{parts[0]}.weight")]:
            layer = name[: -len(f"{parts[0]}.weight")]
            for kind in ("weight", "bias"):
                if all(f"{layer}{part}.{kind}" in out for part in parts):
                    stacked = torch.cat([out.pop(f"{layer}{part}.{kind}") for part in parts])
                    out[f"{layer}{fused}.{kind}"] = stacked if back is None else stacked[torch.from_numpy(back)]
    return out


def read_checked(path: str | Path):
    """(Checkpoint, export.spec.ModelSpec): a quantized checkpoint read, its fused linears split, and
    every tensor checked against its config."""
    from .export.spec import check_checkpoint_shapes, model_spec

    ckpt = read_checkpoint(path)
    spec = model_spec(ckpt.config, str(Path(path) / "config.json"))
    ckpt.linears = split_fused(ckpt.linears, spec, str(path))
    if spec.attention_gate or spec.delta:
        float_gates(ckpt, str(path))
    check_checkpoint_shapes({name: ckpt.linears.info(name) for name in ckpt.linears}, ckpt.tensors, spec, str(path))
    return ckpt, spec


def float_gates(ckpt: Checkpoint, where: str) -> None:
    """LFM3's head gates (self_attn.g_proj, [heads, hidden]) and Qwen3.5's b and a (linear_attn.in_proj_b,
    in_proj_a: [value heads, hidden]) are float in the engines; a checkpoint that stores them quantized
    (llm-compressor's W4A16 recipes quantize every Linear) has them dequantized here, as its float weight:
    what its quantized model computes."""
    for name in [n for n in ckpt.linears if n.endswith(tuple(f".{leaf}" for leaf in FLOAT_LINEARS))]:
        lin = ckpt.linears[name]
        if f"{name}.weight" in ckpt.tensors or lin.bias is not None:
            raise UserError(f"{where}: {name} is stored both quantized and float, or with a bias; the checkpoint "
                            "is malformed")
        ckpt.tensors[f"{name}.weight"] = lin.dequantize()
        del ckpt.linears[name]


def read_for_engine(path: str | Path):
    """read_checked in the engines' layout, what every exporter builds from: each q/k head's dimensions (rows
    of q_proj, k_proj and their biases, q_norm and k_norm) in the engines' rotary order
    (export.spec.rotary_order: partial or interleaved rotary), Granite's residual multiplier and logits
    scaling (Cohere's logit_scale) folded into the weights (o_proj's, down_proj's and a mixer's out_proj's
    scales and biases times it, in float32, or the post-norms' weights that follow them: HyperCLOVA X's; the
    final norm's weight and bias divided), the embedding cut to a pruned head's vocabulary (Apertus 1.5's), and a
    LayerNorm stored without a bias (Cohere's) given one of zeros, a norm without a weight (OLMo 1's,
    nanochat's) one of ones; nanochat's embedding norm as `model.embed_norm` (the final norm's copy)."""
    from .export.spec import block_norms, qk_norm_widths, rotary_order

    ckpt, spec = read_checked(path)
    if spec.embed_vocab:  # (Apertus 1.5's head pruned to the text ids: the rows past them are input only)
        ckpt.tensors["model.embed_tokens.weight"] = ckpt.tensors["model.embed_tokens.weight"][:spec.vocab]
    m, offset = spec.residual_multiplier, spec.family.norm_offset
    post_norms = tuple(f".{norm}.weight" for norm in spec.family.post_norms)
    if m != 1.0 and post_norms:  # (HyperCLOVA X's) a norm follows o_proj and down_proj: m goes into it
        for name in [n for n in ckpt.tensors if n.endswith(post_norms)]:
            ckpt.tensors[name] = (ckpt.tensors[name].astype(np.float32) + offset) * m - offset
    elif m != 1.0:
        def times_m(lin: QuantizedLinear) -> QuantizedLinear:
            return replace(lin, scales=lin.scales.astype(np.float32) * m,
                           bias=None if lin.bias is None else lin.bias.astype(np.float32) * m)
        # (each expert's down_proj; LFM2's and Granite 4.0-H's mixers' out_proj)
        for name in [n for n in ckpt.linears if n.endswith(("self_attn.o_proj", "down_proj", "out_proj"))]:
            ckpt.linears.transform(name, times_m)
    family = spec.family
    if not family.norm_weight:  # OLMo 1's and nanochat's norms: every engine multiplies by ones
        norms = [f"model.layers.{i}.{n}" for i in range(spec.layers) for n in block_norms(family)]
        for name in ["model.norm", *norms]:
            ckpt.tensors[name + ".weight"] = np.ones(spec.hidden, np.float32)
        for i in spec.attention_layers if family.qk_norm else ():
            for name, size in zip(family.qk_norms, qk_norm_widths(spec)):
                ckpt.tensors[f"model.layers.{i}.{name}.weight"] = np.ones(size, np.float32)
    if family.norm == "layer" and not family.norm_bias:  # Cohere's: every engine adds a bias of zeros
        for name in [n for n in ckpt.tensors if n.endswith("norm.weight")]:
            ckpt.tensors[name.removesuffix(".weight") + ".bias"] = np.zeros(spec.hidden, np.float32)
    if family.embed_norm:  # (nanochat's) the final norm as it is stored, before logits scaling goes into it
        for kind in ("weight", "bias"):
            if f"model.norm.{kind}" in ckpt.tensors:
                ckpt.tensors[f"model.embed_norm.{kind}"] = ckpt.tensors[f"model.norm.{kind}"].copy()
    if spec.logits_scaling != 1.0:  # the final norm feeds the head alone
        weight = ckpt.tensors["model.norm.weight"].astype(np.float32)
        ckpt.tensors["model.norm.weight"] = (weight + offset) / spec.logits_scaling - offset
        for name in ("model.norm.bias", "lm_head.bias"):  # (a LayerNorm's; Phi's head's)
            if name in ckpt.tensors:
                ckpt.tensors[name] = ckpt.tensors[name].astype(np.float32) / spec.logits_scaling
    order = rotary_order(spec.head_dim, spec.rotary_dim, family.rope_interleaved, family.rope_reversed)
    if np.array_equal(order, np.arange(spec.head_dim)):
        return ckpt, spec
    for proj, heads in (("q_proj", spec.heads), ("k_proj", spec.kv_heads)):
        rows = (np.arange(heads)[:, None] * spec.head_dim + order).ravel()
        for name in [n for n in ckpt.linears if n.endswith("self_attn." + proj)]:
            ckpt.linears.transform(name, lambda lin, rows=rows: lin.rows(rows), len(rows))
    for name in [n for n in ckpt.tensors if n.endswith(tuple(f"{norm}.weight" for norm in spec.family.qk_norms))]:
        # one head's weight, or every head's (OLMo 2's q/k norms over the whole projection)
        ckpt.tensors[name] = ckpt.tensors[name].reshape(-1, spec.head_dim)[:, order].ravel()
    return ckpt, spec


# ---------------------------------------------------------------- writing

def temp_dir_beside(output: Path, kind: str) -> Path:
    """A new temp dir next to OUTPUT, `.{name}.{kind}-{pid}-XXXXXXXX`, for writing OUTPUT whole.

    First removes the temp dirs of OUTPUT that a process which no longer runs left behind
    (killed by SIGKILL, or a power loss): the pid in their name says whose they are."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{glob.escape(output.name)}.*-*-*"):
        owner = _TEMP_OWNER.fullmatch(stale.name[len(output.name) + 2:])
        if owner and not _process_alive(int(owner.group(1))):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.{kind}-{os.getpid()}-"))


_TEMP_OWNER = re.compile(r"(?:tmp|work|old)-(\d{1,10})-\w+")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process, or not a pid we can ask about: leave it
    return True


def output_staging(output: Path, force: bool) -> Path:
    """Refuse an existing output unless forced; return a temp dir beside it to write into."""
    if output.exists() and not force:
        raise UserError(f"output {output} already exists; choose another path or pass --force to replace it")
    return temp_dir_beside(output, "tmp")


def commit_staging(staging: Path, output: Path) -> None:
    """Move a finished staging dir into place; an old output is only removed once the new one is whole."""
    trash = None
    if output.exists():
        trash = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.old-{os.getpid()}-"))
        output.rename(trash / output.name)
    staging.chmod(0o755)  # mkdtemp makes it private; a checkpoint is ordinary data
    for f in staging.iterdir():
        f.chmod(0o644)
    staging.rename(output)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def write_checkpoint(staging: Path, config: dict, linears: dict[str, QuantizedLinear],
                     tensors: dict[str, np.ndarray], metadata: dict, tokenizer_dir: Path | None,
                     checkpoint_format: str = "awq") -> None:
    """Write a checkpoint in CHECKPOINT_FORMATS into staging (see output_staging)."""
    from safetensors.numpy import save_file

    from . import ct_checkpoint

    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise UserError(f"--format {checkpoint_format} is unknown; use {' or '.join(CHECKPOINT_FORMATS)}")
    from .export.spec import model_spec

    family = family_for(str(config.get("model_type")), config)
    linears = fuse_linears(linears, model_spec(config))  # as the family stores them
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():  # (ascontiguousarray makes a 0-d array 1-d: Apertus's xIELU beta, eps are 0-d)
        out[name] = np.ascontiguousarray(t.astype(np.float16)).reshape(t.shape)
    group_size = None
    for prefix, lin in linears.items():
        if lin.order is not None:  # (the quantizer writes none; a GPTQ act-order linear is only read)
            raise ValueError(f"{prefix} reads its inputs out of order (GPTQ act-order), which this layout cannot store")
        group_size = lin.group_size
        if checkpoint_format == "awq":
            packed = packing.to_awq_gemm(lin.q, lin.scales, lin.zeros, lin.group_size)
        else:
            packed = ct_checkpoint.linear_tensors(prefix, lin)
        for key, value in packed.items():
            out[f"{prefix}.{key}"] = value
        if lin.bias is not None:
            out[f"{prefix}.bias"] = lin.bias.astype(np.float16)
    out = {family.their_name(name): t for name, t in out.items()}  # under the names transformers loads
    save_file(out, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config = dict(config)
    config["quantization_config"] = (quantization_config(group_size) if checkpoint_format == "awq"
                                     else ct_checkpoint.quantization_config(group_size))
    config["torch_dtype"] = "float16"
    config.pop("dtype", None)
    (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, staging)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


# ---------------------------------------------------------------- reading

def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} has no *.safetensors files; it is not an AWQ checkpoint")
    return files


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Read ours, an AutoAWQ GEMM or a compressed-tensors checkpoint into numpy arrays (unpacked INT4).

    A checkpoint is untrusted input: the quantization config is typed and bounded, every
    quantized linear's tensors must have AutoAWQ's dtypes and agree in shape, and the group
    size must be one the grouping supports. (Shapes against the model config: export.spec.)"""
    from . import ct_checkpoint

    if ct_checkpoint.is_ct_dir(Path(path)):  # llm-compressor's format has its own reader
        return ct_checkpoint.read_ct_checkpoint(path)
    path = Path(path)
    fix = "quantize the model again with `awq-edge quantize`"
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no readable config.json; give an AWQ checkpoint directory")
    config = read_json(path / "config.json", fix)
    qc_raw = config.get("quantization_config")
    method = qc_raw.get("quant_method") if isinstance(qc_raw, dict) else None
    if method not in ("awq", "gptq"):
        raise UserError(f"{path} is not an AWQ or GPTQ checkpoint (no quantization_config.quant_method awq or "
                        "gptq); quantize it first with `awq-edge quantize`")
    qc = Fields(qc_raw, f"{path / 'config.json'} quantization_config", fix)
    bits = qc.int("bits", 1, 64, default=4)
    if method == "awq":
        version, zero_point = qc.str("version", default="gemm"), qc.bool("zero_point", default=True)
        if version.lower() != "gemm" or bits != 4 or not zero_point:
            raise UserError(f"{path} uses AWQ {version} {bits}-bit{'' if zero_point else ' without zero points'}; "
                            "only the 4-bit zero-point 'gemm' layout is supported")
        group_hint = qc.int("group_size", 1, 1 << 20, default=128)
        zero_offset = None
    else:
        layout = qc.str("checkpoint_format", default="gptq")
        if bits != 4 or layout not in GPTQ_ZERO_OFFSET:
            raise UserError(f"{path} is GPTQ {bits}-bit in the {layout!r} layout; only 4-bit 'gptq' and 'gptq_v2' "
                            "are supported")
        group_hint = qc.int("group_size", -1, 1 << 20, default=128)
        if group_hint < 1:
            raise UserError(f"{path} is GPTQ with group_size {group_hint} (one group per row), which awq-edge's "
                            "kernels do not run; take a checkpoint of group size 32, 64 or 128")
        zero_offset = GPTQ_ZERO_OFFSET[layout]
    wrapper, (config, rename) = config, language_model_view(config)
    stored = StoredTensors(path, rename)
    prefixes = [name.removesuffix(".qweight") for name in stored if name.endswith(".qweight")]
    of_linears = {prefix + part for prefix in prefixes for part in LINEAR_PARTS}
    raw = stored.read([name for name in stored if name not in of_linears])
    settle_tie(config, wrapper, raw)
    linears = Linears()  # (only their headers now: each is read when an exporter asks for it)
    for prefix in prefixes:
        missing = next((prefix + part for part in LINEAR_PARTS[:3] if prefix + part not in stored), None)
        if missing:
            raise UserError(f"{path}: {prefix} lacks '{missing}'; the checkpoint is incomplete")
        if method == "awq":
            linears.add(prefix, *_awq_linear(prefix, stored, group_hint, path))
        else:
            linears.add(prefix, *_gptq_linear(prefix, stored, group_hint, zero_offset, path))
    if not linears:
        raise UserError(f"{path} holds no quantized linears (*.qweight); the checkpoint is incomplete")
    meta_file = path / METADATA_FILE
    metadata = read_json(meta_file, fix) if meta_file.is_file() else {}
    return Checkpoint(config, group_hint, linears, raw, metadata)


# ---------------------------------------------------------------- safetensors without torch

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class StoredEntry(NamedTuple):
    """One tensor of a .safetensors file as its (checked) header gives it."""
    name: str  # ours (rename's)
    stored_dtype: str  # "BF16", ...
    dtype: np.dtype  # as read_entries returns it (BF16, which numpy lacks, as float32)
    shape: tuple
    begin: int  # its bytes' offset from the data's start


def safetensors_entries(path: Path, rename=lambda name: name) -> tuple[list[StoredEntry], int]:
    """(the tensors of a .safetensors file that rename names, where its data starts), from the header.

    The file is untrusted: every tensor's byte range and size are checked against the header
    and the file size, so no more than the file holds is ever allocated by read_entries.
    """
    def corrupt(why: str) -> UserError:
        return UserError(f"could not read {path}: {why}; the file is truncated or corrupt")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, MAX_HEADER_BYTES):
            raise corrupt("bad header length")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise corrupt("the header is not JSON") from None
    if not isinstance(header, dict):
        raise corrupt("the header is not a JSON object")
    data_start, data_size = 8 + n, size - 8 - n
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise corrupt(f"tensor {name} has no dtype/shape/data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise UserError(f"{path}: tensor {name} is {dtype}, which awq-edge cannot read "
                            f"(it reads {', '.join(SAFETENSORS_DTYPES)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
                and type(begin) is int and type(end) is int and 0 <= begin <= end <= data_size):
            raise corrupt(f"tensor {name} has a bad shape or byte range")
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        if int(np.prod(shape, dtype=object)) * np_dtype.itemsize != end - begin:
            raise corrupt(f"tensor {name}: shape {shape} of {dtype} does not fill its {end - begin} bytes")
        if (ours := rename(name)) is not None:
            read_as = np.dtype(np.float32) if dtype == "BF16" else np_dtype
            entries.append(StoredEntry(ours, dtype, read_as, tuple(shape), begin))
    return entries, data_start


def read_entries(path: Path, entries: list[StoredEntry], data_start: int) -> dict[str, np.ndarray]:
    """These tensors of a .safetensors file (safetensors_entries'), by our name; BF16 (which numpy
    lacks) as float32, exactly. Each is read into its own array."""
    tensors = {}
    with open(path, "rb") as f:
        for entry in entries:
            array = np.empty(entry.shape, dtype=SAFETENSORS_DTYPES[entry.stored_dtype])
            f.seek(data_start + entry.begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
                raise UserError(f"could not read {path}: tensor {entry.name} ends past the end of the file; "
                                "the file is truncated or corrupt")
            if entry.stored_dtype == "BF16":  # bf16 is the top half of an fp32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            tensors[entry.name] = array
    return tensors


def read_safetensors(path: Path, rename=lambda name: name) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file (that rename names: stored name -> ours, or None to
    leave it unread) as numpy, checked as safetensors_entries does."""
    return read_entries(path, *safetensors_entries(path, rename))


class StoredTensors:
    """A checkpoint's *.safetensors files by their headers (safetensors_entries): every tensor's
    shape and dtype known, its data read when asked for. rename: stored name -> ours, or None for
    one never read (a vision tower's)."""

    def __init__(self, path: Path, rename=lambda name: name):
        self.where: dict[str, tuple[Path, StoredEntry, int]] = {}  # ours -> (file, entry, where its data starts)
        self.stamps: dict[Path, tuple[int, int]] = {}  # file -> (size, mtime) as indexed
        for f in _weight_files(path):
            self.stamps[f] = _stamp(f)
            entries, data_start = safetensors_entries(f, rename)
            for entry in entries:
                if entry.name in self.where:
                    raise UserError(f"{path}: tensor {entry.name} is stored in more than one file; the checkpoint "
                                    "is malformed")
                self.where[entry.name] = (f, entry, data_start)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def __iter__(self):
        return iter(self.where)

    def entry(self, name: str) -> StoredEntry:
        return self.where[name][1]

    def read(self, names) -> dict[str, np.ndarray]:
        """These tensors, by our name (a file opened once for all of its)."""
        out = {}
        for f in dict.fromkeys(self.where[n][0] for n in names):
            if _stamp(f) != self.stamps[f]:  # (its header's offsets would read another file's bytes)
                raise UserError(f"{f} changed while it was being read; run the command again")
            here = [self.where[n] for n in names if self.where[n][0] == f]
            out.update(read_entries(f, [entry for _, entry, _ in here], here[0][2]))
        return out


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError as e:
        raise UserError(f"could not read {path}: {e.strerror}; the checkpoint changed while it was being "
                        "read") from None
    return stat.st_size, stat.st_mtime_ns


def _fp16_scales(scales: np.ndarray, where: str) -> np.ndarray:
    """awq-edge computes with fp16 scales. fp16 and bf16 ones (bf16 down to 2**-17) convert
    exactly; fp32 ones are rounded to fp16, as vLLM's fp16 kernels do. Refused: what fp16
    cannot hold at all (inf, nan, > 65504, or a nonzero scale that would become 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s16 = scales.astype(np.float16)
    if not np.all(np.isfinite(s16)) or np.any((s16 == 0) != (scales == 0)):
        raise UserError(f"{where}: its scales hold values fp16 cannot hold (inf, nan, beyond 65504 "
                        "or too small); awq-edge keeps scales in fp16")
    return s16


def _check_packed(bad, qweight, qzeros, scales) -> None:
    """What AutoAWQ's and GPTQ's linears share: int32 words, float scales, all 2-D."""
    if qweight.dtype != np.int32 or qzeros.dtype != np.int32 or scales.dtype not in (np.float16, np.float32):
        raise bad(f"has dtypes qweight {qweight.dtype}, qzeros {qzeros.dtype}, scales {scales.dtype} "
                  "(int32, int32, float16 expected)")
    if len(qweight.shape) != 2 or len(qzeros.shape) != 2 or len(scales.shape) != 2:
        raise bad("has tensors that are not 2-D")


def _check_bias(bad, bias, out_features: int) -> None:
    if bias is not None and (tuple(bias.shape) != (out_features,) or bias.dtype not in (np.float16, np.float32)):
        raise bad(f"has a bias of shape {list(bias.shape)} ({bias.dtype}), not [{out_features}] float")


def _linear_parts(prefix: str, stored: StoredTensors) -> dict:
    """A quantized linear's entries in LINEAR_PARTS' order (g_idx and bias None where absent)."""
    return {part: stored.entry(prefix + part) if prefix + part in stored else None for part in LINEAR_PARTS}


def _awq_linear(prefix: str, stored: StoredTensors, group_hint: int, path: Path):
    """(LinearInfo, read) of one AutoAWQ GEMM linear, its tensors' headers checked: qweight int32
    [in, out/8], qzeros int32 [groups, out/8], scales float [groups, out], bias [out]; groups =
    ceil(in / group size). read() reads and unpacks them."""
    def bad(what: str) -> UserError:
        return UserError(f"{path}: {prefix} {what}; the checkpoint is corrupt or not AutoAWQ GEMM")

    parts = _linear_parts(prefix, stored)
    qweight, qzeros, scales, bias = (parts[p] for p in (".qweight", ".qzeros", ".scales", ".bias"))
    _check_packed(bad, qweight, qzeros, scales)
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    if qzeros.shape[1] * 8 != out_features or scales.shape != (qzeros.shape[0], out_features) or in_features < 1:
        raise bad(f"has inconsistent shapes: qweight {list(qweight.shape)}, qzeros {list(qzeros.shape)}, "
                  f"scales {list(scales.shape)}")
    try:
        group_size = packing.infer_group_size(in_features, scales.shape[0], group_hint)
    except ValueError as e:
        raise bad(str(e)) from None
    _check_bias(bad, bias, out_features)

    def read() -> QuantizedLinear:
        tensors = stored.read([entry.name for entry in (qweight, qzeros, scales, bias) if entry is not None])
        q, s, zeros = packing.from_awq_gemm(tensors[qweight.name], tensors[qzeros.name], tensors[scales.name])
        return QuantizedLinear(q, _fp16_scales(s, f"{path}: {prefix}"), zeros, group_size,
                               tensors.get(prefix + ".bias"))
    return LinearInfo((out_features, in_features), group_size, None if bias is None else out_features, False), read


def _gptq_linear(prefix: str, stored: StoredTensors, group_hint: int, zero_offset: int, path: Path):
    """(LinearInfo, read) of one GPTQ linear, its tensors' headers checked: qweight int32 [in/8, out],
    qzeros int32 [groups, out/8], scales float [groups, out], g_idx int32 [in] (optional), bias
    [out]; g_idx and the zeros (small) read and checked here too. read() reads and unpacks them."""
    def bad(what: str) -> UserError:
        return UserError(f"{path}: {prefix} {what}; the checkpoint is corrupt or not GPTQ")

    parts = _linear_parts(prefix, stored)
    qweight, qzeros, scales, bias = (parts[p] for p in (".qweight", ".qzeros", ".scales", ".bias"))
    _check_packed(bad, qweight, qzeros, scales)
    if min(qweight.shape) < 1:
        raise bad("has tensors that are not 2-D")
    g_idx = None if parts[".g_idx"] is None else stored.read([prefix + ".g_idx"])[prefix + ".g_idx"]
    if g_idx is not None and g_idx.dtype.kind not in "iu":
        raise bad(f"has a g_idx of {g_idx.dtype}, not integers")
    in_features, out_features = 8 * qweight.shape[0], qweight.shape[1]
    _check_bias(bad, bias, out_features)
    try:
        group_size = packing.infer_group_size(in_features, scales.shape[0], group_hint)
        packing.check_gptq_shapes(qweight.shape, qzeros.shape, scales.shape, group_size)
        order = packing.gptq_input_order(g_idx, in_features, group_size)
        packing.gptq_zeros(stored.read([qzeros.name])[qzeros.name], out_features, zero_offset)  # (a lost zero)
    except ValueError as e:
        raise bad(str(e)) from None

    def read() -> QuantizedLinear:
        tensors = stored.read([entry.name for entry in (qweight, qzeros, scales, bias) if entry is not None])
        try:
            q, s, zeros, _ = packing.from_gptq(tensors[qweight.name], tensors[qzeros.name], tensors[scales.name],
                                               g_idx, group_size, zero_offset)
        except ValueError as e:
            raise bad(str(e)) from None
        return QuantizedLinear(q, _fp16_scales(s, f"{path}: {prefix}"), zeros, group_size,
                               tensors.get(prefix + ".bias"), order)
    info = LinearInfo((out_features, in_features), group_size, None if bias is None else out_features,
                      order is not None)
    return info, read


def tagged_floats(value):
    """A config value with transformers' JSON tags for floats JSON lacks ({"__float__": "Infinity"}: Granite
    4's time_step_limit) read as those floats, as its from_pretrained does."""
    if isinstance(value, dict):
        if set(value) == {"__float__"} and value["__float__"] in ("Infinity", "-Infinity", "NaN"):
            return float(value["__float__"].replace("Infinity", "inf"))
        return {k: tagged_floats(v) for k, v in value.items()}
    return [tagged_floats(v) for v in value] if isinstance(value, list) else value


def experts_stacked(state: dict, spec, layers=None) -> dict:
    """A float state dict under our names with each layer's experts (mlp.experts.{j}.gate_proj, ...) as
    transformers 5 holds them: mlp.experts.gate_up_proj [E, 2 x width, hidden] (each expert's gate, then
    up) and mlp.experts.down_proj [E, hidden, width]; gpt-oss's (Family.experts_layout "interleaved")
    [E, hidden, 2 x width] with gate and up column by column and [E, width, hidden], and their biases.
    layers: the layers state holds (None: all)."""
    import torch

    interleaved = spec.family.experts_layout == "interleaved"
    for i in [i for i in spec.moe_layers if layers is None or i in layers]:
        p = f"model.layers.{i}.mlp.experts"
        tensor = {(j, n, kind): state.pop(f"{p}.{j}.{n}_proj.{kind}") for j in range(spec.experts)
                  for n in ("gate", "up", "down") for kind in ("weight", "bias") if f"{p}.{j}.{n}_proj.{kind}" in state}
        for kind in ("weight", "bias") if interleaved else ("weight",):
            if interleaved:  # (row r of the pair's stack: gate's r // 2 when r is even, else up's)
                gate_up = [torch.stack([tensor[j, "gate", kind], tensor[j, "up", kind]], 1).flatten(0, 1)
                           for j in range(spec.experts)]
                down = [tensor[j, "down", kind] for j in range(spec.experts)]
                if kind == "weight":
                    gate_up, down = [w.T for w in gate_up], [w.T for w in down]
            else:
                gate_up = [torch.cat([tensor[j, "gate", kind], tensor[j, "up", kind]]) for j in range(spec.experts)]
                down = [tensor[j, "down", kind] for j in range(spec.experts)]
            suffix = "" if kind == "weight" else "_bias"
            state[f"{p}.gate_up_proj{suffix}"] = torch.stack(gate_up)
            state[f"{p}.down_proj{suffix}"] = torch.stack(down)
    return state


def load_awq_as_float(path: Path, dtype=None):
    """The dequantized reference model (torch): every runtime must match this one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    ckpt, spec = read_checked(path)
    config_dict = {k: tagged_floats(v) for k, v in ckpt.config.items() if k != "quantization_config"}
    try:  # transformers validates the rest of the config in its own way
        config = AutoConfig.for_model(**config_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"transformers cannot build the model of {path / 'config.json'} ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:150]}); the config is corrupt") from None

    def layer_of(name: str):
        parts = name.split(".")
        return int(parts[2]) if name.startswith("model.layers.") and parts[2].isdigit() else None

    # A layer at a time (each linear dequantized as its layer loads, then dropped): the float model
    # and one layer's state in memory, not the model twice.
    names = {}
    for name in [*ckpt.tensors, *ckpt.linears]:
        names.setdefault(layer_of(name), []).append(name)
    loaded, unexpected = set(), []
    for layer, group in names.items():
        state = {name: torch.from_numpy(ckpt.tensors[name].astype(np.float32)) for name in group
                 if name in ckpt.tensors}
        weights = set()  # (the linears' weights, and the fused ones': GPT-2's Conv1D stores them transposed)
        for prefix in [name for name in group if name in ckpt.linears]:
            lin = ckpt.linears[prefix]
            state[prefix + ".weight"] = torch.from_numpy(lin.dequantize())
            weights.add(prefix + ".weight")
            if lin.bias is not None:
                state[prefix + ".bias"] = torch.from_numpy(lin.bias.astype(np.float32))
        before = set(state)
        state = fused_float(state, spec)  # transformers' modules (their_name below)
        weights |= {name for name in set(state) - before if name.endswith(".weight")}
        if spec.family.conv1d_linears:
            state = {name: t.T.contiguous() if name in weights else t for name, t in state.items()}
        state = {spec.family.their_name(name): t for name, t in experts_stacked(state, spec, {layer}).items()}
        try:
            _, extra = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shapes transformers derives from the config differently (a default it fills in)
            raise UserError(f"{path} does not match the model transformers builds from its config.json "
                            f"({(str(e).strip().splitlines() or [''])[-1].strip()[:150]}); the config is "
                            "corrupt") from None
        loaded |= state.keys() - set(extra)
        unexpected += extra
    missing = [m for m in model.state_dict() if m not in loaded and not (m == "lm_head.weight"
                                                                          and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path} does not match its config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the checkpoint is incomplete")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype or torch.float32)
