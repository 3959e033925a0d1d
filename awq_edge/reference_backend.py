"""The numpy twin of the cuda backend: a native engine's decoder step (awq_edge/decoder.py),
run op by op on the CPU with the kernels' arithmetic.

    backend = ReferenceBackend(Path("engines/smollm2-orin"), max_context=512)
    logits = backend.forward(prompt_ids)     # float32 [V] of the last token
    logits = backend.forward([next_id])

It reads the engine's weights.bin (memory-mapped) and runs decode_ops(spec) with one numpy
function per kernel (the twin_* functions below): fp16 buffers between ops, fp32 inside each,
the int4 weights dequantized exactly as the kernels do ((q - z) * s rounded to fp16 once).
CI checks it against the ONNX Runtime engine for SmolLM2 and every family
(tests/test_native_engine.py), which proves the op list, the packed layouts and the families
without a GPU; on a GPU, each kernel is then checked against its twin. It implements the
backend interface (forward, rewind, position, max_context, vocab_size, kv_bytes), so an
Engine can run on it too (slowly: it is a reference, not a runtime).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .decoder import DecoderSpec, buffer_shapes, decode_ops, step_ids
from .engine_dir import DecoderInfo, check_files, read_decoder_info, read_manifest
from .errors import UserError
from .packing import dequantize, dequantize_rows_int8, unpack_int4

F16, F32 = np.float16, np.float32
ERF = np.vectorize(math.erf, otypes=[np.float64])  # (numpy has no erf; exact GELU's)


def load_tensors(folder: Path, info: DecoderInfo) -> dict[str, np.ndarray]:
    """Every tensor of weights.bin as a read-only memory map (nothing is read until used)."""
    data = np.memmap(Path(folder) / info.weights_file, dtype=np.uint8, mode="r")
    return {name: data[offset:offset + np.dtype(dtype).itemsize * int(np.prod(shape))].view(dtype).reshape(shape)
            for name, (dtype, shape, offset) in info.tensors.items()}


# ---------------------------------------------------------------- the kernels' twins

def twin_gather(x: np.ndarray, order: np.ndarray) -> np.ndarray:
    """x fp16 [S, K]'s columns in a GPTQ act-order linear's order (decoder_ops.cu awq_gather_columns)."""
    return x[:, order]


def twin_embed(ids: np.ndarray, table: np.ndarray, scale: float | None, scales: np.ndarray | None = None) -> np.ndarray:
    """table fp16 [V, hidden], or int8 with fp16 scales [V, ceil(hidden / 32)] (row_ops.cuh embed_row_q8)."""
    rows = dequantize_rows_int8(table[ids], scales[ids]) if scales is not None else table[ids].astype(F32)
    return (rows * F32(scale) if scale else rows).astype(F16)


def twin_add_positions(h: np.ndarray, table: np.ndarray, past: int) -> np.ndarray:
    """GPT-2's learned positions (decoder_ops.cu awq_add_positions): h fp16 [rows, hidden] plus the
    table's rows past.. (fp16 [max_positions, hidden]), each sum rounded to fp16."""
    return (h.astype(F32) + table[past:past + h.shape[0]].astype(F32)).astype(F16)


def twin_norm(x: np.ndarray, weight: np.ndarray, eps: float, bias: np.ndarray | None = None) -> np.ndarray:
    """x fp16 [rows, n], weight float32 [n] (the family's offset folded in) -> fp16; with a bias
    float32 [n], LayerNorm: (x - mean) / sqrt(var + eps) * weight + bias (the kernels' two passes)."""
    x32 = x.astype(F32)
    if bias is not None:
        centered = x32 - np.mean(x32, axis=-1, keepdims=True)
        inv = 1.0 / np.sqrt(np.mean(centered * centered, axis=-1, keepdims=True) + F32(eps))
        return (centered * inv * weight + bias).astype(F16)
    inv = 1.0 / np.sqrt(np.mean(x32 * x32, axis=-1, keepdims=True) + F32(eps))
    return (x32 * inv * weight).astype(F16)


def twin_residual(h: np.ndarray, y: np.ndarray) -> np.ndarray:
    """h + y rounded to fp16 (the residual epilogue; add_norm's add is the same)."""
    return (h.astype(F32) + y.astype(F32)).astype(F16)


def twin_add_norm(x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float,
                      bias: np.ndarray | None = None):
    """(norm(residual + x), residual + x), both fp16: the residual add fused into the norm."""
    total = twin_residual(residual, x)
    return twin_norm(total, weight, eps, bias), total


