"""Qwen3.5's gated delta net in the decoder graph (export.spec.DeltaNet says what it computes).

A step of S tokens (S >= 1: prefill or decode) reads two states the runtime keeps per layer and
returns their next values, all float32 whatever the activations' dtype:

    delta_conv.{i}      [1, kernel - 1, conv_dim]   the convolution's inputs of the tokens before
    delta_state.{i}     [v_heads, k_dim, v_dim]     S of every value head
    delta_conv_new.{i}, delta_state_new.{i}        the same after this step's tokens

The recurrence runs token by token in an ONNX Scan, whose body is one token's update for all
heads at once (a few batched MatMuls): exact, and at decode one iteration.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ..checkpoint import concat_linears
from .builder import GraphBuilder

F32 = TensorProto.FLOAT
L2_EPS = 1e-6  # transformers' l2norm of q and k (FLA's)


def state_names(i: int) -> tuple[str, str, str, str]:
    """(conv in, state in, conv out, state out) of delta-net layer i: the graph's I/O names."""
    return f"delta_conv.{i}", f"delta_state.{i}", f"delta_conv_new.{i}", f"delta_state_new.{i}"


def scan_body(v_heads: int, k_dim: int, v_dim: int) -> "helper.GraphProto":
    """One token: S = decay S; S += k (beta (v - S^T k))^T; o = S^T q, every value head at once."""
    b = GraphBuilder(np.float32, 21)
    state, q, k, v = "state", "q_t", "k_t", "v_t"
    inputs = [helper.make_tensor_value_info("state", F32, [v_heads, k_dim, v_dim]),
              helper.make_tensor_value_info("q_t", F32, [v_heads, k_dim]),
              helper.make_tensor_value_info("k_t", F32, [v_heads, k_dim]),
              helper.make_tensor_value_info("v_t", F32, [v_heads, v_dim]),
              helper.make_tensor_value_info("decay_t", F32, [v_heads]),
              helper.make_tensor_value_info("beta_t", F32, [v_heads])]
    decayed = b.op("Mul", state, b.op("Reshape", "decay_t", b.int64s(v_heads, 1, 1)))
    k_row = b.op("Reshape", k, b.int64s(v_heads, 1, k_dim))
    remembered = b.op("MatMul", k_row, decayed)  # [v_heads, 1, v_dim]: S^T k
    delta = b.op("Mul", b.op("Sub", b.op("Reshape", v, b.int64s(v_heads, 1, v_dim)), remembered),
                 b.op("Reshape", "beta_t", b.int64s(v_heads, 1, 1)))
    k_col = b.op("Reshape", k, b.int64s(v_heads, k_dim, 1))
    b.op("Add", decayed, b.op("MatMul", k_col, delta), outputs=["state_out"])
    out = b.op("MatMul", b.op("Reshape", q, b.int64s(v_heads, 1, k_dim)), "state_out")
    b.op("Reshape", out, b.int64s(v_heads, v_dim), outputs=["o_t"])
    outputs = [helper.make_tensor_value_info("state_out", F32, [v_heads, k_dim, v_dim]),
               helper.make_tensor_value_info("o_t", F32, [v_heads, v_dim])]
    return helper.make_graph(b.nodes, "delta_step", inputs, outputs, list(b.initializers.values()))


def l2_normed_heads(b: GraphBuilder, x: str, heads: int, dim: int) -> str:
    """x [S, heads x dim] -> [S, heads, dim], each head divided by its L2 norm (+ L2_EPS inside the root)."""
    x = b.op("Reshape", x, b.int64s(-1, heads, dim))
    total = b.op("ReduceSum", b.op("Mul", x, x), b.int64s(-1), keepdims=1)
    return b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", total, b.const("const/f32/l2_eps",
                                                                                       np.float32(L2_EPS))))))


