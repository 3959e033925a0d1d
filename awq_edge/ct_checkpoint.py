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
from .checkpoint import (METADATA_FILE, STORED_LINEARS, Checkpoint, QuantizedLinear, _weight_files,
                         language_model_view, settle_tie)
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


# ---------------------------------------------------------------- safetensors without torch

SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


def read_safetensors(path: Path, rename=lambda name: name) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as numpy; BF16 (which numpy lacks) as float32, exactly.
    rename: stored name -> the name to return it under, or None to leave it unread.

    The file is untrusted: every tensor's byte range and size are checked against the header
    and the file size before anything is read, and each tensor is read into its own array,
    so no more than the file holds is ever allocated.
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
                entries.append((ours, dtype, np_dtype, shape, begin))
        tensors = {}
        for name, dtype, np_dtype, shape, begin in entries:
            array = np.empty(shape, dtype=np_dtype)
            f.seek(data_start + begin)
            if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
                raise corrupt(f"tensor {name} ends past the end of the file")
            if dtype == "BF16":  # bf16 is the top half of an fp32
                array = (array.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = array
    return tensors


# ---------------------------------------------------------------- reading

def _fp16_scales(scales: np.ndarray, where: str) -> np.ndarray:
    """awq-edge computes with fp16 scales. fp16 and bf16 ones (bf16 down to 2**-17) convert
    exactly; fp32 ones are rounded to fp16, as vLLM's fp16 kernels do. Refused: what fp16
    cannot hold at all (inf, nan, > 65504, or a nonzero scale that would become 0)."""
    with np.errstate(over="ignore", invalid="ignore"):
        s16 = scales.astype(np.float16)
    if not np.all(np.isfinite(s16)) or np.any((s16 == 0) != (scales == 0)):
        raise UserError(f"{where}: weight_scale holds values fp16 cannot hold (inf, nan, beyond 65504 "
                        "or too small); awq-edge keeps scales in fp16")
    return s16


def read_ct_checkpoint(path: str | Path) -> Checkpoint:
    """Read a compressed-tensors W4A16 pack-quantized checkpoint into our unpacked INT4 arrays."""
    path = Path(path)
    fix = "quantize the model again"
    wrapper = read_json(path / "config.json", fix)
    group_size, symmetric = weight_scheme(wrapper["quantization_config"], path)
    config, rename = language_model_view(wrapper)
    raw: dict[str, np.ndarray] = {}
    for f in _weight_files(path):
        tensors = read_safetensors(f, rename)
        twice = sorted(raw.keys() & tensors.keys())
        if twice:
            raise UserError(f"{path}: tensor {twice[0]} is stored in more than one file; the checkpoint is malformed")
        raw.update(tensors)

    linears: dict[str, QuantizedLinear] = {}
    for key in sorted(k for k in raw if k.endswith(".weight_packed")):
        prefix = key[: -len(".weight_packed")]
        if prefix.rsplit(".", 1)[-1] not in STORED_LINEARS:
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
        try:
            q, scales, zeros = packing.from_compressed_tensors(raw.pop(key), parts["weight_scale"],
                                                               parts["weight_zero_point"], parts["weight_shape"],
                                                               group_size)
        except ValueError as e:
            raise UserError(f"{path}: {prefix}: {e}; the checkpoint is malformed") from None
        linears[prefix] = QuantizedLinear(q, _fp16_scales(scales, f"{path}: {prefix}"), zeros, group_size,
                                          raw.pop(prefix + ".bias", None))
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