def dequantized(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """W_hat float32 [N, K] with the kernels' values: (q - z) * s rounded to fp16 once."""
    q = unpack_int4(qweight)
    return dequantize(q, scales, zeros.astype(np.uint8), group_size).astype(F16).astype(F32)


def twin_linear(x: np.ndarray, w_hat: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = x.astype(F32) @ w_hat.T
    if bias is not None:
        y = y.astype(F16).astype(F32) + bias.astype(F32)  # the kernel adds the bias to the fp16 output
    return y.astype(F16)


def twin_head_norm(x: np.ndarray, offset: int, heads: int, head_dim: int, weight: np.ndarray, eps: float) -> None:
    """RMSNorm of each head of x[:, offset:offset + heads * head_dim], in place (Qwen3, Gemma3 q/k
    norms; OLMo 2's are one head as wide as all)."""
    block = x[:, offset:offset + heads * head_dim]
    rows = block.reshape(-1, head_dim)
    block[...] = twin_norm(rows, weight, eps).reshape(block.shape)


def twin_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Hugging Face rotate_half RoPE of x fp16 [S, heads, D] at the tables' rows [S, D/2] -> fp16."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].astype(F32), x[..., half:].astype(F32)
    c, s = cos.astype(F32)[:, None, :], sin.astype(F32)[:, None, :]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(F16)


def twin_rope_in_place(qkv: np.ndarray, heads: int, head_dim: int, past: int, cos: np.ndarray,
                       sin: np.ndarray) -> None:
    """awq_rope_in_place's twin: the first `heads` heads of each q/k/v row fp16 [S, width] (q's and
    k's) rotated in place at positions past..past+S-1 (Hunyuan: before its q/k norms)."""
    S, width = qkv.shape[0], heads * head_dim
    positions = past + np.arange(S)
    rotated = twin_rope(qkv[:, :width].reshape(S, heads, head_dim), cos[positions], sin[positions])
    qkv[:, :width] = rotated.reshape(S, width)


def twin_rope_store(q: np.ndarray, k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                    past: int, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """awq_rope_store's twin (and the q/k/v GEMV's rope epilogue's): q [S, H, D], k/v [S, Hkv, D]
    fp16; writes k rotated and v into the caches [Hkv, capacity, D] at rows past..past+S-1;
    returns q rotated, fp16 [S, H, D]. No tables (cos None): q and k rotated already (a rope op)."""
    S = q.shape[0]
    positions = past + np.arange(S)
    rotate = (lambda x: x.copy()) if cos is None else (lambda x: twin_rope(x, cos[positions], sin[positions]))
    k_cache[:, past:past + S] = rotate(k).transpose(1, 0, 2)
    v_cache[:, past:past + S] = v.transpose(1, 0, 2)
    return rotate(q)


def key_scores(q: np.ndarray, keys: np.ndarray, scale: float, softcap: float) -> np.ndarray:
    """scale * q.k of one query (float32 [D]) against key rows (fp16, or their float32 copy), soft-capped: fp32."""
    scores = keys.astype(F32, copy=False) @ q * F32(scale)
    return F32(softcap) * np.tanh(scores / F32(softcap)) if softcap > 0 else scores


def twin_attend(q_rot: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, window: int, scale: float,
                softcap: float, sinks: np.ndarray | None = None) -> np.ndarray:
    """The attend kernels' twin: q_rot fp16 [S, H, D] at positions past..past+S-1 over the caches,
    causally (and within the window), fp32 scores and softmax (sinks: float32 [H], each head's logit
    in its denominator, attention.cu sink_term); returns fp16 [S, H * D]."""
    S, H, D = q_rot.shape
    Hkv = k_cache.shape[0]
    out = np.empty((S, H, D), F16)
    keys = k_cache[:, :past + S].astype(F32)
    values = v_cache[:, :past + S].astype(F32)
    j = np.arange(past + S)
    for s, pos in enumerate(past + np.arange(S)):
        visible = (j <= pos) & ((j > pos - window) if window > 0 else True)
        for h in range(H):
            kv = h // (H // Hkv)
            scores = np.where(visible, key_scores(q_rot[s, h].astype(F32), keys[kv], scale, softcap), -np.inf)
            p = np.exp(scores - scores.max())
            out[s, h] = (p @ values[kv] / (p.sum() + sink_term(sinks, h, scores.max()))).astype(F16)
    return out.reshape(S, H * D)


def sink_term(sinks: np.ndarray | None, h: int, max_score) -> F32:
    """What head h's sink adds to a softmax's sum whose scores were exponentiated against max_score (0 without)."""
    return F32(0) if sinks is None else np.exp(F32(sinks[h]) - F32(max_score))


def twin_attend_tiles(q_rot: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int, window: int,
                      scale: float, softcap: float, tile_keys: int = 128) -> np.ndarray:
    """One query of awq_attend as it computes it: q_rot fp16 [H, D] at position pos, the visible
    keys walked in tiles of tile_keys from the first, an online softmax (running max and sum, the
    V-weighted sum rescaled when the max moves), fp32. -> fp16 [H * D]. (twin_attend is the same
    function in one softmax; this one checks the tile arithmetic.)"""
    H, D = q_rot.shape
    Hkv = k_cache.shape[0]
    first = max(0, pos - window + 1) if window > 0 else 0
    out = np.empty((H, D), F16)
    for h in range(H):
        kv, q = h // (H // Hkv), q_rot[h].astype(F32)
        running_max, running_sum, acc = -np.inf, F32(0), np.zeros(D, F32)
        for begin in range(first, pos + 1, tile_keys):
            keys = slice(begin, min(pos + 1, begin + tile_keys))
            scores = key_scores(q, k_cache[kv, keys], scale, softcap)
            new_max = max(running_max, scores.max())
            rescale = np.exp(running_max - new_max)
            p = np.exp(scores - new_max)
            running_sum = running_sum * rescale + p.sum()
            acc = acc * rescale + p @ v_cache[kv, keys].astype(F32)
            running_max = new_max
        out[h] = (acc / running_sum).astype(F16)
    return out.reshape(-1)


def twin_attend_block(q_rot: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, window: int,
                      scale: float, softcap: float, block_queries: int = 16, sinks: np.ndarray | None = None
                      ) -> np.ndarray:
    """Prefill attention as awq_attend_block computes it: q_rot fp16 [S, H, D] at positions
    past..past+S-1; per head, blocks of block_queries tokens walk the keys any of them sees in
    tiles of 4096 / D from the block's first visible key, each token with its own online softmax
    (a tile a token sees nothing of changes nothing), fp32. -> fp16 [S, H * D]."""
    S, H, D = q_rot.shape
    Hkv, tile = k_cache.shape[0], 4096 // D
    out = np.empty((S, H, D), F16)
    for h in range(H):
        kv = h // (H // Hkv)
        for t0 in range(0, S, block_queries):
            tokens = np.arange(t0, min(S, t0 + block_queries))
            pos = past + tokens
            first = np.maximum(0, pos - window + 1) if window > 0 else np.zeros_like(pos)
            q = q_rot[tokens, h].astype(F32)
            running_max, running_sum = np.full(len(tokens), -np.inf, F32), np.zeros(len(tokens), F32)
            acc = np.zeros((len(tokens), D), F32)
            for begin in range(int(first[0]), int(pos[-1]) + 1, tile):
                j = np.arange(begin, min(int(pos[-1]) + 1, begin + tile))
                scores = np.stack([key_scores(row, k_cache[kv, j], scale, softcap) for row in q])
                visible = (j[None, :] >= first[:, None]) & (j[None, :] <= pos[:, None])
                scores = np.where(visible, scores, -np.inf)
                new_max = np.maximum(running_max, scores.max(axis=1))
                seen = new_max > -np.inf
                rescale = np.where(seen, np.exp(running_max - np.where(seen, new_max, 0)), F32(1))
                p = np.where(visible, np.exp(scores - np.where(seen, new_max, 0)[:, None]), F32(0))
                running_sum = running_sum * rescale + p.sum(axis=1)
                acc = acc * rescale[:, None] + p @ v_cache[kv, j].astype(F32)
                running_max = new_max
            total = running_sum + np.array([sink_term(sinks, h, m) for m in running_max], F32)
            out[tokens, h] = (acc / total[:, None]).astype(F16)
    return out.reshape(S, H * D)


def twin_attend_split(q_rot: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos: int, window: int,
                      scale: float, softcap: float, split_keys: int = 128, sinks: np.ndarray | None = None
                      ) -> np.ndarray:
    """Decode attention as awq_attend_split computes it (flash-decoding): q_rot fp16 [H, D] at
    position pos over the caches [Hkv, capacity, D]; each split of split_keys keys keeps its
    softmax state (max, sum, V-weighted sum, fp32), then the splits are merged. -> fp16 [H * D]."""
    H, D = q_rot.shape
    Hkv, capacity = k_cache.shape[0], k_cache.shape[1]
    first = max(0, pos - window + 1) if window > 0 else 0
    out = np.empty((H, D), F16)
    for h in range(H):
        kv, q = h // (H // Hkv), q_rot[h].astype(F32)
        states = []
        for lo in range(0, capacity, split_keys):
            begin, end = max(first, lo), min(pos + 1, lo + split_keys)
            if begin >= end:  # a split with no visible key
                states.append((-np.inf, F32(0), np.zeros(D, F32)))
                continue
            scores = key_scores(q, k_cache[kv, begin:end], scale, softcap)
            p = np.exp(scores - scores.max())
            states.append((scores.max(), p.sum(), p @ v_cache[kv, begin:end].astype(F32)))
        m = max(state[0] for state in states)
        weights = [np.exp(mc - m) if mc > -np.inf else F32(0) for mc, _, _ in states]
        total = sum(w * s for w, (_, s, _) in zip(weights, states)) + sink_term(sinks, h, m)
        out[h] = (sum(w * acc for w, (_, _, acc) in zip(weights, states)) / total).astype(F16)
    return out.reshape(-1)


def twin_act(gate_up: np.ndarray, kind: str, gated: bool = True, params: np.ndarray | None = None) -> np.ndarray:
    """act(gate) * up of gate_up fp16 [rows, 2 I] (interleaved: gate j at 2j, up j at 2j + 1)
    -> fp16 [rows, I]; not gated: act(up) of up fp16 [rows, I]. The GEMV's act epilogue rounds
    its sums to fp16 first, the same. params: xielu's (a_p, a_n, beta, eps), export.spec.xielu_constants."""
    g = gate_up[:, 0::2].astype(F32) if gated else gate_up.astype(F32)
    if kind == "silu":
        a = g / (1.0 + np.exp(-g))
    elif kind == "relu2":
        a = np.maximum(g, F32(0)) ** 2
    elif kind == "relu":
        a = np.maximum(g, F32(0))
    elif kind == "xielu":
        a_p, a_n, beta, eps = (F32(v) for v in params)
        a = np.where(g > 0, a_p * g * g + beta * g, (np.exp(np.minimum(g, eps)) - F32(1) - g) * a_n + beta * g)
    elif kind == "gelu":  # exact, erf in float64 (the kernels' erff is within 2 ulp of it)
        a = (0.5 * g * (1.0 + ERF(g.astype(np.float64) / math.sqrt(2.0)))).astype(F32)
    else:  # gelu_tanh
        a = 0.5 * g * (1.0 + np.tanh(F32(math.sqrt(2.0 / math.pi)) * (g + F32(0.044715) * g * g * g)))
    return (a * gate_up[:, 1::2].astype(F32) if gated else a).astype(F16)


def twin_moe_route(x: np.ndarray, router: np.ndarray, router_bias: np.ndarray | None, expert_bias: np.ndarray | None,
                   top_k: int, normalize: bool, sigmoid: bool, scale: float) -> tuple[list[int], np.ndarray]:
    """awq_moe_route's twin for one row x fp16 [hidden]: the router's logits (float32 rows [E, hidden];
    gpt-oss's bias added), their softmax (or sigmoids), the top_k of those plus the expert biases, one
    by one (the first of equals; none left that compares: expert c), their probabilities renormalized
    with normalize, times scale. -> (ids, weights float32 [top_k])."""
    # (in float64, rounded: equal rows give equal logits, where BLAS's float32 sums may differ by an ulp
    # between rows and turn a tie the other way)
    logits = (router.astype(np.float64) @ x.astype(np.float64)).astype(F32)
    logits = logits + router_bias if router_bias is not None else logits
    if sigmoid:
        probs = F32(1) / (F32(1) + np.exp(-logits))
    else:
        probs = np.exp(logits - logits.max())
        probs = probs / probs.sum(dtype=F32)
    scores = probs + (expert_bias if expert_bias is not None else F32(0))
    ids, picked = [], F32(0)
    for c in range(top_k):
        eligible = np.flatnonzero(scores > -np.inf)
        best = int(eligible[np.argmax(scores[eligible])]) if eligible.size else c
        ids.append(best)
        picked = F32(picked + probs[best])
        scores[best] = -np.inf
    weights = probs[ids] / picked if normalize else probs[ids]
    return ids, (weights * F32(scale)).astype(F32)


def twin_clamped_swiglu(gate_up: np.ndarray, alpha: float, limit: float) -> np.ndarray:
    """awq_moe_swiglu's twin: gpt-oss's (clamp(up, +-limit) + 1) g sigmoid(alpha g), g = min(gate, limit), of
    gate_up fp16 [rows, 2 W] (gate j at 2j, up j at 2j + 1) -> fp16 [rows, W]."""
    g = np.minimum(gate_up[:, 0::2].astype(F32), F32(limit))
    u = np.clip(gate_up[:, 1::2].astype(F32), F32(-limit), F32(limit))
    return ((u + F32(1)) * g / (F32(1) + np.exp(-F32(alpha) * g))).astype(F16)


def twin_short_conv(bcx: np.ndarray, store: np.ndarray, weight: np.ndarray, bias: np.ndarray | None,
                    past: int) -> np.ndarray:
    """LFM2's gated short convolution of a step's rows (decoder_ops.cu awq_short_conv): bcx fp16 [S,
    3 hidden] (B, C, x side by side); store fp16 [kernel - 1 + context, hidden], row r holding B * x
    of position r - kernel + 1 (its first kernel - 1 rows zeros: before the first token); weight
    float32 [hidden, kernel], bias float32 [hidden] or None; past: row 0's position. B * x of the
    step's rows goes into the store (rounded to fp16), then out[s] = C[s] * (sum over taps j of
    weight[:, j] * store[past + s + j] (+ bias)), fp16."""
    rows, hidden = bcx.shape[0], weight.shape[0]
    kernel = weight.shape[1]
    gate_b, gate_c, x = (bcx[:, i * hidden:(i + 1) * hidden].astype(F32) for i in range(3))
    store[past + kernel - 1:past + kernel - 1 + rows] = (gate_b * x).astype(F16)
    window = store[past:past + kernel - 1 + rows].astype(F32)
    y = sum(window[j:j + rows] * weight[:, j] for j in range(kernel))
    if bias is not None:
        y = y + bias
    return (gate_c * y).astype(F16)


def twin_delta_conv(x: np.ndarray, state: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """A delta net's or Mamba-2's causal convolution and SiLU (delta_net.cu awq_delta_conv): x fp16 [S, >= C]
    (q, k and v in its first C columns, this step's rows); state float32 [kernel - 1, C], the inputs of
    the kernel - 1 tokens before, oldest first (zeros before the first token), moved on past this step's;
    weight float32 [C, kernel], tap j reading the token kernel - 1 - j back; bias float32 [C] or None.
    -> silu(conv + bias) fp16 [S, C]."""
    channels, kernel = weight.shape
    rows = x.shape[0]
    window = np.concatenate([state, x[:, :channels].astype(F32)])  # [kernel - 1 + S, C]
    y = np.zeros((rows, channels), F32) if bias is None else np.tile(bias.astype(F32), (rows, 1))
    for j in range(kernel):
        y = y + weight[:, j] * window[j:j + rows]
    state[:] = window[rows:]
    return (y / (F32(1) + np.exp(-y))).astype(F16)


def softplus(x: np.ndarray) -> np.ndarray:
    """log(1 + e^x) in float32, x itself past 20 (torch's threshold)."""
    return np.where(x > F32(20), x, np.log1p(np.exp(np.minimum(x, F32(20))))).astype(F32)


def twin_delta_rule(qkvz: np.ndarray, x: np.ndarray, state: np.ndarray, b: np.ndarray, a: np.ndarray,
                    dt_bias: np.ndarray, rate: np.ndarray, norm: np.ndarray, delta, eps: float) -> np.ndarray:
    """A Qwen3.5 delta net's rule over a step's rows in order (delta_net.cu awq_delta_rule; export.spec.DeltaNet
    says what it computes): qkvz fp16 [S, Cq + Hv Dv] (q, k, v after the convolution, then z), x fp16 [S,
    hidden] the normed input (b and a: float32 [Hv, hidden]), state float32 [Hv, Dk, Dv] (updated), dt_bias,
    rate (-exp(A_log)) float32 [Hv], norm float32 [Dv] -> out fp16 [S, Hv Dv], all in float32."""
    d = delta
    group = d.v_heads // d.k_heads
    out = np.empty((qkvz.shape[0], d.value_dim), F16)
    for r in range(qkvz.shape[0]):
        row = qkvz[r].astype(F32)
        q, k = (row[n * d.key_dim:(n + 1) * d.key_dim].reshape(d.k_heads, d.k_dim) for n in range(2))
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + F32(1e-6)) * F32(d.k_dim ** -0.5)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + F32(1e-6))
        v = row[2 * d.key_dim:d.conv_dim].reshape(d.v_heads, d.v_dim)
        z = row[d.conv_dim:].reshape(d.v_heads, d.v_dim)
        xs = x[r].astype(F32)
        beta = F32(1) / (F32(1) + np.exp(-(b @ xs)))
        decay = np.exp(rate * softplus(a @ xs + dt_bias))
        for h in range(d.v_heads):
            kh = h // group
            s = state[h] * decay[h]
            delta_v = (v[h] - k[kh] @ s) * beta[h]
            s = s + np.outer(k[kh], delta_v)
            state[h] = s
            o = q[kh] @ s
            o = o / np.sqrt((o * o).mean() + F32(eps)) * norm * (z[h] / (F32(1) + np.exp(-z[h])))
            out[r, h * d.v_dim:(h + 1) * d.v_dim] = o.astype(F16)
    return out


def twin_mamba_rule(qkvz: np.ndarray, x: np.ndarray, state: np.ndarray, a: np.ndarray, dt_bias: np.ndarray,
                    rate: np.ndarray, skip: np.ndarray, delta) -> np.ndarray:
    """A Mamba-2 mixer's rule over a step's rows in order (delta_net.cu awq_mamba_rule; export.spec.DeltaNet, rule
    mamba2): qkvz fp16 [S, Cq + Hv Dv] (x, B, C after the convolution, then z), x fp16 [S, hidden] the normed
    input (a: float32 [Hv, hidden]), state float32 [Hv, N, Dv] (updated), dt_bias, rate (-exp(A_log)), skip (D)
    float32 [Hv] -> (S^T C + D x) silu(z) fp16 [S, Hv Dv], all in float32: group_norm's input."""
    d = delta
    group = d.v_heads // d.k_heads
    c_at, b_at, x_at = d.conv_parts
    out = np.empty((qkvz.shape[0], d.value_dim), F16)
    for r in range(qkvz.shape[0]):
        row = qkvz[r].astype(F32)
        c, b = (row[at:at + d.key_dim].reshape(d.k_heads, d.k_dim) for at in (c_at, b_at))
        v = row[x_at:x_at + d.value_dim].reshape(d.v_heads, d.v_dim)
        z = row[d.conv_dim:].reshape(d.v_heads, d.v_dim)
        dt = softplus(a @ x[r].astype(F32) + dt_bias)
        dt = np.clip(dt, F32(d.dt_min), F32(np.inf if d.dt_max is None else d.dt_max))
        decay = np.exp(rate * dt)
        for h in range(d.v_heads):
            g = h // group
            state[h] = state[h] * decay[h] + np.outer(b[g], dt[h] * v[h])
            o = c[g] @ state[h] + skip[h] * v[h]
            out[r, h * d.v_dim:(h + 1) * d.v_dim] = (o * z[h] / (F32(1) + np.exp(-z[h]))).astype(F16)
    return out


def twin_group_norm(x: np.ndarray, weight: np.ndarray, groups: int, eps: float) -> np.ndarray:
    """A Mamba-2's gated norm after its rule (delta_net.cu awq_group_norm): x fp16 [S, n] RMS-normed over each of
    `groups` equal parts of a row, times weight float32 [n], in float32 -> fp16 [S, n]."""
    parts = x.astype(F32).reshape(x.shape[0], groups, -1)
    normed = parts / np.sqrt((parts * parts).mean(-1, keepdims=True) + F32(eps))
    return (normed.reshape(x.shape) * weight).astype(F16)


def twin_head_gate(ctx: np.ndarray, x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """LFM3's head gates (decoder_ops.cu awq_head_gate): ctx fp16 [S, H D], each head's D values times
    sigmoid(weight[head] . x) in float32, x fp16 [S, hidden] (the attention's normed input), weight
    float32 [H, hidden] -> fp16 [S, H D]."""
    heads = weight.shape[0]
    logits = x.astype(F32) @ weight.T  # [S, H]
    gates = F32(1) / (F32(1) + np.exp(-logits))
    rows = ctx.reshape(ctx.shape[0], heads, -1).astype(F32) * gates[:, :, None]
    return rows.reshape(ctx.shape).astype(F16)


def twin_output_gate(ctx: np.ndarray, gate: np.ndarray) -> np.ndarray:
    """AFMoE's gates (decoder_ops.cu awq_output_gate): ctx fp16 [S, n] times sigmoid(gate) value by value, in
    float32 -> fp16 [S, n]."""
    return (ctx.astype(F32) / (F32(1) + np.exp(-gate.astype(F32)))).astype(F16)


def twin_lm_head(x: np.ndarray, table: np.ndarray, softcap: float, bias: np.ndarray | None = None) -> np.ndarray:
    """float32 logits [V] of one fp16 row x [hidden] against the table [V, hidden]: float32 values
    of the fp16 table, or of the int8 one (dequantize_rows_int8: q * s, exact in float32); plus
    the head's bias (Phi's), before the soft-cap."""
    logits = table.astype(F32, copy=False) @ x.astype(F32)
    if bias is not None:
        logits = logits + bias.astype(F32)
    if softcap > 0:
        logits = F32(softcap) * np.tanh(logits / F32(softcap))
    return logits.astype(F32)


def order_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered like the float32 values (plugins/kernels/select.cuh order_key), with
    NaN lowest (key 0: it never wins a place)."""
    u = np.asarray(values, F32).view(np.uint32)
    keys = np.where(u & 0x80000000, ~u, u | 0x80000000).astype(np.uint32)
    return np.where(np.isnan(values), np.uint32(0), keys)


def twin_head_top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """The ids of the k largest logits, in id order; of equal logits the lowest ids (what
    awq_head_candidates + awq_head_rescore choose)."""
    keys = order_keys(logits).astype(np.int64)
    return np.sort(np.argsort(-keys, kind="stable")[:k])


def twin_rescored_head(x: np.ndarray, w_hat: np.ndarray, exact: np.ndarray, top_k: int, softcap: float) -> np.ndarray:
    """An int4 head's logits [V]: x against W_hat (the 4-bit head), then its top_k recomputed
    from the exact fp16 table."""
    logits = twin_lm_head(x, w_hat, softcap)
    ids = twin_head_top_k(logits, top_k)
    logits[ids] = twin_lm_head(x, exact[ids], softcap)
    return logits


# ---------------------------------------------------------------- the executor

class ReferenceBackend:
    """The backend interface over a native engine, in numpy (see the module docstring)."""

    def __init__(self, engine_dir: Path, max_context: int, info: DecoderInfo | None = None):
        engine_dir = Path(engine_dir)
        if info is None:
            info = read_decoder_info(engine_dir, check_files(engine_dir, read_manifest(engine_dir)["files"]))
        self.spec: DecoderSpec = info.spec
        if not 1 <= max_context <= self.spec.max_positions:
            raise UserError(f"max_context must be 1..{self.spec.max_positions}, got {max_context}")
        self.ops = decode_ops(self.spec)
        self.tensors = load_tensors(engine_dir, info)
        self.max_context, self.vocab_size, self.position = int(max_context), self.spec.vocab, 0
        spec = self.spec
        # (as the cuda backend's: none for an LFM2 short convolution's layer)
        shapes = [(spec.kv_heads, self.max_context if i in spec.attention_layers else 0, spec.head_dim)
                  for i in range(spec.layers)]
        self.k_cache = [np.zeros(shape, F16) for shape in shapes]
        self.v_cache = [np.zeros(shape, F16) for shape in shapes]
        # (LFM2's) each short convolution's B * x by position, after kernel - 1 rows of zeros: twin_short_conv
        self.conv_store = {i: np.zeros((spec.conv_kernel - 1 + self.max_context, spec.hidden), F16)
                           for i in spec.conv_layers}
        # (Qwen3.5's) each delta net's convolution inputs and state, float32, and a copy at the last prefill's end
        shapes = spec.delta.state_shapes if spec.delta else ()
        self.delta_states = {i: [np.zeros(shape, F32) for shape in shapes] for i in spec.delta_layers}
        self.delta_kept: tuple[int, dict] | None = None
        self._w: dict[str, np.ndarray] = {}  # dequantized linears and the head, float32, made on first use

    def kv_bytes(self) -> int:
        states = sum(2 * a.nbytes for arrays in self.delta_states.values() for a in arrays)  # (and their copies)
        return sum(c.nbytes for c in self.k_cache + self.v_cache + list(self.conv_store.values())) + states

    def rewind(self, position: int) -> None:
        """As backend_ort's: where a delta net's states cannot be taken back to `position`, to the last
        prefill's end at or before it, else 0; `position` then says where."""
        if not 0 <= position <= self.position:
            raise UserError(f"cannot rewind to {position}: the cache holds {self.position} tokens")
        if self.delta_states and position < self.position:
            kept = self.delta_kept if self.delta_kept and self.delta_kept[0] <= position else None
            for i, arrays in self.delta_states.items():
                for n, array in enumerate(arrays):
                    array[...] = kept[1][i][n] if kept else 0.0
            position = kept[0] if kept else 0
        self.position = position

    def weight(self, name: str, group_size: int | None = None) -> np.ndarray:
        """W_hat float32 of a 4-bit linear (at the engine's group size unless another is given)."""
        if name not in self._w:
            t = self.tensors
            self._w[name] = dequantized(t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.zeros"],
                                        group_size or self.spec.group_size)
        return self._w[name]

    def experts(self, a: dict, buf: dict) -> np.ndarray:
        """A moe op's output rows fp16 [rows, hidden], as plugins/kernels/moe.cu computes them: the input
        normed (fp16), each row's experts (twin_moe_route), each one's gate/up (fp16) through SiLU and up,
        or gpt-oss's clamped SwiGLU with its biases (fp16), and its down (fp16), summed weighted in float32
        with the shared expert's output (Qwen2-MoE's times sigmoid(its gate . x))."""
        t, spec = self.tensors, self.spec
        x = buf[a["x"]] if a["norm"] is None else twin_norm(buf[a["x"]], t[a["norm"]], spec.eps)
        W, H = spec.expert_width, spec.hidden
        gate_up, down = self.weight(f"{a['experts']}.gate_up"), self.weight(f"{a['experts']}.down")
        biases = (t[f"{a['experts']}.gate_up.bias"], t[f"{a['experts']}.down.bias"]) if a["swiglu"] else None
        out = np.empty_like(x)
        for r in range(x.shape[0]):
            ids, weights = twin_moe_route(x[r], t[a["router"]], t[a["router_bias"]] if a["router_bias"] else None,
                                          t[a["bias"]] if a["bias"] else None, a["top_k"], a["normalize"],
                                          a["sigmoid"], a["scale"])
            acc = np.zeros(H, F32)
            for e, weight in zip(ids, weights):
                rows, cols = slice(e * 2 * W, (e + 1) * 2 * W), slice(e * H, (e + 1) * H)
                if biases:  # (gpt-oss's)
                    act = twin_clamped_swiglu(twin_linear(x[r:r + 1], gate_up[rows], biases[0][rows]), *a["swiglu"])
                else:
                    act = twin_act(twin_linear(x[r:r + 1], gate_up[rows], None), "silu")
                y = twin_linear(act, down[cols], biases[1][cols] if biases else None)
                acc += weight * y[0].astype(F32)
            if a["shared"]:
                gate = F32(1)
                if a["shared_gate"]:
                    gate = F32(1) / (F32(1) + np.exp(-(t[a["shared_gate"]] @ x[r].astype(F32))))
                acc += gate * buf[a["shared"]][r].astype(F32)
            out[r] = acc.astype(F16)
        return out

    def rope_store(self, qkv: np.ndarray, layer: int, rope: int) -> np.ndarray:
        """q/k/v rows fp16 [S, qkv_width] of this step: k and v into the layer's cache, q rotated."""
        spec, S = self.spec, qkv.shape[0]
        H, Hkv, D = spec.heads, spec.kv_heads, spec.head_dim
        q = qkv[:, :H * D].reshape(S, H, D)
        k = qkv[:, H * D:(H + Hkv) * D].reshape(S, Hkv, D)
        v = qkv[:, (H + Hkv) * D:].reshape(S, Hkv, D)
        t = self.tensors
        cos, sin = (None, None) if rope is None else (t[f"rope.{rope}.cos"], t[f"rope.{rope}.sin"])
        return twin_rope_store(q, k, v, self.k_cache[layer], self.v_cache[layer], self.position, cos, sin)

    def forward(self, ids) -> np.ndarray:
        """Logits float32 [V] after the last of ids (a fresh array)."""
        ids = step_ids(ids, self.position, self.max_context, self.vocab_size)
        buf = {name: np.zeros(shape, F32 if name == "logits" else F16)
               for name, shape in buffer_shapes(self.spec, ids.size).items()}
        for op in self.ops:
            self.run(op, buf, ids)
        self.position += ids.size
        if self.delta_states and ids.size > 1:  # a prefill's end: where a rewind can go back to
            self.delta_kept = (self.position, {i: [a.copy() for a in arrays]
                                               for i, arrays in self.delta_states.items()})
        return buf["logits"].copy()

    def run(self, op, buf: dict, ids: np.ndarray) -> None:
        """One op of the step on the buffers (the cuda backend launches the twin's kernel instead)."""
        a, t, spec = op.args, self.tensors, self.spec
        if op.kind == "embed":
            buf[a["out"]][:] = twin_embed(ids, t[a["table"]], a["scale"], t[a["scales"]] if a["scales"] else None)
            if a["positions"]:
                buf[a["out"]][:] = twin_add_positions(buf[a["out"]], t[a["positions"]], self.position)
        elif op.kind == "norm":
            rows = slice(-1, None) if a.get("last_row") else slice(None)
            normed = twin_norm(buf[a["x"]][rows], t[a["weight"]], spec.eps, t[a["bias"]] if a["bias"] else None)
            buf[a["out"]][:normed.shape[0]] = normed
        elif op.kind == "add_norm":
            rows = slice(-1, None) if a.get("last_row") else slice(None)
            normed, total = twin_add_norm(buf[a["x"]][rows], buf[a["residual"]][rows], t[a["weight"]], spec.eps,
                                              t[a["bias"]] if a["bias"] else None)
            buf[a["residual"]][rows], buf[a["out"]][:normed.shape[0]] = total, normed
        elif op.kind == "linear":  # (a shared expert's reads and writes the first columns of a wider buffer)
            x = buf[a["x"]][:, :a["K"]]
            x = x if a["norm"] is None else twin_norm(x, t[a["norm"]], spec.eps)
            bias = t[f"{a['weight']}.bias"] if a["bias"] else None
            y = twin_linear(x, self.weight(a["weight"]), bias)
            if a["epilogue"] == "act":
                y = twin_act(y, a["act"], a["gated"])
                buf[a["out"]][:, :y.shape[1]] = y
            elif a["epilogue"] == "residual":
                buf[a["out"]][:] = twin_residual(buf[a["out"]], y)
            elif a["epilogue"] == "rope":
                self.q_rot = self.rope_store(y, a["layer"], a["rope"])
            else:
                buf[a["out"]][:, :y.shape[1]] = y
        elif op.kind == "add":
            buf[a["residual"]][:] = twin_residual(buf[a["residual"]], buf[a["x"]])
        elif op.kind == "rope":
            twin_rope_in_place(buf[a["qkv"]], a["heads"], spec.head_dim, self.position, t[f"rope.{a['rope']}.cos"],
                               t[f"rope.{a['rope']}.sin"])
        elif op.kind == "head_norm":
            twin_head_norm(buf[a["x"]], a["offset"], a["heads"], a["size"], t[a["weight"]], spec.eps)
        elif op.kind == "attention":
            i = a["layer"]
            q_rot = self.q_rot if a["rotated"] else self.rope_store(buf[a["qkv"]], i, a["rope"])
            buf[a["out"]][:] = twin_attend(q_rot, self.k_cache[i], self.v_cache[i], self.position, a["window"],
                                           spec.attn_scale, spec.attn_softcap, t[a["sinks"]] if a["sinks"] else None)
        elif op.kind == "output_gate":
            buf[a["ctx"]][:] = twin_output_gate(buf[a["ctx"]], buf[a["x"]])
        elif op.kind == "head_gate":
            buf[a["ctx"]][:] = twin_head_gate(buf[a["ctx"]], buf[a["x"]], t[a["weight"]])
        elif op.kind == "act":
            buf[a["out"]][:] = twin_act(buf[a["x"]], a["kind"], a["gated"], t[a["params"]] if a["params"] else None)
        elif op.kind == "clamp":  # (decoder_ops.cu awq_clamp)
            buf[a["x"]][:] = np.clip(buf[a["x"]].astype(F32), -a["limit"], a["limit"]).astype(F16)
        elif op.kind == "moe":
            buf[a["out"]][:] = self.experts(a, buf)
        elif op.kind == "short_conv":
            buf[a["out"]][:] = twin_short_conv(buf[a["x"]], self.conv_store[a["layer"]], t[a["weight"]],
                                               t[a["bias"]] if a["bias"] else None, self.position)
        elif op.kind == "delta_conv":
            x = buf[a["x"]]
            x[:, :spec.delta.conv_dim] = twin_delta_conv(x, self.delta_states[a["layer"]][0][0], t[a["weight"]],
                                                         t[a["bias"]] if a["bias"] else None)
        elif op.kind == "mamba_rule":
            buf[a["out"]][:] = twin_mamba_rule(buf[a["x"]], buf[a["normed"]], self.delta_states[a["layer"]][1],
                                               t[a["a"]], t[a["dt_bias"]], t[a["rate"]], t[a["skip"]], spec.delta)
        elif op.kind == "group_norm":
            buf[a["x"]][:] = twin_group_norm(buf[a["x"]], t[a["weight"]], a["groups"], spec.eps)
        elif op.kind == "delta_rule":
            buf[a["out"]][:] = twin_delta_rule(buf[a["x"]], buf[a["normed"]], self.delta_states[a["layer"]][1],
                                               t[a["b"]], t[a["a"]], t[a["dt_bias"]], t[a["rate"]], t[a["norm"]],
                                               spec.delta, spec.eps)
        elif op.kind == "gather":
            buf[a["out"]] = twin_gather(buf[a["x"]], t[a["order"]])
        elif op.kind == "lm_head":
            x = buf[a["x"]][0]
            if a["bits"] == 4:
                w_hat = self.weight(a["weight"], a["group_size"])[:spec.vocab]
                buf[a["out"]][:] = twin_rescored_head(x, w_hat, t[a["exact"]], a["top_k"], a["softcap"])
                return
            if a["table"] not in self._w:
                self._w[a["table"]] = (dequantize_rows_int8(t[a["table"]], t[a["scales"]]) if a["bits"] == 8
                                       else t[a["table"]].astype(F32))
            buf[a["out"]][:] = twin_lm_head(x, self._w[a["table"]], a["softcap"], t[a["bias"]] if a["bias"] else None)
        else:
            raise ValueError(f"unknown op {op.kind}")
