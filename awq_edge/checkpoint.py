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

Reading needs numpy and safetensors only (no torch), so the exporter can use it on a device.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import packing
from .errors import UserError

QUANTIZED_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METADATA_FILE = "awq_edge.json"
CHECKPOINT_FORMATS = ("awq", "compressed-tensors")  # what `awq-edge quantize --format` writes
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt")


@dataclass
class QuantizedLinear:
    q: np.ndarray  # uint8 [out, in]
    scales: np.ndarray  # fp16 [out, groups]
    zeros: np.ndarray  # uint8 [out, groups]
    group_size: int
    bias: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    def dequantize(self) -> np.ndarray:
        return packing.dequantize(self.q, self.scales, self.zeros, self.group_size)


@dataclass
class Checkpoint:
    config: dict
    group_size: int
    linears: dict[str, QuantizedLinear]  # "model.layers.0.self_attn.q_proj" -> weights
    tensors: dict[str, np.ndarray]  # everything else, float
    metadata: dict


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": packing.BITS, "group_size": group_size,
            "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


# ---------------------------------------------------------------- writing

def output_staging(output: Path, force: bool) -> Path:
    """Refuse an existing output unless forced; return a temp dir beside it to write into."""
    if output.exists() and not force:
        raise UserError(f"output {output} already exists; choose another path or pass --force to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))


def commit_staging(staging: Path, output: Path) -> None:
    """Move a finished staging dir into place; an old output is only removed once the new one is whole."""
    trash = None
    if output.exists():
        trash = output.with_name(f".{output.name}.old-{staging.name[-8:]}")
        output.rename(trash)
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
    out: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        out[name] = np.ascontiguousarray(t.astype(np.float16))
    group_size = None
    for prefix, lin in linears.items():
        group_size = lin.group_size
        if checkpoint_format == "awq":
            packed = packing.to_awq_gemm(lin.q, lin.scales, lin.zeros, lin.group_size)
        else:
            packed = ct_checkpoint.linear_tensors(prefix, lin)
        for key, value in packed.items():
            out[f"{prefix}.{key}"] = value
        if lin.bias is not None:
            out[f"{prefix}.bias"] = lin.bias.astype(np.float16)
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


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (manifests record one per file)."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    """Read ours, an AutoAWQ GEMM or a compressed-tensors checkpoint into numpy arrays (unpacked INT4)."""
    from . import ct_checkpoint

    if ct_checkpoint.is_ct_dir(Path(path)):  # llm-compressor's format has its own reader
        return ct_checkpoint.read_ct_checkpoint(path)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} has no readable config.json; give an AWQ checkpoint directory") from None
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "awq":
        raise UserError(f"{path} is not an AWQ checkpoint (no quantization_config.quant_method=awq); "
                        "quantize it first with `awq-edge quantize`")
    if qc.get("version", "gemm").lower() != "gemm" or qc.get("bits", 4) != 4 or not qc.get("zero_point", True):
        raise UserError(f"{path} uses AWQ {qc.get('version')} {qc.get('bits')}-bit; "
                        "only the 4-bit zero-point 'gemm' layout is supported")
    raw: dict[str, np.ndarray] = {}
    for f in _weight_files(path):
        try:
            raw.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"could not read {f}: {e}; the file is truncated or corrupt") from None
    group_hint = int(qc.get("group_size", 128))
    linears: dict[str, QuantizedLinear] = {}
    for key in [k for k in raw if k.endswith(".qweight")]:
        prefix = key[: -len(".qweight")]
        try:
            q, scales, zeros = packing.from_awq_gemm(raw.pop(key), raw.pop(prefix + ".qzeros"), raw.pop(prefix + ".scales"))
        except KeyError as e:
            raise UserError(f"{path}: {prefix} lacks {e}; the checkpoint is incomplete") from None
        group_size = packing.infer_group_size(q.shape[1], scales.shape[1], group_hint)
        bias = raw.pop(prefix + ".bias", None)
        linears[prefix] = QuantizedLinear(q, scales.astype(np.float16), zeros, group_size, bias)
    if not linears:
        raise UserError(f"{path} holds no quantized linears (*.qweight); the checkpoint is incomplete")
    meta_file = path / METADATA_FILE
    metadata = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return Checkpoint(config, group_hint, linears, raw, metadata)


def load_awq_as_float(path: Path, dtype=None):
    """The dequantized reference model (torch): every runtime must match this one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt = read_checkpoint(path)
    config_dict = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: torch.from_numpy(t.astype(np.float32)) for name, t in ckpt.tensors.items()}
    for prefix, lin in ckpt.linears.items():
        state[prefix + ".weight"] = torch.from_numpy(lin.dequantize())
        if lin.bias is not None:
            state[prefix + ".bias"] = torch.from_numpy(lin.bias.astype(np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise UserError(f"{path} does not match its config.json (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}); the checkpoint is incomplete")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype or torch.float32)
