"""Qwen3.5's gated delta nets and Granite 4.0-H's Mamba-2 mixers in the decoder graph (export.spec.DeltaNet
says what each rule computes).

A step of S tokens (S >= 1: prefill or decode) reads two states the runtime keeps per layer and
returns their next values, all float32 whatever the activations' dtype:

    delta_conv.{i}      [1, kernel - 1, conv_dim]   the convolution's inputs of the tokens before
    delta_state.{i}     [v_heads, k_dim, v_dim]     S of every value head
    delta_conv_new.{i}, delta_state_new.{i}        the same after this step's tokens

Qwen3.5's recurrence runs token by token in an ONNX Scan, whose body is one token's update for all
heads at once (a few batched MatMuls): exact, and at decode one iteration. A Mamba-2's decay is one
number a head and token, so its S tokens run at once as MatMuls (mamba_chunk: its "SSD" form, as
transformers' torch path computes a chunk), S x S a head: the engine feeds at most PREFILL_CHUNK.
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
    """One token of a gated delta net, every value head at once: S = decay S, then S += k (beta (v - S^T k))^T;
    o = S^T q."""
    b = GraphBuilder(np.float32, 21)
    state, q, k, v = "state", "q_t", "k_t", "v_t"
    inputs = [helper.make_tensor_value_info("state", F32, [v_heads, k_dim, v_dim]),
              helper.make_tensor_value_info("q_t", F32, [v_heads, k_dim]),
              helper.make_tensor_value_info("k_t", F32, [v_heads, k_dim]),
              helper.make_tensor_value_info("v_t", F32, [v_heads, v_dim]),
              helper.make_tensor_value_info("decay_t", F32, [v_heads]),
              helper.make_tensor_value_info("beta_t", F32, [v_heads])]
    decayed = b.op("Mul", state, b.op("Reshape", "decay_t", b.int64s(v_heads, 1, 1)))
    written = b.op("Reshape", v, b.int64s(v_heads, 1, v_dim))
    remembered = b.op("MatMul", b.op("Reshape", k, b.int64s(v_heads, 1, k_dim)), decayed)  # [v_heads, 1, v_dim]
    written = b.op("Mul", b.op("Sub", written, remembered), b.op("Reshape", "beta_t", b.int64s(v_heads, 1, 1)))
    k_col = b.op("Reshape", k, b.int64s(v_heads, k_dim, 1))
    b.op("Add", decayed, b.op("MatMul", k_col, written), outputs=["state_out"])
    out = b.op("MatMul", b.op("Reshape", q, b.int64s(v_heads, 1, k_dim)), "state_out")
    b.op("Reshape", out, b.int64s(v_heads, v_dim), outputs=["o_t"])
    outputs = [helper.make_tensor_value_info("state_out", F32, [v_heads, k_dim, v_dim]),
               helper.make_tensor_value_info("o_t", F32, [v_heads, v_dim])]
    return helper.make_graph(b.nodes, "gated_step", inputs, outputs, list(b.initializers.values()))


def chunk_masks(b: GraphBuilder, input_ids: str) -> tuple[str, str]:
    """This step's [S, S] masks, float32, once for every Mamba-2 layer's mamba_chunk: 1 where s < t (after),
    and where s <= t (lower); t the row, s the column."""
    steps = b.op("Reshape", b.op("Gather", b.op("Shape", input_ids), b.int64s(1), axis=0), b.int64s())
    token = b.op("Range", b.const("const/i64/scalar_0", np.int64(0)), steps, b.const("const/i64/scalar_1",
                                                                                        np.int64(1)))
    t_col, s_row = b.op("Unsqueeze", token, b.int64s(1)), b.op("Unsqueeze", token, b.int64s(0))  # [S, 1], [1, S]
    return (b.op("Cast", b.op("Greater", t_col, s_row), to=F32, name="after"),
            b.op("Cast", b.op("GreaterOrEqual", t_col, s_row), to=F32, name="lower"))


def mamba_chunk(b: GraphBuilder, state_in: str, c: str, bk: str, x: str, log_decay: str, d, state_out: str,
                masks: tuple[str, str]) -> str:
    """A Mamba-2's S tokens at once: o_t = sum over s <= t of a(s, t) (C_t . B_s) x_s + a(0, t) C_t S,
    a(s, t) the product of the decays after s through t (exp of their logs' sum, each sum taken whole: no
    difference of two long sums, which would lose digits), and the state after them
    a(0, S) S + sum over s of a(s, S) B_s x_s^T. The same sums as the scan's, in another order; the
    [v_heads, S, S] tensors are passed over four times (their memory traffic is what this costs).
    c, bk: C and B [S, k_heads, k_dim]; x: x times dt [S, v_heads, v_dim]; log_decay: dt times the decay
    rate [S, v_heads], <= 0; masks: chunk_masks'. Returns o [S, v_heads, v_dim]; writes state_out."""
    after, lower = masks
    logs = b.op("Transpose", log_decay, perm=[1, 0])  # [Hv, S]
    # logs[h, i] at [h, i, s] for s < i, summed down to t: the log of a(s, t) where s <= t (0 above the diagonal)
    summed = b.op("CumSum", b.op("Mul", b.op("Unsqueeze", logs, b.int64s(2)), after), b.int64s(1))
    # C_t . B_s for each key head, 0 above the diagonal, times a(s, t) for each value head it serves
    scores = b.op("MatMul", b.op("Transpose", c, perm=[1, 0, 2]), b.op("Transpose", bk, perm=[1, 2, 0]))
    scores = b.op("Mul", scores, lower)
    scores = b.op("Unsqueeze", scores, b.int64s(1))  # [Hk, 1, S, S]
    group = d.v_heads // d.k_heads
    weights = b.op("Mul", b.op("Reshape", b.op("Exp", summed), b.int64s(d.k_heads, group, 0, -1)), scores)
    x_heads = b.op("Transpose", x, perm=[1, 0, 2])  # [Hv, S, Dv]
    o = b.op("MatMul", b.op("Reshape", weights, b.int64s(d.v_heads, -1, 0)), x_heads)
    since_start = b.op("Unsqueeze", b.op("Exp", b.op("CumSum", logs, b.int64s(1))), b.int64s(2))  # a(0, t) [Hv, S, 1]
    c_heads = b.op("Transpose", grouped_heads(b, c, d), perm=[1, 0, 2])  # [Hv, S, Dk]
    o = b.op("Add", o, b.op("Mul", since_start, b.op("MatMul", c_heads, state_in)))
    # the state: a(0, S) S + (B a(s, S))^T x, a(s, S) summed's last row
    last = b.op("Exp", b.op("Gather", summed, b.int64s(-1), axis=1))  # [Hv, 1, S]
    b_heads = b.op("Transpose", grouped_heads(b, bk, d), perm=[1, 2, 0])  # [Hv, Dk, S]
    written = b.op("MatMul", b.op("Mul", b_heads, last), x_heads)  # [Hv, Dk, Dv]
    whole = b.op("Gather", since_start, b.int64s(-1), axis=1)  # [Hv, 1, 1]
    b.op("Add", b.op("Mul", state_in, whole), written, outputs=[state_out])
    return b.op("Transpose", o, perm=[1, 0, 2])


