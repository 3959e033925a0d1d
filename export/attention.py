"""Attention, three ways.

- `gqa_attention` (target ort, kv_mode shared_buffer): one com.microsoft GroupQueryAttention
  node per layer. It applies RoPE itself (do_rotary with cos/sin caches), writes the new K/V
  rows into the KV buffer in place (past and present bound to the same memory), masks causally
  (and by local_window_size for sliding layers) and handles grouped KV heads without copying.
- `plugin_attention` (target trt, kv_mode shared_buffer): one AwqAttention node per layer, our
  TensorRT plugin (contract in plugins/README.md): RoPE, the new K/V rows written into the
  cache input in place, and causal (windowed) attention with grouped KV heads. There are no
  present outputs: the runtime's cache buffers are the past inputs.
- `standard_attention` (target onnx, kv_mode concat): standard ops only. RoPE from
  gathered cos/sin rows, present = Concat(past, new), scores in fp32 with an additive mask,
  grouped heads by broadcasting a [1, Hkv, 1, T, D] K/V against [1, Hkv, rep, S, D] queries.

Both follow Hugging Face: non-interleaved RoPE (rotate_half), q/k norms before RoPE,
query head h reads KV head h // (heads / kv_heads). Hunyuan's q/k norms come after RoPE: the ort
and onnx graphs rotate q and k first (`rotate_heads`) and their attention rotates nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto

from .builder import MS_DOMAIN, GraphBuilder
from .spec import ModelSpec


@dataclass
class StepInfo:
    """Per-step tensors computed once at the top of the graph and shared by every layer."""
    past_length: str  # int64 [1]
    # ort: GroupQueryAttention's lengths
    seqlens_k: str | None = None  # int32 [1] = past + S - 1
    total_length: str | None = None  # int32 scalar = past + S
    # standard: positions of the new tokens and per-table cos/sin rows, per-window masks
    positions: str | None = None  # int64 [S]
    key_positions: str | None = None  # int64 [T]


def step_info(b: GraphBuilder, input_ids: str, past_length: str, target: str, positions: bool = False) -> StepInfo:
    """positions: an ort graph's too (RoPE rotated outside its attention: rotate_heads)."""
    info = StepInfo(past_length)
    if target == "trt":  # the AwqAttention plugin takes past_length as it is
        return info
    seq_len = b.op("Gather", b.op("Shape", input_ids), b.int64s(1), axis=0, name="seq_len")
    total = b.op("Add", past_length, seq_len, name="total_length")
    if target == "ort":
        info.seqlens_k = b.cast(b.op("Sub", total, b.int64s(1), name="seqlens_k"), TensorProto.INT32)
        info.total_length = b.cast(b.op("Reshape", total, b.int64s(), name="total_scalar"), TensorProto.INT32)
    if target != "ort" or positions:
        past_scalar = b.op("Reshape", past_length, b.int64s(), name="past_scalar")
        total_scalar = b.op("Reshape", total, b.int64s(), name="total_scalar")
        one = b.op("Reshape", b.int64s(1), b.int64s(), name="one")
        zero = b.op("Reshape", b.int64s(0), b.int64s(), name="zero")
        info.positions = b.op("Range", past_scalar, total_scalar, one, name="positions")
        info.key_positions = b.op("Range", zero, total_scalar, one, name="key_positions")
    return info


def head_norm(b: GraphBuilder, x: str, heads: int, head_dim: int, weight: str, norm) -> str:
    """Per-head RMSNorm (Qwen3/Gemma3 q_norm, k_norm) on x [1, S, heads * D]."""
    x4 = b.op("Reshape", x, b.int64s(0, -1, heads, head_dim))
    return b.op("Reshape", norm(x4, weight), b.int64s(0, -1, heads * head_dim))


# ---------------------------------------------------------------- ort: GroupQueryAttention

