"""`awq-edge build SRC --device D --output ENGINE`: one self-contained engine directory.

SRC may be
  - a float model (Hugging Face dir, .gguf, `smollm2`): quantized with the default AWQ
    settings (needs torch), then exported;
  - a quantized checkpoint (config.json with quantization_config.quant_method "awq", or
    "compressed-tensors" W4A16 as llm-compressor writes it): exported;
  - an ONNX export dir (export.json beside model.onnx): copied.

CPU engines (ONNX Runtime) hold
    model.onnx (+ its external data), export.json   the graph and its description (docs/graph.md)
    tokenizer.json, tokenizer_config.json, chat template, config.json, generation_config.json
    manifest.json   format + version, backend, device, model, quantization settings, the memory
                    plan, awq-edge/onnx/onnxruntime versions, size + sha256 of every other file
GPU devices are handed to awq_edge.trt_build.build_trt_engine with a `trt` export.

Everything is written into a temp dir beside ENGINE and renamed at the end (a failed build
leaves nothing). The memory plan is checked as soon as the export's sizes are known.
"""
from __future__ import annotations

import json
import shutil
import time
from importlib import metadata
from pathlib import Path

from .checkpoint import commit_staging, output_staging, temp_dir_beside
from .engine import engine_plan
from .engine_dir import (ENGINE_FORMAT, ENGINE_FORMAT_VERSION, EXPORT_INFO, MANIFEST, read_export_info)
from .errors import UserError
from .untrusted import file_record, read_json


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def source_kind(source: str) -> str:
    """export | checkpoint | model (a float model; resolve_source reports a missing one)."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / MANIFEST).exists():
            raise UserError(f"{source} is already an engine; give a model, an AWQ checkpoint or an export dir")
        if (path / EXPORT_INFO).exists():
            return "export"
        if (path / "config.json").exists():
            from .model import is_quantized_checkpoint, read_config

            if is_quantized_checkpoint(read_config(path)):
                return "checkpoint"
    return "model"


def _source_spec(source: str):
    """A float model's checked config (export.spec.ModelSpec), a GGUF's from its header."""
    from .export.spec import model_spec
    from .model import source_config

    return model_spec(*source_config(source), "re-download the model")


def check_fits_before_quantizing(spec, dev, max_memory: int | None, max_context: int | None) -> None:
    """A float model's (its _source_spec) 4-bit linears alone and the fp16 KV of its shortest
    context, planned as its engine will be (plan_memory): less than any engine of it needs, so what
    does not fit is refused now, in the plan's own words, not after the quantization's minutes or
    hours (or a GGUF's conversion: its header is read)."""
    from .export.spec import all_linear_shapes
    from .memory import plan_memory

    linears = sum(n * k // 2 for n, k in all_linear_shapes(spec).values()) + 4 * spec.state_elems
    plan_memory(linears, spec.kv_bytes_per_token * 2, dev, max_memory=max_memory,
                max_context=max_context, max_position_embeddings=spec.max_positions)


def _quantize(source: str, out: Path, progress: bool) -> Path:
    from .model import require_torch

    require_torch(f"{source} is a float model: building from it quantizes it first (or build from an AWQ "
                  "checkpoint), which")
    from .quantize import QuantizeSettings, quantize_checkpoint

    quantize_checkpoint(source, out, QuantizeSettings(), progress=progress)
    return out


def _export(checkpoint: Path, out: Path, target: str, lm_head_bits="auto", max_positions: int | None = None,
            progress: bool = False) -> Path:
    try:
        from .export import export_checkpoint
    except ImportError as e:
        raise UserError(f"the ONNX exporter is not available ({e}); update awq-edge") from None
    return Path(export_checkpoint(checkpoint, out, target=target, force=True, lm_head_bits=lm_head_bits,
                                  max_positions=max_positions, progress=progress) or out)


def _quantization_settings(checkpoint: Path | None) -> dict:
    """The quantizer's settings from a checkpoint's awq_edge.json (ours), else {}."""
    meta = checkpoint / "awq_edge.json" if checkpoint is not None else None
    if meta is None or not meta.is_file():
        return {}
    settings = read_json(meta, "quantize the model again").get("settings")
    return settings if isinstance(settings, dict) else {}


def build_engine(source: str, device: str = "cpu", output: Path | str = "engine", max_memory=None,
                 max_context: int | None = None, force: bool = False, progress: bool = True,
                 lm_head_bits="auto", backend: str = "auto") -> dict:
    """Build ENGINE from SRC for DEVICE; returns the manifest.

    lm_head_bits ("auto" | None | 8 | 4) is passed to the CPU (`ort`) export: see docs/export.md.
    A cuda engine's head is int8 for "auto" and 8, int4 for 4 (an int4 GEMV and a re-scored top 64), fp16 for None."""
    from .memory import parse_size

    dev = resolve_for_build(device, backend)
    output = Path(output)
    if output.exists() and not force:
        raise UserError(f"output {output} already exists; choose another path or pass --force to replace it")
    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    if max_context is not None and max_context < 1:
        raise UserError(f"--max-context must be at least 1 (got {max_context})")
    kind = source_kind(source)
    if kind == "model":
        from .data import resolve_model_alias

        if not Path(resolve_model_alias(source)).expanduser().exists():
            raise UserError(f"model not found: {source}; give a Hugging Face model dir, a .gguf, `smollm2`, "
                            "an AWQ checkpoint or an export dir")
        spec = _source_spec(source)
        check_fits_before_quantizing(spec, dev, max_memory, max_context)
        if dev.is_gpu:
            check_kernels_before_quantizing(spec, gpu_backend(backend), lm_head_bits)
    if dev.is_gpu:
        return _build_gpu(source, kind, dev, output, max_memory, max_context, force, progress, backend, device,
                          lm_head_bits)
    if backend not in ("auto", "ort"):
        raise UserError(f"--backend {backend} is for GPU devices; --device cpu builds an ONNX Runtime engine")

    staging = output_staging(output, force)
    work = temp_dir_beside(output, "work")
    try:
        checkpoint = None
        if kind == "model":
            checkpoint = _quantize(source, work / "checkpoint", progress)
        elif kind == "checkpoint":
            checkpoint = Path(source)
        # (--max-context: the graph's RoPE tables hold that many positions, not the model's all)
        export_dir = (_export(checkpoint, work / "export", "ort", lm_head_bits, max_context, progress) if checkpoint
                      else Path(source))
        info = read_export_info(export_dir)  # checks the export's files and graph (an export dir is untrusted)
        if info.target not in ("ort", "onnx"):
            raise UserError(f"{export_dir} is a {info.target} export (ops ONNX Runtime cannot run); "
                            "export with --target ort for --device cpu")
        if "tokenizer.json" not in info.files:
            raise UserError(f"no tokenizer.json in {checkpoint or export_dir}; the engine needs the model's tokenizer")

        # The plan first: refuse before copying gigabytes.
        manifest = {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "backend": "ort",
                    "device": dev.name}
        plan = engine_plan(manifest, info, max_memory, max_context, at_load=False)

        move = shutil.move if export_dir.is_relative_to(work) else shutil.copy2
        for name in [*info.files, EXPORT_INFO]:  # exactly what the export lists (names checked plain)
            move(str(export_dir / name), staging / name)
        config = info.config
        manifest.update({
            "model": {"source": str(source), "source_kind": kind,
                      "model_type": config.get("model_type"), "architectures": config.get("architectures")},
            "quantization": (_quantization_settings(checkpoint) or info.quantization.get("settings")
                             or info.quantization),
            "memory_plan": plan.to_dict(),
            "versions": {"awq_edge": _version("awq-edge"), "onnx": _version("onnx"),
                         "onnxruntime": _version("onnxruntime")},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": {f.name: file_record(f) for f in sorted(staging.iterdir())},
        })
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        commit_staging(staging, output)
        return manifest
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)


def resolve_for_build(name: str, backend: str = "auto"):
    """The device profile to build for. A family (`orin`) that this machine is not: a cuda engine,
    which is built anywhere, plans for the family's smallest variant and names the family in its
    manifest (each variant resolves itself at load); TensorRT builds on the device, so it asks."""
    from .devices import all_devices, resolve

    try:
        return resolve(name)
    except UserError:
        family = [d for d in all_devices().values() if d.family == name]
        if not family or gpu_backend(backend) != "cuda":
            raise
        return min(family, key=lambda d: d.total_memory_gib)


def gpu_backend(choice: str) -> str:
    """--backend auto|cuda|trt for a GPU device: auto is trt where TensorRT is importable, else cuda."""
    if choice not in ("auto", "cuda", "trt"):
        raise UserError(f"--backend {choice} is unknown; use auto, cuda or trt")
    if choice != "auto":
        return choice
    import importlib.util

    return "trt" if importlib.util.find_spec("tensorrt") else "cuda"


CUDA_LM_HEADS = {"auto": "int8", 8: "int8", 4: "int4", None: "fp16"}  # lm_head_bits -> a cuda engine's head


def check_kernels_before_quantizing(spec, backend: str, lm_head_bits) -> None:
    """What a GPU backend cannot run, refused before the quantization's minutes: the cuda kernels'
    head sizes and the int4 head's vocabulary (decoder_spec), the trt graph's (check_target)."""
    if backend == "cuda":
        from .decoder import decoder_spec

        decoder_spec(spec, 128, lm_head=CUDA_LM_HEADS[lm_head_bits])
    else:
        from .export.graph import check_target

        check_target(spec, "trt")


def _build_gpu(source, kind, dev, output, max_memory, max_context, force, progress, backend, device_name,
               lm_head_bits="auto") -> dict:
    backend = gpu_backend(backend)
    if backend == "cuda":
        return _build_cuda(source, kind, dev, output, max_memory, max_context, force, progress, device_name,
                           CUDA_LM_HEADS[lm_head_bits])
    try:
        from .trt_build import build_trt_engine
    except ImportError as e:
        raise UserError(f"TensorRT engine building is not available in this install ({e}); "
                        "build with --device cpu or install awq-edge with its TensorRT parts") from None
    work = temp_dir_beside(output, "work")
    try:
        if kind == "export":
            export_dir = Path(source)
            if read_export_info(export_dir, graph=False).target != "trt":
                raise UserError(f"{source} is not a TensorRT export; run `awq-edge export CKPT --target trt` first")
        else:
            checkpoint = _quantize(source, work / "checkpoint", progress) if kind == "model" else Path(source)
            export_dir = _export(checkpoint, work / "export", "trt", progress=progress)
        build_trt_engine(export_dir, dev, output, max_memory=max_memory, max_context=max_context, force=force)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return json.loads((output / MANIFEST).read_text())



def _build_cuda(source, kind, dev, output, max_memory, max_context, force, progress, device_name,
                lm_head: str) -> dict:
    """A native engine (awq_edge/cuda_build.py) from a float model or a quantized checkpoint."""
    from .cuda_build import build_cuda_engine

    if kind == "export":
        raise UserError(f"{source} is an ONNX export; a cuda engine is built from a model or a quantized "
                        "checkpoint (or pass --backend trt)")
    if output.exists() and not force:
        raise UserError(f"output {output} already exists; choose another path or pass --force to replace it")
    work = temp_dir_beside(output, "work")
    try:
        checkpoint = _quantize(source, work / "checkpoint", progress) if kind == "model" else Path(source)
        return build_cuda_engine(checkpoint, dev, output, max_memory, max_context, force, device_name, lm_head,
                                 progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