def grouped_heads(b: GraphBuilder, t: str, d) -> str:
    """t [S, k_heads, k_dim] -> [S, v_heads, k_dim]: each key head's for the v_heads / k_heads value heads it serves."""
    group = d.v_heads // d.k_heads
    if group == 1:
        return t
    t = b.op("Expand", b.op("Unsqueeze", t, b.int64s(2)), b.int64s(1, 1, group, 1))
    return b.op("Reshape", t, b.int64s(-1, d.v_heads, d.k_dim))


def rms_normed(b: GraphBuilder, t: str, eps: float) -> str:
    """t / sqrt(mean(t^2) + eps) over the last axis, float32."""
    mean = b.reduce_mean_last(b.op("Mul", t, t))
    root = b.op("Sqrt", b.op("Add", mean, b.const("const/f32/eps", np.float32(eps))))
    return b.op("Mul", t, b.op("Reciprocal", root))


def l2_normed_heads(b: GraphBuilder, x: str, heads: int, dim: int) -> str:
    """x [S, heads x dim] -> [S, heads, dim], each head divided by its L2 norm (+ L2_EPS inside the root)."""
    x = b.op("Reshape", x, b.int64s(-1, heads, dim))
    total = b.op("ReduceSum", b.op("Mul", x, x), b.int64s(-1), keepdims=1)
    return b.op("Mul", x, b.op("Reciprocal", b.op("Sqrt", b.op("Add", total, b.const("const/f32/l2_eps",
                                                                                       np.float32(L2_EPS))))))