def gqa_attention(b: GraphBuilder, spec: ModelSpec, layer: int, query: str, key: str | None,
                  value: str | None, past_key: str, past_value: str, info: StepInfo,
                  cos_cache: str | None, sin_cache: str | None, present_names: tuple[str, str],
                  sinks: str | None = None) -> str:
    """query is either the packed [1, S, (H + 2 Hkv) D] qkv (key = value = None) or q alone.
    No cos/sin tables: q and k are rotated already (rotate_heads). sinks: gpt-oss's [H] logits, one in
    each head's softmax denominator (GroupQueryAttention's head_sink)."""
    window = spec.layer_windows[layer]
    out, _, _ = b.op(
        "GroupQueryAttention", query, key, value, past_key, past_value, info.seqlens_k,
        info.total_length, cos_cache, sin_cache, *(("", "", sinks) if sinks else ()),
        outputs=[b.name("attn_out"), *present_names], domain=MS_DOMAIN, name="attention",
        num_heads=spec.heads, kv_num_heads=spec.kv_heads, scale=float(spec.attn_scale),
        do_rotary=int(cos_cache is not None), rotary_interleaved=0,
        # HF's sliding_window W: a query sees the W keys ending at itself. ORT 1.31's CPU kernel
        # with local_window_size = W gives the same mask (checked against HF in the tests).
        local_window_size=window if window else -1,
        softcap=float(spec.attn_softcap or 0.0))
    return out


# ---------------------------------------------------------------- trt: AwqAttention plugin

ATTENTION_PLUGIN_OP = "AwqAttention"
ATTENTION_PLUGIN_VERSION = "1"


def plugin_attention(b: GraphBuilder, spec: ModelSpec, layer: int, q: str, k: str, v: str, past_key: str,
                     past_value: str, past_length: str, cos_table: str, sin_table: str) -> str:
    """q [1, S, H*D], k/v [1, S, Hkv*D] (after q/k norms, before RoPE); returns [1, S, H*D]."""
    return b.op(ATTENTION_PLUGIN_OP, q, k, v, past_key, past_value, past_length, cos_table, sin_table,
                domain="awq_edge", name="attention", num_heads=spec.heads, kv_heads=spec.kv_heads,
                head_dim=spec.head_dim, window=int(spec.layer_windows[layer] or 0), scale=float(spec.attn_scale),
                softcap=float(spec.attn_softcap or 0.0), plugin_version=ATTENTION_PLUGIN_VERSION,
                plugin_namespace="")


# ---------------------------------------------------------------- standard ops, concat KV

def rope_rows(b: GraphBuilder, table: str, positions: str) -> str:
    """cos or sin rows of the new tokens: [S, D/2] in the activation dtype."""
    return b.op("Gather", table, positions, axis=0)


def causal_mask(b: GraphBuilder, info: StepInfo, window: int | None) -> str:
    """Additive fp32 mask [S, T]: 0 where key j is visible to query i, a large negative elsewhere."""
    q_pos = b.op("Unsqueeze", info.positions, b.int64s(1))  # [S, 1]
    k_pos = b.op("Unsqueeze", info.key_positions, b.int64s(0))  # [1, T]
    visible = b.op("LessOrEqual", k_pos, q_pos)
    if window:
        distance = b.op("Sub", q_pos, k_pos)
        visible = b.op("And", visible, b.op("Less", distance, b.int64s(window)))
    return b.op("Where", visible, b.const("const/f32/0", np.float32(0)),
                b.const("const/f32/masked", np.float32(np.finfo(np.float32).min)), name="mask")


def _rotate(b: GraphBuilder, x: str, cos: str, sin: str, half: int) -> str:
    """Hugging Face rotate_half RoPE on the last axis (size 2 * half)."""
    x1, x2 = b.slice_last(x, 0, half), b.slice_last(x, half, 2 * half)
    first = b.op("Sub", b.op("Mul", x1, cos), b.op("Mul", x2, sin))
    second = b.op("Add", b.op("Mul", x2, cos), b.op("Mul", x1, sin))
    return b.op("Concat", first, second, axis=-1, name="rope")