def delta_block(dec, x: str, i: int) -> str:
    """The delta net of layer i on its normed input x [1, S, hidden] (act dtype); its output [1, S, hidden].
    dec: the export.graph.Decoder (its builder, spec, linears and tensors)."""
    b, spec = dec.b, dec.spec
    d, p = spec.delta, f"model.layers.{i}.linear_attn"
    conv_in, state_in, conv_out, state_out = state_names(i)
    to_f32 = (lambda t: t) if b.act_type == F32 else (lambda t: b.cast(t, F32))

    # q, k, v and z: one MatMulNBits on the ort target (one read of x; the native decode's in_proj_qkvz op)
    fused = None
    if dec.t.name == "ort":
        try:
            fused = concat_linears([dec.linear_weights(f"{p}.in_proj_qkv"), dec.linear_weights(f"{p}.in_proj_z")])
        except ValueError:  # (GPTQ act-order linears of one input in different orders: two MatMulNBits)
            pass
    if fused is not None:
        qkvz = dec.linear(x, f"{p}.in_proj_qkvz", fused)
        qkv, z = b.op("Split", qkvz, b.int64s(d.conv_dim, d.value_dim), axis=-1, outputs=2)
    else:
        qkv, z = dec.linear(x, f"{p}.in_proj_qkv"), dec.linear(x, f"{p}.in_proj_z")
    # q, k and v through the causal convolution: kernel tap j reads the token kernel - 1 - j back
    rows = b.op("Concat", conv_in, to_f32(qkv), axis=1)  # [1, kernel - 1 + S, conv]
    b.op("Slice", rows, b.int64s(-(d.kernel - 1)), b.int64s(2**62), b.int64s(1), outputs=[conv_out])
    weight = dec.tensor(f"{p}.conv1d.weight").astype(np.float32).reshape(d.conv_dim, d.kernel)
    y = None
    for j in range(d.kernel):
        end = j - (d.kernel - 1)
        tap = b.op("Slice", rows, b.int64s(j), b.int64s(end if end < 0 else 2**62), b.int64s(1))
        tap = b.op("Mul", tap, b.const(f"{p}.conv1d.weight.{j}", weight[:, j]))
        y = tap if y is None else b.op("Add", y, tap)
    y = b.op("Mul", y, b.op("Sigmoid", y))  # SiLU
    y = b.op("Reshape", y, b.int64s(-1, d.conv_dim))  # [S, conv]
    q, k, v = b.op("Split", y, b.int64s(d.key_dim, d.key_dim, d.value_dim), axis=-1, outputs=3)

    # q and k L2-normed per key head (q also / sqrt(k_dim)), each key head's serving v_heads / k_heads value heads
    group = d.v_heads // d.k_heads
    heads = []
    for t, scale in ((q, d.k_dim ** -0.5), (k, None)):
        t = l2_normed_heads(b, t, d.k_heads, d.k_dim)
        if scale is not None:
            t = b.op("Mul", t, b.const("const/f32/delta_q_scale", np.float32(scale)))
        if group > 1:
            t = b.op("Expand", b.op("Unsqueeze", t, b.int64s(2)), b.int64s(1, 1, group, 1))
            t = b.op("Reshape", t, b.int64s(-1, d.v_heads, d.k_dim))
        heads.append(t)
    v = b.op("Reshape", v, b.int64s(-1, d.v_heads, d.v_dim))

    # beta = sigmoid(b); decay = exp(-exp(A_log) softplus(a + dt_bias)); b and a float linears of x
    x32 = b.op("Reshape", to_f32(x), b.int64s(-1, spec.hidden))
    weights = {n: dec.tensor(f"{p}.{n}.weight").astype(np.float32).T for n in ("in_proj_b", "in_proj_a")}
    b_proj, a_proj = (b.op("MatMul", x32, b.const(f"{p}.{n}.weight", w)) for n, w in weights.items())  # [hidden, Hv]
    beta = b.op("Sigmoid", b_proj)
    a = b.op("Add", a_proj, b.const(f"{p}.dt_bias", dec.tensor(f"{p}.dt_bias").astype(np.float32)))
    rate = -np.exp(dec.tensor(f"{p}.A_log").astype(np.float32))
    decay = b.op("Exp", b.op("Mul", b.op("Softplus", a), b.const(f"{p}.decay_rate", rate)))

    _, o = b.op("Scan", state_in, heads[0], heads[1], v, decay, beta, outputs=[state_out, b.name("o")],
                body=scan_body(d.v_heads, d.k_dim, d.v_dim), num_scan_inputs=5, name="recurrence")

    # rms_norm(o) * norm.weight * silu(z) per value head, then out_proj
    mean = b.reduce_mean_last(b.op("Mul", o, o))
    o = b.op("Mul", o, b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean, b.const("const/f32/eps",
                                                                                  np.float32(spec.eps))))))
    o = b.op("Mul", o, b.const(f"{p}.norm.weight", dec.tensor(f"{p}.norm.weight").astype(np.float32)))
    z = b.op("Reshape", to_f32(z), b.int64s(-1, d.v_heads, d.v_dim))
    o = b.op("Mul", o, b.op("Mul", z, b.op("Sigmoid", z)))
    o = b.op("Reshape", o, b.int64s(1, -1, d.value_dim))
    if b.act_type != F32:
        o = b.cast(o, b.act_type)
    return dec.linear(o, f"{p}.out_proj")