def delta_block(dec, x: str, i: int) -> str:
    """The delta net (Mamba-2) of layer i on its normed input x [1, S, hidden] (act dtype); its output [1, S, hidden].
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
    y = b.const(f"{p}.conv1d.bias", dec.tensor(f"{p}.conv1d.bias").astype(np.float32)) if d.conv_bias else None
    for j in range(d.kernel):
        end = j - (d.kernel - 1)
        tap = b.op("Slice", rows, b.int64s(j), b.int64s(end if end < 0 else 2**62), b.int64s(1))
        tap = b.op("Mul", tap, b.const(f"{p}.conv1d.weight.{j}", weight[:, j]))
        y = tap if y is None else b.op("Add", y, tap)
    y = b.op("Mul", y, b.op("Sigmoid", y))  # SiLU
    y = b.op("Reshape", y, b.int64s(-1, d.conv_dim))  # [S, conv]
    starts = d.conv_parts
    q, k, v = (b.op("Slice", y, b.int64s(start), b.int64s(start + width), b.int64s(1))
               for start, width in zip(starts, (d.key_dim, d.key_dim, d.value_dim)))

    # decay = exp(-exp(A_log) dt), dt = softplus(a + dt_bias) (a Mamba-2's clamped); a a float linear of x
    x32 = b.op("Reshape", to_f32(x), b.int64s(-1, spec.hidden))
    a_proj = b.op("MatMul", x32, b.const(f"{p}.in_proj_a.weight",
                                         dec.tensor(f"{p}.in_proj_a.weight").astype(np.float32).T))  # [S, Hv]
    dt = b.op("Softplus", b.op("Add", a_proj, b.const(f"{p}.dt_bias", dec.tensor(f"{p}.dt_bias").astype(np.float32))))
    if d.dt_min > 0 or d.dt_max is not None:
        dt = b.op("Clip", dt, b.const(f"{p}.dt_min", np.float32(d.dt_min)),
                  b.const(f"{p}.dt_max", np.float32(np.inf if d.dt_max is None else d.dt_max)))
    rate = -np.exp(dec.tensor(f"{p}.A_log").astype(np.float32))
    log_decay = b.op("Mul", dt, b.const(f"{p}.decay_rate", rate))
    v = b.op("Reshape", v, b.int64s(-1, d.v_heads, d.v_dim))
    z = b.op("Reshape", to_f32(z), b.int64s(-1, d.v_heads, d.v_dim))
    silu_z = b.op("Mul", z, b.op("Sigmoid", z))
    norm = b.const(f"{p}.norm.weight", dec.tensor(f"{p}.norm.weight").astype(np.float32))
    if d.rule == "gated":
        # q and k L2-normed per key head (q also / sqrt(k_dim)); beta = sigmoid(b), b a float linear of x
        q = b.op("Mul", l2_normed_heads(b, q, d.k_heads, d.k_dim),
                 b.const("const/f32/delta_q_scale", np.float32(d.k_dim ** -0.5)))
        k = l2_normed_heads(b, k, d.k_heads, d.k_dim)
        beta = b.op("Sigmoid", b.op("MatMul", x32, b.const(f"{p}.in_proj_b.weight", dec.tensor(
            f"{p}.in_proj_b.weight").astype(np.float32).T)))
        _, o = b.op("Scan", state_in, grouped_heads(b, q, d), grouped_heads(b, k, d), v, b.op("Exp", log_decay), beta,
                    outputs=[state_out, b.name("o")], body=scan_body(d.v_heads, d.k_dim, d.v_dim),
                    num_scan_inputs=5, name="recurrence")
        o = b.op("Mul", b.op("Mul", rms_normed(b, o, spec.eps), norm), silu_z)  # rms_norm(o) w silu(z), by head
    else:
        # C and B (q, k) as they are; x (v) written times dt; o + D x, times silu(z), rms-normed by group, times w
        q, k = (b.op("Reshape", t, b.int64s(-1, d.k_heads, d.k_dim)) for t in (q, k))
        written = b.op("Mul", v, b.op("Unsqueeze", dt, b.int64s(-1)))
        o = mamba_chunk(b, state_in, q, k, written, log_decay, d, state_out, dec.chunk_masks)
        skip = b.const(f"{p}.D", dec.tensor(f"{p}.D").astype(np.float32).reshape(d.v_heads, 1))
        o = b.op("Mul", b.op("Add", o, b.op("Mul", v, skip)), silu_z)
        o = b.op("Reshape", o, b.int64s(-1, d.k_heads, d.norm_width))
        o = b.op("Mul", b.op("Reshape", rms_normed(b, o, spec.eps), b.int64s(-1, d.value_dim)), norm)
    o = b.op("Reshape", o, b.int64s(1, -1, d.value_dim))
    if b.act_type != F32:
        o = b.cast(o, b.act_type)
    return dec.linear(o, f"{p}.out_proj")