def rotate_heads(b: GraphBuilder, x: str, heads: int, head_dim: int, cos: str, sin: str) -> str:
    """RoPE of each head of x [1, S, heads * D] with this step's cos/sin rows [S, D/2]."""
    x4 = b.op("Reshape", x, b.int64s(0, -1, heads, head_dim))
    cos, sin = (b.op("Unsqueeze", t, b.int64s(1)) for t in (cos, sin))  # [S, 1, D/2]: one row for every head
    return b.op("Reshape", _rotate(b, x4, cos, sin, head_dim // 2), b.int64s(0, -1, heads * head_dim))


def standard_attention(b: GraphBuilder, spec: ModelSpec, q: str, k: str, v: str, past_key: str,
                       past_value: str, cos: str | None, sin: str | None, mask: str,
                       present_names: tuple[str, str], sinks: str | None = None) -> str:
    """q [1, S, H*D], k/v [1, S, Hkv*D] (q/k already normed; rotated already when cos is None);
    returns [1, S, H*D]. sinks: gpt-oss's [H] logits, each a column of its head's softmax that no value
    reads (its probability dropped after)."""
    hkv, d = spec.kv_heads, spec.head_dim
    rep = spec.heads // hkv
    q5 = b.op("Transpose", b.op("Reshape", q, b.int64s(0, -1, hkv, rep, d)), perm=[0, 2, 3, 1, 4])
    k4 = b.op("Transpose", b.op("Reshape", k, b.int64s(0, -1, hkv, d)), perm=[0, 2, 1, 3])
    v4 = b.op("Transpose", b.op("Reshape", v, b.int64s(0, -1, hkv, d)), perm=[0, 2, 1, 3])
    if cos is not None:
        q5 = _rotate(b, q5, cos, sin, d // 2)  # [1, Hkv, rep, S, D]
        k4 = _rotate(b, k4, cos, sin, d // 2)  # [1, Hkv, S, D]
    present_k = b.op("Concat", past_key, k4, axis=2, outputs=[present_names[0]])
    present_v = b.op("Concat", past_value, v4, axis=2, outputs=[present_names[1]])
    k_t = b.op("Transpose", b.op("Unsqueeze", present_k, b.int64s(2)), perm=[0, 1, 2, 4, 3])  # [1,Hkv,1,D,T]
    v5 = b.op("Unsqueeze", present_v, b.int64s(2))  # [1, Hkv, 1, T, D]

    q5 = b.op("Mul", q5, b.act_const("const/attn_scale", spec.attn_scale))
    scores = b.op("MatMul", q5, k_t, name="scores")  # [1, Hkv, rep, S, T]
    if b.act_type != TensorProto.FLOAT:  # softmax in fp32: fp16 scores lose the mask's range
        scores = b.cast(scores, TensorProto.FLOAT)
    if spec.attn_softcap:
        cap = b.const("const/f32/attn_softcap", np.float32(spec.attn_softcap))
        scores = b.op("Mul", b.op("Tanh", b.op("Div", scores, cap)), cap)
    scores = b.op("Add", scores, mask)
    if sinks is not None:  # [1, Hkv, rep, S, 1]: the head's sink on every row (the last column's shape, times 0)
        sink = b.op("Reshape", b.cast(sinks, TensorProto.FLOAT), b.int64s(1, hkv, rep, 1, 1))
        column = b.op("Add", b.op("Mul", b.op("Slice", scores, b.int64s(-1), b.int64s(2**62), b.int64s(-1)),
                                  b.const("const/f32/0", np.float32(0))), sink)
        scores = b.op("Concat", scores, column, axis=-1)
    probs = b.op("Softmax", scores, axis=-1)
    if sinks is not None:
        probs = b.op("Slice", probs, b.int64s(0), b.int64s(-1), b.int64s(-1))
    if b.act_type != TensorProto.FLOAT:
        probs = b.cast(probs, b.act_type)
    out = b.op("MatMul", probs, v5, name="context")  # [1, Hkv, rep, S, D]
    out = b.op("Transpose", out, perm=[0, 3, 1, 2, 4])
    return b.op("Reshape", out, b.int64s(0, -1, spec.heads * d))
