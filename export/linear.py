"""The three ways to emit a W4A16 linear, plus the lm_head.

    ort   com.microsoft MatMulNBits (bits 4, block = group size, uint8 zero points)
    trt   awq_edge AwqMatMulW4A16 (plugins/README.md), weights via packing.pack_for_plugin
    onnx  standard DequantizeLinear (uint4, blocked along K) + MatMul

All three compute Y = X @ w_hat.T (+ bias) with w_hat = packing.dequantize(q, scales, zeros, G),
the value the reference model uses.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from ..checkpoint import QuantizedLinear
from ..packing import (num_groups, pack_for_plugin, pack_uint4_pairs, to_matmul_nbits,
                       to_onnx_uint4_blocked)
from .builder import MS_DOMAIN, GraphBuilder

PLUGIN_OP = "AwqMatMulW4A16"
PLUGIN_DOMAIN = "awq_edge"
PLUGIN_VERSION = "1"


def _add_bias(b: GraphBuilder, y: str, lin: QuantizedLinear, name: str) -> str:
    if lin.bias is None:
        return y
    return b.op("Add", y, b.act_const(f"{name}.bias", lin.bias.astype(np.float32)))


def _in_order(b: GraphBuilder, x: str, lin: QuantizedLinear, name: str) -> str:
    """x's columns in the order the linear's levels are stored (GPTQ act-order: a Gather), else x."""
    if lin.order is None:
        return x
    return b.op("Gather", x, b.const(f"{name}.input_order", lin.order.astype(np.int64)), axis=-1,
                full_name=f"{name}/input_order")


def matmul_nbits(b: GraphBuilder, x: str, lin: QuantizedLinear, name: str, accuracy_level: int) -> str:
    """ort: one MatMulNBits node. accuracy_level 0 computes in fp32 (exact to rounding);
    4 quantizes X to int8 per block inside the kernel (AVX-VNNI/AVX512 int8 dot products)."""
    n, k = lin.q.shape
    t = to_matmul_nbits(lin.q, lin.scales, lin.zeros, lin.group_size, bits=4)
    y = b.op("MatMulNBits", _in_order(b, x, lin, name), b.const(f"{name}.B", t["B"]),
             b.act_const(f"{name}.scales", t["scales"]), b.const(f"{name}.zero_points", t["zero_points"]),
             domain=MS_DOMAIN, full_name=name, K=k, N=n, bits=4, block_size=lin.group_size,
             accuracy_level=accuracy_level)
    return _add_bias(b, y, lin, name)


def awq_plugin(b: GraphBuilder, x: str, lin: QuantizedLinear, name: str) -> str:
    """trt: one AwqMatMulW4A16 node exactly as plugins/README.md defines it."""
    n, k = lin.q.shape
    t = pack_for_plugin(lin.q, lin.scales, lin.zeros, lin.group_size)
    y = b.op(PLUGIN_OP, x, b.const(f"{name}.qweight", t["qweight"]),
             b.const(f"{name}.scales", t["scales"]), b.const(f"{name}.zeros", t["zeros"]),
             domain=PLUGIN_DOMAIN, full_name=name, K=k, N=n, group_size=lin.group_size,
             plugin_version=PLUGIN_VERSION, plugin_namespace="")
    return _add_bias(b, y, lin, name)


def dequantize_matmul(b: GraphBuilder, x: str, lin: QuantizedLinear, name: str) -> str:
    """onnx: DequantizeLinear(uint4 [K, N], axis 0, block_size G) then MatMul.

    ONNX gives the blocked scale ceil(K / G) rows, so a ragged K (576 at G 128) keeps its
    short last block and needs no padding; ORT 1.31 accepts it."""
    n, k = lin.q.shape
    data, scale, zero = to_onnx_uint4_blocked(lin.q, lin.scales, lin.zeros, lin.group_size)
    w = b.op("DequantizeLinear",
             b.raw_const(f"{name}.weight_uint4", TensorProto.UINT4, data.shape, pack_uint4_pairs(data)),
             b.act_const(f"{name}.scale", scale),
             b.raw_const(f"{name}.zero_point", TensorProto.UINT4, zero.shape, pack_uint4_pairs(zero)),
             full_name=f"{name}/dequantize", axis=0, block_size=lin.group_size)
    y = b.op("MatMul", _in_order(b, x, lin, name), w, full_name=name)
    return _add_bias(b, y, lin, name)


# ---------------------------------------------------------------- lm_head

def quantize_blockwise(w: np.ndarray, bits: int, block: int):
    """Round-to-nearest asymmetric block quantization of a float [N, K] matrix (the lm_head).

    -> (q uint8 [N, K], scales float32 [N, blocks], zeros uint8 [N, blocks]); the range of each
    block always includes 0, so zero maps exactly."""
    n, k = w.shape
    blocks = num_groups(k, block)
    qmax = (1 << bits) - 1
    q, scales, zeros = np.empty((n, k), np.uint8), np.empty((n, blocks), np.float32), np.empty((n, blocks), np.uint8)
    for start in range(0, n, 4096):  # rows at a time: float32 copies of a whole 7B head are GBs
        rows = slice(start, start + 4096)
        padded = np.pad(w[rows].astype(np.float32), ((0, 0), (0, blocks * block - k)), mode="edge")
        wb = padded.reshape(len(padded), blocks, block)
        hi, lo = np.maximum(wb.max(-1), 0), np.minimum(wb.min(-1), 0)
        part_scales = np.maximum(hi - lo, 1e-10) / qmax
        part_zeros = np.clip(np.round(-lo / part_scales), 0, qmax)
        part_q = np.clip(np.round(wb / part_scales[..., None]) + part_zeros[..., None], 0, qmax)
        q[rows], scales[rows], zeros[rows] = part_q.reshape(len(padded), -1)[:, :k], part_scales, part_zeros
    return q, scales, zeros


def lm_head_quantized(b: GraphBuilder, x: str, weight: np.ndarray, bits: int, block: int,
                      accuracy_level: int) -> str:
    """ort: the lm_head as an 8- or 4-bit MatMulNBits built from the float weight [V, H]."""
    q, scales, zeros = quantize_blockwise(weight, bits, block)
    t = to_matmul_nbits(q, scales, zeros, block, bits=bits)
    n, k = weight.shape
    return b.op("MatMulNBits", x, b.const(f"lm_head.q{bits}.B", t["B"]),
                b.act_const(f"lm_head.q{bits}.scales", t["scales"]),
                b.const(f"lm_head.q{bits}.zero_points", t["zero_points"]),
                domain=MS_DOMAIN, full_name="lm_head", K=k, N=n, bits=bits, block_size=block,
                accuracy_level=accuracy_level)


def lm_head_float(b: GraphBuilder, x2d: str, weight_name: str) -> str:
    """The float lm_head as Gemm(X [M, H], W [V, H], transB): W is the [V, H] table itself, so a
    tied embedding is stored once."""
    return b.op("Gemm", x2d, weight_name, full_name="lm_head", transB=1)
