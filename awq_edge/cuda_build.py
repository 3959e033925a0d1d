"""`awq-edge build SRC --device orin|orin-*|rtx4090|rtx4070-laptop --backend cuda`: a native engine.

The engine carries everything the device needs besides the NVIDIA driver: the weights in the
kernels' layout and the kernels themselves, compiled for the device's arch as cubins (GPU code
only), loaded with cuModuleLoadData. So it is built on any host with nvcc, no GPU needed, and
an engine built on an x86 workstation runs on an aarch64 Orin. The files:

    weights.bin       every tensor of decoder.tensor_layout(spec), each at a 256-byte offset
    decoder.json      format, group size, q/k/v bias, lm_head kind, and the index of weights.bin
                      (name -> dtype, shape, offset); the DecoderSpec itself is recomputed from
                      config.json on load, and the index must be exactly the layout it implies
    kernels.sm_XX.<name>.cubin   plugins/kernels/<name>.cu compiled for the arch (plugins.CUBIN_SOURCES)
    config.json, tokenizer files, manifest.json (backend "cuda", device, gpu_arch, kernels,
                      the memory plan, sizes and hashes of every file)

Written into a temp dir beside OUTPUT and renamed at the end, like every engine.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import plugins
from .checkpoint import commit_staging, copy_tokenizer, output_staging, read_for_engine
from .decoder import POSITIONS_TABLE, checkpoint_biases, decoder_spec, pack_weights, tensor_layout
from .engine_dir import (DECODER_FORMAT, DECODER_FORMAT_VERSION, DECODER_INFO, ENGINE_FORMAT, ENGINE_FORMAT_VERSION,
                         MANIFEST, TENSOR_ALIGN, DecoderInfo, read_decoder_info)
from .errors import UserError
from .untrusted import file_record

WEIGHTS_FILE = "weights.bin"


def kernel_files(gpu_arch: str) -> dict[str, str]:
    """module name -> the engine's file name for its cubin."""
    return {name: f"kernels.{gpu_arch}.{name}.cubin" for name in plugins.CUBIN_SOURCES}


def weights_index(layout: dict) -> tuple[dict, int]:
    """(decoder.json's index: each tensor of a layout (name -> (dtype, shape), decoder.tensor_layout)
    at the next TENSOR_ALIGN offset, in order; weights.bin's size)."""
    index, offset = {}, 0
    for name, (dtype, shape) in layout.items():
        offset += -offset % TENSOR_ALIGN
        index[name] = {"dtype": dtype, "shape": list(shape), "offset": offset}
        offset += np.dtype(dtype).itemsize * math.prod(shape)
    return index, offset


def write_weights(path: Path, layout: dict, tensors) -> dict:
    """weights.bin: tensors ((name, array) pairs, in any order, as decoder.pack_weights yields them)
    each written where weights_index puts it as it comes; returns decoder.json's index."""
    index, size = weights_index(layout)
    written = set()
    with open(path, "wb") as f:
        for name, array in tensors:
            entry = index[name]
            if str(array.dtype) != entry["dtype"] or list(array.shape) != entry["shape"]:
                raise ValueError(f"{name} is {array.dtype} {list(array.shape)}, its layout {entry}")
            f.seek(entry["offset"])
            np.ascontiguousarray(array).tofile(f)
            written.add(name)
        f.truncate(size)
    if written != set(index):
        raise ValueError(f"weights.bin lacks {sorted(set(index) - written)[:3]}")
    return index


def rope_sized_to_context(spec, layout: dict, manifest: dict, max_memory, max_context) -> tuple:
    """(spec, layout) with the RoPE tables (and learned positions') cut to the context the engine is
    planned for (at build: a GPU engine's context is fixed then, engine_plan): a table row for a
    position past it is memory the device holds and never reads (Gemma 3 4B's four fp16 tables of
    131072 x 128: 128 MiB). What does not fit at all is refused here, before anything is written."""
    from .engine import engine_plan

    index, size = weights_index(layout)
    info = DecoderInfo(spec=spec, weights_file=WEIGHTS_FILE, weight_bytes=size, config={}, lm_head=spec.lm_head,
                       tensors={n: (e["dtype"], tuple(e["shape"]), e["offset"]) for n, e in index.items()})
    context = engine_plan(manifest, info, max_memory, max_context, at_load=False).context
    if context >= spec.max_positions:
        return spec, layout
    return replace(spec, max_positions=context), {name: (dtype, (context, *shape[1:]) if by_position(name) else shape)
                                                   for name, (dtype, shape) in layout.items()}


def by_position(name: str) -> bool:
    """A table of a row a position (RoPE's, learned positions')."""
    return name.startswith("rope.") or name == POSITIONS_TABLE


