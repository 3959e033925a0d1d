"""compressed-tensors checkpoints (llm-compressor's format for AWQ/GPTQ W4A16 models).

What we read and write (docs/formats.md has the whole layout; packing.py the tensors):
    config.json   quantization_config = {quant_method: "compressed-tensors", format: "pack-quantized",
                  quantization_status: "compressed", config_groups: {NAME: {targets, weights:
                  {num_bits: 4, type: int, strategy: group, group_size, symmetric, ...}}}, ignore, ...}
    *.safetensors per quantized linear `<prefix>.weight_packed/.weight_scale/.weight_shape`
                  (+ `.weight_zero_point` when asymmetric, + `.bias`); everything else float
                  (fp16, bf16 or fp32).

Only W4A16 int4 with the group strategy at group 32, 64 or 128 is read; every other feature of
the format (other bit widths, float weights, channel/tensor/block strategies, actorder with
g_idx, activation or KV-cache quantization, sparsity, transforms, a decoder linear left float
by `ignore`) is refused in one line that names it. Reading needs numpy only (no torch, no
compressed-tensors): bf16, which numpy lacks, is read by our own safetensors reader.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import packing
from .checkpoint import (FLOAT_LINEARS, METADATA_FILE, STORED_LINEARS, Checkpoint, LinearInfo, Linears,
                         QuantizedLinear, StoredTensors, _fp16_scales, language_model_view, settle_tie)
from .errors import UserError
from .untrusted import read_json

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
SUPPORTED = "W4A16: int4 'pack-quantized' weights, strategy 'group', group size 32, 64 or 128"
# Preset schemes a config group may name instead of spelling out (group name -> weights).
PRESETS = {
    "W4A16": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True},
    "W4A16_ASYM": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": False},
}
# Tensors of a quantized linear besides weight_packed; anything else of this kind is refused.
LINEAR_PARTS = ("weight_scale", "weight_shape", "weight_zero_point")
QUANT_TENSOR_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
                         "weight_global_scale", "input_scale", "input_zero_point", "input_global_scale",
                         "output_scale", "output_zero_point", "k_scale", "v_scale")


def is_ct_config(config: dict) -> bool:
    qc = config.get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def is_ct_dir(path: Path) -> bool:
    """A directory whose config.json says compressed-tensors (anything unreadable: False)."""
    try:
        return is_ct_config(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- writing

def quantization_config(group_size: int) -> dict:
    """What `awq-edge quantize --format compressed-tensors` writes: one asymmetric W4A16 group
    over every Linear but lm_head (the only Linear a supported family keeps float)."""
    weights = {"num_bits": packing.BITS, "type": "int", "symmetric": False, "strategy": "group",
               "group_size": group_size, "dynamic": False}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": FORMAT}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
            "sparsity_config": {}, "transform_config": {}}


def check_group_fits(in_features: dict[str, int], group_size: int) -> None:
    """compressed-tensors has no short last group: refuse a layer whose inputs group_size does not divide."""
    for name, k in in_features.items():
        if k % group_size:
            fits = [g for g in packing.GROUP_SIZES if all(n % g == 0 for n in in_features.values())]
            hint = f"use --group-size {' or '.join(map(str, fits))}" if fits else "no group size fits"
            raise UserError(f"{name} has {k} inputs, not a multiple of group size {group_size}, and "
                            f"compressed-tensors has no short last group; {hint}, or --format awq")


def linear_tensors(prefix: str, lin: QuantizedLinear) -> dict[str, np.ndarray]:
    check_group_fits({prefix: lin.shape[1]}, lin.group_size)
    return packing.to_compressed_tensors(lin.q, lin.scales, lin.zeros, lin.group_size)


# ---------------------------------------------------------------- the quantization_config

def _unsupported(where, what: str) -> UserError:
    return UserError(f"{where}: compressed-tensors {what} is not supported; awq-edge reads {SUPPORTED}")


def _weight_args(weights, where, group: str) -> tuple[int, bool]:
    """(group_size, symmetric) of one config group's `weights`, or a UserError naming what is unsupported."""
    if not isinstance(weights, dict):
        raise _unsupported(where, f"config group {group} without weight quantization")
    kind = str(weights.get("type", "int")).lower()
    if kind != "int":
        raise _unsupported(where, f"{kind} weights (config group {group})")
    bits = weights.get("num_bits", 8)  # the format's default
    if bits != packing.BITS:
        raise _unsupported(where, f"num_bits {bits} (config group {group})")
    group_size = weights.get("group_size")
    strategy = weights.get("strategy") or ("group" if isinstance(group_size, int) and group_size > 0
                                           else "channel" if group_size == -1 else "tensor")
    if str(strategy).lower() != "group":
        raise _unsupported(where, f"strategy {strategy!r} (config group {group})")
    if type(group_size) is not int or group_size not in packing.GROUP_SIZES:
        raise _unsupported(where, f"group_size {group_size!r} (config group {group})")
    actorder = weights.get("actorder")
    if actorder not in (None, False, "weight", "static"):  # "weight" only reorders calibration
        raise _unsupported(where, f"actorder {actorder!r} with g_idx (config group {group})")
    if weights.get("dynamic") not in (None, False):
        raise _unsupported(where, f"dynamic weight quantization (config group {group})")
    if weights.get("block_structure") is not None:
        raise _unsupported(where, f"block_structure (config group {group})")
    if weights.get("scale_dtype") not in (None, "torch.float16", "torch.bfloat16", "torch.float32"):
        raise _unsupported(where, f"scale_dtype {weights.get('scale_dtype')!r} (config group {group})")
    if weights.get("zp_dtype") not in (None, "torch.int8"):
        raise _unsupported(where, f"zp_dtype {weights.get('zp_dtype')!r} (config group {group})")
    symmetric = weights.get("symmetric", True)
    if not isinstance(symmetric, bool):
        raise UserError(f"{where}: config group {group} has symmetric={symmetric!r}, not true or false; "
                        "the checkpoint is malformed")
    return group_size, symmetric


