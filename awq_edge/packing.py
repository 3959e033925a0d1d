"""INT4 weight layouts: the one place that knows how 4-bit weights are laid out.

Every layout starts from the same three arrays, which the quantizer produces:

    q      uint8   [out, in]        integers 0..15
    scales float   [out, groups]    groups = ceil(in / group_size)
    zeros  uint8   [out, groups]    integers 0..15
    w_hat = (q - zeros[:, k // group_size]) * scales[:, k // group_size]

Ragged K: when group_size does not divide `in` (SmolLM2's hidden size 576 at
group 128), there are ceil(in / group_size) groups and the LAST group is short
(576 = 4 x 128 + 64). Nothing is padded in the checkpoint. AutoAWQ/vLLM loaders
assume in % group_size == 0 and will refuse such a layer; awq-edge reads it.

Layouts:
- AutoAWQ "gemm" (the checkpoint; transformers/vLLM read it):
    qweight int32 [in, out/8]; nibble i (bits 4i..4i+3) of word j holds column
    8j + AWQ_ORDER[i]; qzeros int32 [groups, out/8] packed the same way;
    scales fp16 [groups, out].
- compressed-tensors "pack-quantized" (llm-compressor's W4A16 checkpoint; vLLM and
  transformers read it): q and zero points are stored as SIGNED int4 (-8..7) plus 8,
  so the stored nibble is exactly our 0..15 value:
    weight_packed     int32 [out, ceil(in/8)]; nibble i of word j holds column 8j + i
                      (natural order, low nibble first), padded with 0 to a multiple of 8;
    weight_zero_point int32 [ceil(out/8), groups] (asymmetric only): packed the same way
                      but along OUT: nibble i of word [j, g] holds row 8j + i of group g;
    weight_scale      float [out, groups];  weight_shape int [2] = (out, in).
  Symmetric checkpoints store no zero point: signed q * scale = (q + 8 - 8) * scale,
  i.e. zeros = 8. The format has no short last group: in % group_size must be 0.
- GPTQ (AutoGPTQ, GPTQModel, optimum; quant_method "gptq"): packed along IN, plain order:
    qweight int32 [in/8, out]; nibble i of word [j, n] holds input 8j + i of output n;
    qzeros  int32 [groups, out/8]; nibble i of word [g, j] holds the zero of output 8j + i,
            minus 1 in the original "gptq" format (so a zero of 0 cannot be stored: AutoGPTQ's
            -1 spills into every nibble of its word), as is in "gptq_v2";
    scales  fp16 [groups, out]; g_idx int32 [in]: each input's group, k // group_size unless the
            checkpoint was quantized in activation order (desc_act), which we cannot run.
"""
from __future__ import annotations

import numpy as np

# Nibble i of a packed int32 holds column AWQ_ORDER[i] of its 8-column block.
# The interleave puts columns (0,1), (2,3), ... into the two halves of a half2
# after the lop3 int4->fp16 trick (see plugins/kernels/dequant.cuh).
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# Where column c of a block sits: AWQ_REVERSE_ORDER[c] = nibble index.
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(8))
# compressed-tensors packs in plain order: nibble i holds column i.
CT_ORDER = tuple(range(8))
# compressed-tensors stores int4 as signed -8..7 plus this offset in each nibble.
CT_OFFSET = 8

BITS = 4
MAX_INT = 15
GROUP_SIZES = (32, 64, 128)


def num_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def group_index(in_features: int, group_size: int) -> np.ndarray:
    """For each input column k, the group it belongs to (k // group_size)."""
    return np.arange(in_features) // group_size