def build_cuda_engine(checkpoint: Path, device, output: Path, max_memory=None, max_context: int | None = None,
                      force: bool = False, device_name: str | None = None, lm_head: str = "int8",
                      progress: bool = False) -> dict:
    """Write a native engine for a GPU device profile from a quantized checkpoint; returns its manifest.
    lm_head: int8 (the default: half the bytes of the checkpoint's fp16 head on every token), int4
    (under a third; each step's top 64 re-scored from the fp16 table) or fp16 (decoder.LM_HEADS).

    device_name: what the manifest names (a family such as `orin`, whose variants resolve
    themselves at load); the plan is made for `device` (the family's smallest variant)."""
    ckpt, model = read_for_engine(checkpoint)
    infos = [ckpt.linears.info(name) for name in ckpt.linears]
    act_order = any(info.act_order for info in infos)  # (all or none: pack_weights checks)
    group_sizes = {info.group_size for info in infos}
    if len(group_sizes) != 1 or not group_sizes <= {32, 64, 128}:
        raise UserError(f"{checkpoint} uses group sizes {sorted(group_sizes)}; the cuda backend's kernels take one "
                        "group size of 32, 64 or 128")
    qkv_bias, out_bias = checkpoint_biases(ckpt)
    spec = decoder_spec(model, group_sizes.pop(), qkv_bias, lm_head, act_order, out_bias)
    tensors = pack_weights(ckpt, spec, progress)  # (packed as they are written)
    source = {"source": str(checkpoint), "model_type": spec.model_type,
              "architectures": ckpt.config.get("architectures"),
              "quantization": ckpt.metadata.get("settings") or ckpt.config.get("quantization_config") or {}}
    config = ckpt.config  # as read: a vision-language checkpoint's is its language model's
    return write_cuda_engine(output, device, spec, tensors, Path(checkpoint), source, max_memory, max_context,
                             force, device_name, progress, config)


def stock_driver_note(device_name: str, kernels_cuda: str | None) -> str | None:
    """A warning when an engine for device_name (a profile or a family, as its manifest names it)
    has kernels that need a newer CUDA than the profile's stock driver (devices/*.toml
    stock_driver_cuda: an Orin's JetPack 6 has CUDA 12, an nvcc of CUDA 13 is common on build
    hosts); None when they load there, or the device's driver is updated freely."""
    from .devices import all_devices

    stock = max((d.stock_driver_cuda for d in all_devices().values() if device_name in (d.name, d.family)),
                default=0)
    if not stock or not kernels_cuda or plugins.cuda_major(kernels_cuda) <= stock:
        return None
    return (f"the kernels were compiled by nvcc {kernels_cuda} and load only under a CUDA "
            f"{plugins.cuda_major(kernels_cuda)} driver; this device's stock one is CUDA {stock} (JetPack 6 on an "
            f"Orin): for that, rebuild with a CUDA {stock} nvcc (NVCC=/path/to/that/nvcc awq-edge build ...)")


def write_cuda_engine(output: Path, device, spec, tensors, model_dir: Path, source: dict, max_memory=None,
                      max_context: int | None = None, force: bool = False, device_name: str | None = None,
                      progress: bool = False, config: dict | None = None) -> dict:
    """The engine folder from tensors in the kernels' layout (decoder.tensor_layout): (name, array)
    pairs as decoder.pack_weights yields them (or random ones: awq_edge/synthetic.py); the tokenizer
    comes from model_dir, config.json is `config` (the checkpoint's as read) or else model_dir's."""
    from .engine import engine_plan

    output = Path(output)
    for what, size in (("hidden size", spec.hidden), ("intermediate size", spec.intermediate)):
        if size % 8:  # the GEMV's rows come 8 at a time; int4 words pack 8 of K
            raise UserError(f"{what} {size} is not a multiple of 8, which the cuda backend's kernels need; "
                            "use the CPU engine (--device cpu)")
    cubins = plugins.build_cubins(device.gpu_arch, progress)  # before any output: nvcc missing is one line
    cuda = plugins.nvcc_release(plugins.find_nvcc())  # what the device's driver must support
    manifest = {"format": ENGINE_FORMAT, "format_version": ENGINE_FORMAT_VERSION, "backend": "cuda",
                "device": device.name, "gpu_arch": device.gpu_arch, "kernels": kernel_files(device.gpu_arch),
                "kernels_cuda": cuda}
    full_positions = spec.max_positions
    spec, layout = rope_sized_to_context(spec, tensor_layout(spec), manifest, max_memory, max_context)
    context = spec.max_positions
    staging = output_staging(output, force)
    try:
        index = write_weights(staging / WEIGHTS_FILE, layout,
                              ((name, array[:context] if by_position(name) else array) for name, array in tensors))
        decoder = {"format": DECODER_FORMAT, "format_version": DECODER_FORMAT_VERSION, "group_size": spec.group_size,
                   "qkv_bias": spec.qkv_bias, "out_bias": spec.out_bias, "lm_head": spec.lm_head,
                   "act_order": spec.act_order,
                   **({"rope_positions": spec.max_positions} if spec.max_positions < full_positions else {}),
                   "weights": WEIGHTS_FILE, "tensors": index}
        (staging / DECODER_INFO).write_text(json.dumps(decoder, indent=1) + "\n")
        for name, file in kernel_files(device.gpu_arch).items():
            shutil.copy2(cubins[name], staging / file)
        if config is None:
            shutil.copy2(model_dir / "config.json", staging / "config.json")
        else:
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        copy_tokenizer(model_dir, staging)
        if not (staging / "tokenizer.json").exists():
            raise UserError(f"no tokenizer.json in {model_dir}; the engine needs the model's tokenizer")
        files = {f.name: file_record(f) for f in sorted(staging.iterdir())}
        info = read_decoder_info(staging, files)  # what the device will read, checked here first
        plan = engine_plan(manifest, info, max_memory, max_context, at_load=False)
        manifest.update({
            "device": device_name or device.name,
            "model": {k: source[k] for k in ("source", "model_type", "architectures")},
            "quantization": source["quantization"],
            "memory_plan": plan.to_dict(),
            "plugin_hash": plugins.source_hash(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "files": files,
        })
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        commit_staging(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest
