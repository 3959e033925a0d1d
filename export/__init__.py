"""ONNX export of AWQ checkpoints (installed as awq_edge.export).

    from awq_edge.export import export_checkpoint
    export_checkpoint("ckpt/", "out/ort", target="ort")      # ORT CPU: MatMulNBits + GroupQueryAttention
    export_checkpoint("ckpt/", "out/trt", target="trt")      # TensorRT: AwqMatMulW4A16 plugin, fp16
    export_checkpoint("ckpt/", "out/onnx", target="onnx")    # standard ONNX: uint4 DequantizeLinear

The graph is written with onnx.helper straight from the checkpoint's arrays (no torch, no
tracing). docs/graph.md is the I/O contract, docs/export.md explains the choices.
Files: model.onnx (graph), model.onnx.data (all weights, external data: no 2 GB protobuf
limit), export.json, and the checkpoint's config.json and tokenizer files.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import commit_staging, copy_tokenizer, output_staging, read_for_engine
from ..engine_dir import EXPORT_FORMAT, EXPORT_FORMAT_VERSION, EXPORT_INFO as INFO_FILE, MODEL_FILE
from ..errors import UserError
from ..untrusted import file_record

TARGETS = ("ort", "trt", "onnx")
DATA_FILE = "model.onnx.data"
# ort defaults, chosen for decode speed on x86 CPUs (see docs/export.md for the numbers):
DEFAULT_ORT_ACCURACY_LEVEL = 4  # MatMulNBits int8 compute
# int4 (as onnxruntime-genai's int4 model): the fastest head. Its +9 % perplexity is bought
# back by re-scoring the top candidates exactly in the graph (top_ids / top_logits, docs/export.md).
DEFAULT_ORT_LM_HEAD_BITS = 4
DEFAULT_RESCORE_TOP_K = 64  # candidates of each step whose logits the graph recomputes exactly
# Block 32: at int8 compute (accuracy_level 4) the activations are quantized per block too,
# and block 128 cost +0.02 nats of NLL on SmolLM2 where block 32 cost nothing (docs/export.md).
LM_HEAD_BLOCK = 32
OPSETS = {"ort": 23, "onnx": 21, "trt": 17}  # trt: what TensorRT 10.x's ONNX parser reads everywhere
DTYPES = {"float32": np.float32, "float16": np.float16}


def export_checkpoint(ckpt_dir, out_dir, target: str = "ort", *, act_dtype: str | None = None,
                      all_logits: bool = False, force: bool = False, lm_head_bits: int | None | str = "auto",
                      accuracy_level: int | None = None, rescore_top_k: int = DEFAULT_RESCORE_TOP_K,
                      lm_head_block: int = LM_HEAD_BLOCK, max_positions: int | None = None,
                      progress: bool = False) -> Path:
    """Write the decoder graph of an AWQ checkpoint for `target`; returns out_dir.

    act_dtype: float32 | float16; default float32 (ort, onnx) or float16 (trt).
    lm_head_bits: None = the checkpoint's float lm_head (the accuracy reference); 8 or 4 =
        MatMulNBits quantized from it (ort only); "auto" = 4 for ort, float otherwise.
    rescore_top_k: with a quantized lm_head, the graph also outputs the top-k candidates of the
        last position and their exact logits (the fp16 table: the embedding when tied), which the
        runtime puts in place of the quantized ones; 0 = no re-scoring (the quantized logits as they are).
    accuracy_level: MatMulNBits accuracy_level (ort): 0 = fp32 compute (matches the reference
        to ~1e-6), 4 = int8 compute (fast; default). For onnx it is recorded and passed by
        the backend to ORT's DequantizeLinear+MatMul -> MatMulNBits fusion (default 0).
    progress: a bar over the layers (each read, packed and written as it comes).
    max_positions: the most positions the graph takes (its RoPE tables' rows; export.json
        max_position_embeddings), where fewer than the model's: `build --max-context` asks for no more.
    """
    out_dir = Path(out_dir)
    if target not in TARGETS:
        raise UserError(f"unknown export target {target!r}; choose one of: {', '.join(TARGETS)}")
    act_name = act_dtype or ("float16" if target == "trt" else "float32")
    if act_name not in DTYPES:
        raise UserError(f"unknown activation dtype {act_dtype!r}; choose float32 or float16")
    if lm_head_bits == "auto":
        lm_head_bits = DEFAULT_ORT_LM_HEAD_BITS if target == "ort" else None
    if lm_head_bits not in (None, 4, 8):
        raise UserError(f"lm_head bits must be float (None), 8 or 4, got {lm_head_bits!r}")
    if lm_head_bits is not None and target != "ort":
        raise UserError(f"a quantized lm_head is only available for target ort (MatMulNBits); "
                        f"target {target} keeps the float lm_head")
    if accuracy_level is None:
        accuracy_level = DEFAULT_ORT_ACCURACY_LEVEL if target == "ort" else 0
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise UserError(f"accuracy_level must be 0..4, got {accuracy_level}")
    if not isinstance(rescore_top_k, int) or rescore_top_k < 0:
        raise UserError(f"rescore_top_k must be an integer >= 0, got {rescore_top_k!r}")
    rescore = bool(lm_head_bits) and rescore_top_k > 0

    if max_positions is not None and (not isinstance(max_positions, int) or max_positions < 1):
        raise UserError(f"max_positions must be an integer >= 1, got {max_positions!r}")
    ckpt, spec = read_for_engine(ckpt_dir)  # UserError when it is not a quantized checkpoint of its config
    if max_positions and max_positions < spec.max_positions:  # (a table row a position: fewer bytes)
        spec = dataclasses.replace(spec, max_positions=max_positions)
    _check_shapes(ckpt, target)
    from .graph import Decoder, Target  # onnx: only here, so export.spec imports without it (device side)
    t = Target(target, OPSETS[target], np.dtype(DTYPES[act_name]),
               "concat" if target == "onnx" else "shared_buffer", accuracy_level,
               lm_head_bits, lm_head_block, all_logits, rescore_top_k=rescore_top_k if rescore else 0)

    staging = output_staging(out_dir, force)
    try:
        decoder = Decoder(ckpt, spec, t, staging / DATA_FILE, progress)  # (initializers written as they are made)
        try:
            model = decoder.build()
        finally:
            decoder.b.close()
        weight_bytes = decoder.b.weight_bytes
        _save(model, staging)
        # The exact table the graph re-scores with: the embedding table when tied (no extra bytes).
        table = "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.exact"
        exact_head = {"top_k": rescore_top_k, "table": table} if rescore else None
        copy_tokenizer(Path(ckpt_dir), staging)
        # the config as read: a vision-language checkpoint's is its language model's
        (staging / "config.json").write_text(json.dumps(ckpt.config, indent=2) + "\n")
        info = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "target": target,
            "kv_mode": t.kv_mode,
            "act_dtype": act_name,
            "model_type": spec.model_type,
            "num_layers": spec.layers,
            "num_heads": spec.heads,
            "num_kv_heads": spec.kv_heads,
            "head_dim": spec.head_dim,
            "hidden_size": spec.hidden,
            "intermediate_size": spec.intermediate,
            "vocab_size": spec.vocab,
            "max_position_embeddings": spec.max_positions,
            "sliding_windows": spec.layer_windows,
            **({"conv_layers": list(spec.conv_layers), "conv_kernel": spec.conv_kernel} if spec.conv_layers else {}),
            **({"delta_net": {**dataclasses.asdict(spec.delta), "layers": list(spec.delta.layers)}}
               if spec.delta else {}),
            "all_logits": all_logits,
            "lm_head": "float" if lm_head_bits is None else f"int{lm_head_bits}",
            "lm_head_exact": exact_head,
            "matmul_accuracy_level": accuracy_level,
            "opset": t.opset,
            "weight_bytes": weight_bytes,
            "kv_bytes_per_token": spec.kv_bytes_per_token * np.dtype(DTYPES[act_name]).itemsize,
            "config": {k: v for k, v in ckpt.config.items() if k != "quantization_config"},
            "quantization": {"quantization_config": ckpt.config.get("quantization_config"),
                             "group_size": ckpt.group_size,
                             "settings": ckpt.metadata.get("settings")},
            "files": {f.name: file_record(f) for f in sorted(staging.iterdir())},
        }
        (staging / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    commit_staging(staging, out_dir)
    return out_dir


def _check_shapes(ckpt, target: str) -> None:
    for prefix in ckpt.linears:
        info = ckpt.linears.info(prefix)
        (n, k), g = info.shape, info.group_size
        if target == "trt" and info.act_order:
            raise UserError(f"{prefix} was quantized with GPTQ act-order (desc_act): its inputs are read out of "
                            "order, which AwqMatMulW4A16 does not do; export with --target ort or onnx")
        if target == "ort" and (g < 16 or g & (g - 1)):
            raise UserError(f"{prefix}: group size {g} is not a power of two >= 16, which "
                            "MatMulNBits needs; export with --target onnx instead")
        if target == "trt" and (k % 8 or n % 8 or g not in (32, 64, 128)):
            raise UserError(f"{prefix}: [{n}, {k}] at group {g} does not fit AwqMatMulW4A16 "
                            "(K and N multiples of 8, group 32/64/128)")


def _save(model, staging: Path) -> None:
    import onnx

    onnx.save_model(model, str(staging / MODEL_FILE))  # (its large initializers are in DATA_FILE already)
    try:  # path-based: works for graphs over 2 GB
        onnx.checker.check_model(str(staging / MODEL_FILE))
    except onnx.checker.ValidationError as e:
        raise UserError(f"the exported graph fails onnx.checker ({str(e).splitlines()[0]}); "
                        "this is an exporter bug, please report it") from None