def pack_int4(q: np.ndarray, order=AWQ_ORDER) -> np.ndarray:
    """uint8 [rows, cols] (0..15), cols % 8 == 0 -> int32 [rows, cols/8]; nibble i of a word
    holds column order[i] of its 8-column block (AutoAWQ order unless told)."""
    q = np.asarray(q)
    rows, cols = q.shape
    if cols % 8:
        raise ValueError(f"pack_int4 needs a column count divisible by 8, got {cols}")
    if q.min(initial=0) < 0 or q.max(initial=0) > MAX_INT:
        raise ValueError("pack_int4 takes integers in 0..15")
    blocks = q.reshape(rows, cols // 8, 8)  # (widened a nibble at a time: a 7B MLP's as uint32 at once is 360 MB)
    packed = np.zeros((rows, cols // 8), dtype=np.uint32)
    for nibble, column in enumerate(order):
        packed |= blocks[:, :, column].astype(np.uint32) << np.uint32(4 * nibble)
    return packed.view(np.int32)


def unpack_int4(packed: np.ndarray, order=AWQ_ORDER) -> np.ndarray:
    """int32 [rows, cols/8] (AutoAWQ order unless told) -> uint8 [rows, cols]."""
    words = np.asarray(packed).view(np.uint32)
    rows, blocks = words.shape
    out = np.empty((rows, blocks, 8), dtype=np.uint8)
    for nibble, column in enumerate(order):
        out[:, :, column] = (words >> np.uint32(4 * nibble)) & np.uint32(0xF)
    return out.reshape(rows, blocks * 8)


def check_quantized(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> None:
    out_features, in_features = q.shape
    groups = num_groups(in_features, group_size)
    if scales.shape != (out_features, groups) or zeros.shape != (out_features, groups):
        raise ValueError(
            f"scales/zeros must be [{out_features}, {groups}] for a [{out_features}, {in_features}] "
            f"weight at group {group_size}; got {scales.shape} and {zeros.shape}"
        )


def to_awq_gemm(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> dict[str, np.ndarray]:
    """Quantized weight -> the AutoAWQ GEMM tensors {qweight, qzeros, scales}."""
    check_quantized(q, scales, zeros, group_size)
    return {
        "qweight": pack_int4(np.ascontiguousarray(q.T)),
        "qzeros": pack_int4(np.ascontiguousarray(zeros.T)),
        "scales": np.ascontiguousarray(scales.T).astype(np.float16),
    }


def from_awq_gemm(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray):
    """AutoAWQ GEMM tensors -> (q [out, in], scales fp16 [out, groups], zeros [out, groups])."""
    q = unpack_int4(qweight).T
    zeros = unpack_int4(qzeros).T
    scales = np.asarray(scales).T
    if zeros.shape != scales.shape or q.shape[0] != scales.shape[0]:
        raise ValueError(
            f"inconsistent AWQ tensors: qweight {qweight.shape}, qzeros {qzeros.shape}, scales {scales.shape}"
        )
    return np.ascontiguousarray(q), np.ascontiguousarray(scales), np.ascontiguousarray(zeros)


# ---------------------------------------------------------------- compressed-tensors pack-quantized layout

def _pack_rows_ct(values: np.ndarray) -> np.ndarray:
    """uint8 [rows, cols] (0..15) -> int32 [rows, ceil(cols/8)] in plain nibble order, zero-padded."""
    rows, cols = values.shape
    padded = np.zeros((rows, 8 * num_groups(cols, 8)), dtype=np.uint8)
    padded[:, :cols] = values
    return pack_int4(padded, CT_ORDER)


def to_compressed_tensors(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                          group_size: int) -> dict[str, np.ndarray]:
    """Quantized weight -> the asymmetric pack-quantized tensors
    {weight_packed, weight_scale, weight_zero_point, weight_shape}."""
    check_quantized(q, scales, zeros, group_size)
    out_features, in_features = q.shape
    if in_features % group_size:
        raise ValueError(f"{in_features} inputs are not a multiple of group size {group_size}, and "
                         "compressed-tensors has no short last group")
    return {
        "weight_packed": _pack_rows_ct(q),
        "weight_scale": np.ascontiguousarray(scales).astype(np.float16),
        # packed along out: pack the transpose, transpose back
        "weight_zero_point": np.ascontiguousarray(_pack_rows_ct(np.ascontiguousarray(zeros.T)).T),
        "weight_shape": np.array([out_features, in_features], dtype=np.int64),
    }


def from_compressed_tensors(weight_packed: np.ndarray, weight_scale: np.ndarray,
                            weight_zero_point: np.ndarray | None, weight_shape: np.ndarray, group_size: int):
    """pack-quantized tensors -> (q uint8 [out, in], scales [out, groups], zeros uint8 [out, groups]).

    weight_zero_point None means symmetric (zeros = 8). Every shape is checked against
    weight_shape before anything is unpacked, so a lying weight_shape allocates nothing.
    """
    out_features, in_features = check_compressed_tensors(weight_packed, weight_scale, weight_zero_point,
                                                         weight_shape, group_size)
    q = unpack_int4(weight_packed, CT_ORDER)[:, :in_features]
    if weight_zero_point is None:
        zeros = np.full((out_features, in_features // group_size), CT_OFFSET, dtype=np.uint8)
    else:
        zeros = unpack_int4(np.ascontiguousarray(weight_zero_point.T), CT_ORDER)[:, :out_features].T
    return np.ascontiguousarray(q), np.ascontiguousarray(weight_scale), np.ascontiguousarray(zeros)


def check_compressed_tensors(weight_packed, weight_scale: np.ndarray, weight_zero_point: np.ndarray | None,
                             weight_shape: np.ndarray, group_size: int) -> tuple[int, int]:
    """from_compressed_tensors' checks alone, weight_packed's of its dtype and shape only (its file's
    header will do); -> (out, in)."""
    shape = np.asarray(weight_shape)
    if shape.shape != (2,) or shape.dtype.kind not in "iu" or shape.min() < 1:
        raise ValueError(f"weight_shape must be two positive integers [out, in], got {shape.tolist()}")
    out_features, in_features = int(shape[0]), int(shape[1])
    if in_features % group_size:
        raise ValueError(f"{in_features} inputs are not a multiple of group size {group_size} "
                         "(compressed-tensors has no short last group)")
    groups = in_features // group_size
    words = num_groups(in_features, 8)
    if weight_packed.dtype != np.int32 or weight_packed.shape != (out_features, words):
        raise ValueError(f"weight_packed must be int32 [{out_features}, {words}] for weight_shape "
                         f"[{out_features}, {in_features}], got {weight_packed.dtype} {list(weight_packed.shape)}")
    if weight_scale.dtype.kind != "f" or weight_scale.shape != (out_features, groups):
        raise ValueError(f"weight_scale must be float [{out_features}, {groups}] at group {group_size}, "
                         f"got {weight_scale.dtype} {list(weight_scale.shape)}")
    zp_words = num_groups(out_features, 8)
    if weight_zero_point is not None and (weight_zero_point.dtype != np.int32
                                          or weight_zero_point.shape != (zp_words, groups)):
        raise ValueError(f"weight_zero_point must be int32 [{zp_words}, {groups}] (packed along the "
                         f"{out_features} outputs), got {weight_zero_point.dtype} {list(weight_zero_point.shape)}")
    return out_features, in_features


# ---------------------------------------------------------------- GPTQ layout

def is_permutation(order: np.ndarray, n: int) -> bool:
    """Whether an act-order linear's input order holds each of 0..n-1 once (the kernels and the
    CPU step index x by it: an engine's is untrusted)."""
    return order.shape == (n,) and np.array_equal(np.sort(order), np.arange(n))


def from_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray | None,
              group_size: int, zero_offset: int):
    """GPTQ tensors -> (q uint8 [out, in], scales [out, groups], zeros uint8 [out, groups], order).
    zero_offset: what the stored zeros lack (1 for checkpoint_format "gptq", 0 for "gptq_v2").

    An act-order (desc_act) g_idx groups the inputs out of order: q's columns come back sorted by
    group (each group's inputs together, as the kernels read them) and order [in] says which input
    each column is (None: the natural order), which the engines gather x by."""
    check_gptq_shapes(qweight.shape, qzeros.shape, scales.shape, group_size)
    out_features = qweight.shape[1]
    order = gptq_input_order(g_idx, 8 * qweight.shape[0], group_size)
    q = unpack_int4(np.ascontiguousarray(qweight.T), CT_ORDER)
    if order is not None:
        q = q[:, order]
    scales = np.ascontiguousarray(np.asarray(scales).T)
    return np.ascontiguousarray(q), scales, gptq_zeros(qzeros, out_features, zero_offset), order


def gptq_zeros(qzeros: np.ndarray, out_features: int, zero_offset: int) -> np.ndarray:
    """GPTQ's packed zeros [groups, out/8] -> uint8 [out, groups], what the stored ones lack added."""
    zeros = unpack_int4(qzeros, CT_ORDER)[:, :out_features].T.astype(np.int16) + zero_offset
    if zeros.max(initial=0) > MAX_INT:
        raise ValueError("a zero point reads 16: the original GPTQ format cannot store a zero of 0 (its -1 spills "
                         "into the whole word), so this layer's zeros are lost")
    return np.ascontiguousarray(zeros.astype(np.uint8))


def check_gptq_shapes(qweight: tuple, qzeros: tuple, scales: tuple, group_size: int) -> None:
    """GPTQ's qweight [in/8, out], qzeros [groups, out/8], scales [groups, out] agree (shapes alone)."""
    in_words, out_features = qweight
    groups = num_groups(8 * in_words, group_size)
    if tuple(qzeros) != (groups, num_groups(out_features, 8)) or tuple(scales) != (groups, out_features):
        raise ValueError(f"inconsistent GPTQ tensors at group {group_size}: qweight {list(qweight)}, "
                         f"qzeros {list(qzeros)}, scales {list(scales)}")


def gptq_input_order(g_idx: np.ndarray | None, in_features: int, group_size: int) -> np.ndarray | None:
    """The act-order input order a GPTQ g_idx gives (column j of q is input order[j], the groups'
    inputs together); None: the natural order (no g_idx, or one that groups the inputs in order)."""
    natural = group_index(in_features, group_size)
    if g_idx is None:
        return None
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx is {list(g_idx.shape)}, not [{in_features}]")
    if np.array_equal(g_idx, natural):
        return None
    order = np.argsort(g_idx, kind="stable")
    if not np.array_equal(np.asarray(g_idx)[order], natural):  # a group of another size, an index past them
        raise ValueError(f"its g_idx does not put {group_size} inputs in each group")
    return order


def infer_group_size(in_features: int, groups: int, hint: int | None = None) -> int:
    """The group size that gives `groups` groups over `in_features` (hint first)."""
    for g in ((hint,) if hint else ()) + GROUP_SIZES + (16, 256, 512, 1024):
        if g and num_groups(in_features, g) == groups:
            return g
    raise ValueError(f"no group size gives {groups} groups over {in_features} inputs")


def dequantize(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """w_hat [out, in] float32, the exact value every runtime must reproduce."""
    check_quantized(q, scales, zeros, group_size)
    g = group_index(q.shape[1], group_size)
    s = scales.astype(np.float32)[:, g]
    z = zeros.astype(np.float32)[:, g]
    return (q.astype(np.float32) - z) * s


# ---------------------------------------------------------------- TensorRT plugin layout
# The op contract in plugins/README.md: qweight int32 [N, K/8], K contiguous per output
# row, AWQ nibble order inside each word; scales and zeros fp16 [N, groups].

INT8_BLOCK = 32  # the cuda engine's int8 lm_head: one fp16 scale per 32 values of a row


def quantize_rows_int8(table: np.ndarray, block: int = INT8_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """A float table [V, K] -> (q int8 [V, K], scales fp16 [V, ceil(K / block)]), symmetric per block:
    s = max|w| / 127 rounded to fp16, q = round(w / s) in -127..127. W_hat = q * s."""
    v, k = table.shape
    blocks = -(-k // block)
    q, scales = np.empty((v, k), np.int8), np.empty((v, blocks), np.float16)
    for start in range(0, v, 4096):  # in rows at a time: float32 copies of a whole 7B head are GBs
        w = np.asarray(table[start:start + 4096], np.float32)
        padded = np.zeros((len(w), blocks * block), np.float32)
        padded[:, :k] = w
        part = (np.abs(padded.reshape(len(w), blocks, block)).max(axis=2) / 127).astype(np.float16)
        scales[start:start + 4096] = part
        s = np.repeat(part.astype(np.float32), block, axis=1)[:, :k]
        q[start:start + 4096] = np.clip(np.where(s > 0, np.rint(w / np.where(s > 0, s, 1)), 0), -127, 127)
    return q, scales


def dequantize_rows_int8(q: np.ndarray, scales: np.ndarray, block: int = INT8_BLOCK) -> np.ndarray:
    """W_hat float32 [V, K] of quantize_rows_int8's output."""
    return q.astype(np.float32) * np.repeat(scales.astype(np.float32), block, axis=1)[:, :q.shape[1]]


def pack_for_plugin(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> dict[str, np.ndarray]:
    check_quantized(q, scales, zeros, group_size)
    return {
        "qweight": pack_int4(q),
        "scales": np.ascontiguousarray(scales).astype(np.float16),
        "zeros": np.ascontiguousarray(zeros).astype(np.float16),
    }


# ---------------------------------------------------------------- ONNX Runtime MatMulNBits layout
# com.microsoft MatMulNBits (bits 4 or 8), used by `export --target ort`.

def to_matmul_nbits(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int,
                    bits: int = 4) -> dict[str, np.ndarray]:
    """Quantized weight -> the MatMulNBits tensors {B, scales, zero_points}.

    Layout (Y = X @ w_hat.T, attributes K = in, N = out, block_size = group_size, bits):
        B            uint8 [N, blocks, group_size * bits / 8]; blocks = ceil(K / group_size).
                     Row n holds output channel n with K contiguous. 4-bit: byte b of a
                     block holds k = 2b in its LOW nibble and k = 2b + 1 in its HIGH nibble.
                     8-bit: one byte per k.
        scales       float32 [N, blocks] (cast to the activation type by the caller)
        zero_points  4-bit: uint8 [N, ceil(blocks / 2)], block 2j in the low nibble of byte j,
                     block 2j + 1 in the high nibble (a missing last one is 0).
                     8-bit: uint8 [N, blocks].
    Ragged K: the last block is padded to group_size with q = its zero point, so the
    padding dequantizes to exactly 0; ORT reads only the first K values anyway.
    """
    check_quantized(q, scales, zeros, group_size)
    if bits not in (4, 8):
        raise ValueError(f"MatMulNBits layout takes bits 4 or 8, got {bits}")
    if group_size < 16 or group_size & (group_size - 1):
        raise ValueError(f"MatMulNBits needs a power-of-two block size >= 16, got {group_size}")
    n, k = q.shape
    blocks = num_groups(k, group_size)
    padded = np.repeat(zeros.astype(np.uint8), group_size, axis=1)  # pad value = zero point
    padded[:, :k] = q
    codes = padded.reshape(n, blocks, group_size)
    if bits == 4:
        b = (codes[:, :, 0::2] | (codes[:, :, 1::2] << 4)).astype(np.uint8)
        zp = np.zeros((n, 2 * num_groups(blocks, 2)), dtype=np.uint8)
        zp[:, :blocks] = zeros
        zero_points = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8)
    else:
        b = codes.astype(np.uint8)
        zero_points = zeros.astype(np.uint8)
    return {"B": np.ascontiguousarray(b), "scales": np.ascontiguousarray(scales, dtype=np.float32),
            "zero_points": np.ascontiguousarray(zero_points)}


def from_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, k: int,
                      bits: int = 4):
    """The inverse of to_matmul_nbits: -> (q uint8 [N, K], scales [N, blocks], zeros uint8 [N, blocks])."""
    n, blocks, _ = b.shape
    if bits == 4:
        codes = np.empty((n, blocks, b.shape[2] * 2), dtype=np.uint8)
        codes[:, :, 0::2] = b & 0xF
        codes[:, :, 1::2] = b >> 4
        zeros = np.empty((n, zero_points.shape[-1] * 2), dtype=np.uint8)
        zeros[:, 0::2] = zero_points.reshape(n, -1) & 0xF
        zeros[:, 1::2] = zero_points.reshape(n, -1) >> 4
        zeros = zeros[:, :blocks]
    else:
        codes = np.asarray(b, dtype=np.uint8)
        zeros = np.asarray(zero_points, dtype=np.uint8).reshape(n, blocks)
    q = codes.reshape(n, -1)[:, :k]
    return np.ascontiguousarray(q), np.asarray(scales).reshape(n, blocks), np.ascontiguousarray(zeros)


# ---------------------------------------------------------------- ONNX DequantizeLinear (uint4) layout
# Standard ONNX (opset 21+) blocked DequantizeLinear, used by `export --target onnx`.

def to_onnx_uint4_blocked(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int):
    """Quantized weight -> (data, scale, zero_point) for DequantizeLinear(axis=0, block_size=G).

    The weight is stored transposed, [K, N], so that MatMul(X, DequantizeLinear(...)) = X @ w_hat.T.
        data        uint4 [K, N] (returned unpacked as uint8 0..15; the ONNX tensor packs two
                    per byte, element 2i in the low nibble)
        scale       float32 [ceil(K / G), N]
        zero_point  uint4 [ceil(K / G), N] (unpacked uint8 as above)
    Ragged K: ONNX defines the scale's blocked dimension as ceil(K / G), i.e. a short
    last block, which is exactly the checkpoint's grouping; nothing is padded.
    """
    check_quantized(q, scales, zeros, group_size)
    return (np.ascontiguousarray(q.T), np.ascontiguousarray(scales.T, dtype=np.float32),
            np.ascontiguousarray(zeros.T))


def pack_uint4_pairs(values: np.ndarray) -> bytes:
    """uint8 0..15, any shape -> ONNX's packed 4-bit raw data (element 2i low nibble, 2i+1 high)."""
    flat = np.asarray(values, dtype=np.uint8).reshape(-1)
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8).tobytes()