def weight_scheme(qc: dict, where) -> tuple[int, bool]:
    """(group_size, symmetric) of a quantization_config we can read; UserError naming anything else."""
    if qc.get("format") != FORMAT:
        raise _unsupported(where, f"format {qc.get('format')!r}")
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise _unsupported(where, f"quantization_status {status!r} (weights not stored compressed)")
    if qc.get("kv_cache_scheme"):
        raise _unsupported(where, "KV-cache quantization (kv_cache_scheme)")
    if qc.get("moe_sparsity_config"):
        raise _unsupported(where, "MoE expert sparsity (moe_sparsity_config)")
    sparsity = qc.get("sparsity_config") or {}
    if not isinstance(sparsity, dict) or sparsity.get("format", "dense") != "dense":
        raise _unsupported(where, "sparsity (sparsity_config)")
    transform = qc.get("transform_config") or {}
    if not isinstance(transform, dict) or transform.get("config_groups"):
        raise _unsupported(where, "transforms (transform_config)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise UserError(f"{where}: quantization_config.config_groups is missing or empty; the checkpoint is malformed")
    schemes = set()
    for name, scheme in groups.items():
        if isinstance(scheme, list):  # a preset's name with its targets
            if name not in PRESETS:
                raise _unsupported(where, f"preset scheme {name!r}")
            scheme = {"weights": PRESETS[name]}
        if not isinstance(scheme, dict):
            raise UserError(f"{where}: config group {name} is not an object; the checkpoint is malformed")
        for key in ("input_activations", "output_activations"):
            if scheme.get(key):
                raise _unsupported(where, f"{key.replace('_', ' ')} quantization (config group {name})")
        if scheme.get("format") not in (None, FORMAT):
            raise _unsupported(where, f"format {scheme.get('format')!r} (config group {name})")
        schemes.add(_weight_args(scheme.get("weights"), where, name))
    if len(schemes) > 1:
        raise _unsupported(where, "config groups with different weight schemes "
                                  f"({', '.join(f'group {g} symmetric={s}' for g, s in sorted(schemes))})")
    return schemes.pop()


# ---------------------------------------------------------------- reading

def read_ct_checkpoint(path: str | Path) -> Checkpoint:
    """Read a compressed-tensors W4A16 pack-quantized checkpoint into our unpacked INT4 arrays."""
    path = Path(path)
    fix = "quantize the model again"
    wrapper = read_json(path / "config.json", fix)
    group_size, symmetric = weight_scheme(wrapper["quantization_config"], path)
    config, rename = language_model_view(wrapper)
    stored = StoredTensors(path, rename)
    packed = sorted(name for name in stored if name.endswith(".weight_packed"))  # (the levels: read when asked for)
    raw = stored.read([name for name in stored if not name.endswith(".weight_packed")])
    linears = Linears()
    for key in packed:
        prefix = key[: -len(".weight_packed")]
        if prefix.rsplit(".", 1)[-1] not in STORED_LINEARS + FLOAT_LINEARS:
            raise UserError(f"{path}: {prefix} is quantized, but awq-edge keeps it float (it quantizes only "
                            f"{', '.join(STORED_LINEARS)}); quantize with {prefix} in the `ignore` list")
        if prefix + ".weight_g_idx" in raw:
            raise _unsupported(path, f"actorder with g_idx ({prefix}.weight_g_idx)")
        parts = {part: raw.pop(f"{prefix}.{part}", None) for part in LINEAR_PARTS}
        for part in ("weight_scale", "weight_shape") + (() if symmetric else ("weight_zero_point",)):
            if parts[part] is None:
                raise UserError(f"{path}: {prefix} lacks {part}; the checkpoint is incomplete")
        if symmetric and parts["weight_zero_point"] is not None:
            raise UserError(f"{path}: {prefix} has a weight_zero_point but its scheme is symmetric; "
                            "the checkpoint is malformed")
        args = (parts["weight_scale"], parts["weight_zero_point"], parts["weight_shape"], group_size)
        try:
            out_features, in_features = packing.check_compressed_tensors(stored.entry(key), *args)
        except ValueError as e:
            raise UserError(f"{path}: {prefix}: {e}; the checkpoint is malformed") from None
        scales, bias = _fp16_scales(parts["weight_scale"], f"{path}: {prefix}"), raw.pop(prefix + ".bias", None)

        def read_linear(key=key, args=args, scales=scales, bias=bias) -> QuantizedLinear:
            q, _, zeros = packing.from_compressed_tensors(stored.read([key])[key], *args)
            return QuantizedLinear(q, scales, zeros, group_size, bias)
        linears.add(prefix, LinearInfo((out_features, in_features), group_size,
                                       None if bias is None else len(bias), False), read_linear)
    if not linears:
        raise UserError(f"{path} holds no quantized linears (*.weight_packed); the checkpoint is incomplete")
    for name in raw:
        owner, _, leaf = name.rpartition(".")
        if leaf in QUANT_TENSOR_SUFFIXES:
            raise UserError(f"{path}: unexpected tensor {name} (a W4A16 linear has only weight_packed, "
                            "weight_scale, weight_shape and weight_zero_point); the checkpoint uses another "
                            "scheme or is malformed")
        if leaf == "weight" and owner.rsplit(".", 1)[-1] in STORED_LINEARS and owner not in linears:
            raise UserError(f"{path}: {owner} is stored float (the compressed-tensors `ignore` list or targets "
                            "leave it out), but awq-edge needs every decoder linear in 4 bits")
    settle_tie(config, wrapper, raw)
    meta_file = path / METADATA_FILE
    metadata = read_json(meta_file, fix) if meta_file.is_file() else {}
    return Checkpoint(config, group_size, linears, raw, metadata)
