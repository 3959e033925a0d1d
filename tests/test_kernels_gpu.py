"""The W4A16 kernels on a real GPU, through ctypes (no torch): pytest -m gpu.

Fresh random data per case; the reference is float64 X @ W_hat^T with W_hat from
awq_edge.packing.dequantize (the exact quantized weights). Outputs are filled with NaN
before every launch so a kernel that skips an element fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from awq_edge import packing, plugins
from awq_edge.cuda_runtime import find_gpus
from native_helpers import random_quantized

pytestmark = pytest.mark.gpu
GPUS = find_gpus()
if not GPUS:
    pytest.skip("no NVIDIA GPU found: GPU kernel tests skipped", allow_module_level=True)

NAN_FP16 = 0x7E


@pytest.fixture(scope="module")
def gpu():
    from awq_edge.cuda_runtime import CudaRuntime

    cuda = CudaRuntime()
    return cuda, plugins.load_kernels(GPUS[0].arch)


def call(gpu, entry: str, inputs: list, out: np.ndarray, *args) -> np.ndarray:
    """lib.entry(*inputs on the device, an output buffer poisoned with NaN, *args, stream NULL);
    returns the output in out's shape and dtype."""
    cuda, lib = gpu
    ptrs = [cuda.to_device(np.ascontiguousarray(a)) for a in inputs]
    out_dev = cuda.malloc(out.nbytes)
    try:
        cuda.memset(out_dev, NAN_FP16, out.nbytes)  # 0x7E7E is a NaN in fp16
        status = getattr(lib, entry)(*ptrs, out_dev, *args, None)
        assert status == 0, lib.awq_w4a16_status_string(status).decode()
        cuda.synchronize()
        cuda.to_host(out_dev, out)
    finally:
        for p in (*ptrs, out_dev):
            cuda.free(p)
    return out


def run(gpu, entry: str, m: int, n: int, k: int, group_size: int, seed: int, extra: tuple = ()):
    """entry(x, weights..., y, m, n, k, group_size, *extra, stream) against float64."""
    rng = np.random.default_rng(seed)
    q, scales, zeros, packed = random_quantized(rng, n, k, group_size)
    x = rng.standard_normal((m, k)).astype(np.float16)
    w_hat = packing.dequantize(q, scales, zeros, group_size).astype(np.float64)
    want = x.astype(np.float64) @ w_hat.T
    got = call(gpu, entry, [x, packed["qweight"], packed["scales"], packed["zeros"]], np.empty((m, n), np.float16),
               m, n, k, group_size, *extra)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} outputs never written"
    err = np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
    worst = np.max(np.abs(got - want)) / np.max(np.abs(want))
    print(f"error {entry} M={m} N={n} K={k} G={group_size}: relative {err:.2e}, worst element {worst:.2e}")
    assert err < 5e-3 and worst < 2e-2, f"relative error {err:.2e} (worst element {worst:.2e})"


SHAPES = [(4096, 4096, 128), (576, 1536, 128), (1536, 576, 64), (200, 64, 32), (11008, 256, 128), (96, 72, 64)]


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("k, n, group_size", SHAPES)
def test_gemv(gpu, m, k, n, group_size):
    run(gpu, "awq_w4a16_gemv", m, n, k, group_size, seed=m * 7919 + k + n)


@pytest.mark.parametrize("entry, m", [(e, m) for e in ("awq_w4a16_gemv_mma", "awq_w4a16_gemv_mma32") for m in range(2, 9)]
                         + [("awq_w4a16_gemv_mma", m) for m in (9, 15, 16, 17, 24, 32)])
@pytest.mark.parametrize("k, n, group_size", [s for s in SHAPES if s[0] % 32 == 0])
def test_gemv_on_tensor_cores(gpu, entry, m, k, n, group_size):
    """awq_w4a16_gemv_mma (16 rows a block; up to 32 rows of x in one pass) and _mma32 (32 rows a
    block, up to 8 of x): K = 576 and 96 leave windows some lanes and warps have nothing of, N = 72
    a block of 16 rows half outside (of 32: a tile and a half)."""
    run(gpu, entry, m, n, k, group_size, seed=m * 31337 + k + n)


@pytest.mark.parametrize("k, n, group_size", [s for s in SHAPES if s[0] % 32 == 0] + [(11008, 200, 128),
                                                                                       (512, 328, 32)])
@pytest.mark.parametrize("entry", ["awq_w4a16_gemv_tc", "awq_w4a16_gemv_tc_persistent"])
def test_the_decode_gemv_on_tensor_cores(gpu, entry, k, n, group_size):
    """awq_w4a16_gemv_tc (M = 1), a block a tile and on a persistent grid: G = 128 scales each
    window's sums after the mma, 32 and 64 the operands; N = 72 and 200 leave half a tile, K = 96
    and 576 warps without a window, K = 11008 warps with 10 windows and 11; N = 4096 and 1536 give a
    persistent block several tiles."""
    run(gpu, entry, 1, n, k, group_size, seed=k * 7 + n)


@pytest.mark.parametrize("m", [1, 9, 16, 100, 128, 512, 2048])
@pytest.mark.parametrize("k, n, group_size", SHAPES)
def test_gemm(gpu, m, k, n, group_size):
    run(gpu, "awq_w4a16_gemm", m, n, k, group_size, seed=m * 104729 + k + n)


@pytest.mark.parametrize("splits", [2, 3, 8])
@pytest.mark.parametrize("m, k, n, group_size", [(64, 4096, 4096, 128), (40, 576, 1536, 128), (100, 200, 64, 32),
                                                 (33, 11008, 256, 128)])
def test_gemm_with_k_split(gpu, splits, m, k, n, group_size):
    """awq_w4a16_gemm_split_k (the cuda backend's GEMM for few output tiles): 2, 3 and 8 splits of the
    K steps (uneven shares; K = 200: a short last step), twice on the same workspace (the tiles'
    last blocks reset the counters)."""
    from awq_edge.cuda_backend import GEMM_SPLIT_TILE_BYTES, GEMM_STEP_K, gemm_grid

    if splits > -(-k // GEMM_STEP_K):
        pytest.skip("more splits than K steps")
    cuda, _ = gpu
    across, down = gemm_grid(m, n)
    tiles = across * down
    partials, counters = cuda.malloc(splits * tiles * GEMM_SPLIT_TILE_BYTES), cuda.malloc(4 * tiles)
    try:
        cuda.memset(counters, 0, 4 * tiles)
        for again in range(2):
            run(gpu, "awq_w4a16_gemm_split_k", m, n, k, group_size, seed=m + k + n + again,
                extra=(splits, partials, counters))
    finally:
        cuda.free(partials)
        cuda.free(counters)


@pytest.mark.parametrize("m", [1, 8, 9, 16, 31, 32, 33, 64])
def test_matmul_dispatch(gpu, m):
    run(gpu, "awq_w4a16_matmul", m, 512, 576, 128, seed=m)


def read_only_twin(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group_size: int) -> np.ndarray:
    """What awq_w4a16_read_only writes (its loads xor-ed, per block of 4 rows), as fp16 bits:
    xor is order-free, so it is every word of the block's rows, and each row's scale | zero << 16
    once per 128-bit chunk (per word when K % 32 != 0) of the group the chunk starts in."""
    n, words = qweight.shape
    per_load = 4 if (words * 8) % 32 == 0 else 1
    chunk_k = np.arange(words // per_load) * per_load * 8
    group_bits = scales.view(np.uint16).astype(np.uint32) ^ (zeros.view(np.uint16).astype(np.uint32) << 16)
    bits = np.bitwise_xor.reduce(qweight.view(np.uint32), axis=1) ^ \
        np.bitwise_xor.reduce(group_bits[:, chunk_k // group_size], axis=1)
    block = np.bitwise_xor.reduce(bits.reshape(-1, 4), axis=1)
    return np.repeat((block ^ (block >> 16)) & 0xFFFF, 4).astype(np.uint16)


@pytest.mark.parametrize("k, n, group_size", SHAPES)
def test_the_read_only_ceiling_reads_every_byte_the_gemv_reads(gpu, k, n, group_size):
    """benchmarks/gemv.py's ceiling: its output is the xor of what it loaded, so a load it skips
    (or one the compiler dropped) shows."""
    *_, packed = random_quantized(np.random.default_rng(k + n), n, k, group_size)
    weights = [packed["qweight"], packed["scales"], packed["zeros"]]
    got = call(gpu, "awq_w4a16_read_only", weights, np.empty(n, np.uint16), n, k, group_size)
    want = read_only_twin(packed["qweight"], packed["scales"], packed["zeros"], group_size)
    assert np.array_equal(got, want), f"{np.sum(got != want)} of {n} rows differ"


@pytest.mark.parametrize("k, n, group_size", SHAPES)
def test_dequantize_gives_packing_dequantize_rounded_to_fp16_exactly(gpu, k, n, group_size):
    """awq_w4a16_dequantize (the first half of dequantize + cuBLAS prefill): bit for bit the
    reference's W_hat in fp16, every element written (the output poisoned first)."""
    q, scales, zeros, packed = random_quantized(np.random.default_rng(n * 31 + k), n, k, group_size)
    want = packing.dequantize(q, scales, zeros, group_size).astype(np.float16)
    got = call(gpu, "awq_w4a16_dequantize", [packed["qweight"], packed["scales"], packed["zeros"]],
               np.empty((n, k), np.float16), n, k, group_size)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), f"{np.sum(got != want)} values differ"


def test_invalid_arguments_are_refused(gpu):
    cuda, lib = gpu
    buf = cuda.malloc(1 << 16)
    try:
        for m, n, k, g in [(0, 64, 64, 32), (1, 60, 64, 32), (1, 64, 60, 32), (1, 64, 64, 48)]:
            assert lib.awq_w4a16_matmul(buf, buf, buf, buf, buf, m, n, k, g, None) == -1
        assert lib.awq_w4a16_gemv(buf, buf, buf, buf, buf, 9, 64, 64, 32, None) == -1  # GEMV is for M <= 8
        assert lib.awq_w4a16_gemv_mma(buf, buf, buf, buf, buf, 33, 64, 64, 32, None) == -1  # up to 32 rows
        assert lib.awq_w4a16_gemv_mma(buf, buf, buf, buf, buf, 4, 64, 72, 32, None) == -1  # K % 32 != 0
        assert lib.awq_w4a16_gemv_mma32(buf, buf, buf, buf, buf, 9, 64, 64, 32, None) == -1
        assert lib.awq_w4a16_gemv_mma32(buf, buf, buf, buf, buf, 4, 64, 72, 32, None) == -1
        assert lib.awq_w4a16_gemv_tc(buf, buf, buf, buf, buf, 2, 64, 64, 32, None) == -1  # M = 1 only
        assert lib.awq_w4a16_gemv_tc(buf, buf, buf, buf, buf, 1, 64, 72, 32, None) == -1  # K % 32 != 0
    finally:
        cuda.free(buf)


# ---------------------------------------------------------------- token sampling (sample.cu)

def sample_on_gpu(gpu, logits: np.ndarray, settings, seen, uniform: float) -> int:
    cuda, lib = gpu
    seen = np.unique(np.asarray(seen, dtype=np.int32))
    ptrs = [cuda.to_device(np.ascontiguousarray(logits, dtype=np.float32)),
            cuda.to_device(seen if len(seen) else np.zeros(1, np.int32))]
    work, token = cuda.malloc(2 * len(logits) * 4), cuda.malloc(4)
    try:
        cuda.memset(token, 0xFF, 4)  # -1: a kernel that writes nothing fails
        status = lib.awq_sample_token(ptrs[0], len(logits), ptrs[1], len(seen), settings.repetition_penalty,
                                      settings.temperature, settings.top_k, settings.top_p, uniform, work, token,
                                      None)
        assert status == 0
        cuda.synchronize()
        out = np.zeros(1, np.int32)
        cuda.to_host(token, out)
    finally:
        for p in (*ptrs, work, token):
            cuda.free(p)
    return int(out[0])


@pytest.mark.parametrize("vocab", [7, 1000, 49152, 151936])
@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (0.0, 50, 0.95, 1.0), (0.0, 0, 1.0, 1.3), (0.7, 50, 0.95, 1.0), (1.0, 0, 0.9, 1.0),
    (0.8, 0, 1.0, 1.0), (1.2, 3000, 0.5, 1.1), (0.5, 1, 1.0, 1.0)])
def test_sampling_matches_the_host_sampler(gpu, vocab, temperature, top_k, top_p, penalty):
    """Same logits, same uniform draw: the GPU picks the host Sampler's token (float rounding
    at a boundary may flip a rare draw, so 97% must agree and every pick must be a kept id)."""
    from awq_edge.sampling import SamplingSettings, candidates, choose_token

    settings = SamplingSettings(temperature, top_k, top_p, penalty)
    rng = np.random.default_rng(vocab + top_k)
    agree, draws = 0, 40
    for i in range(draws):
        logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
        seen = rng.integers(0, vocab, size=20)
        u = float(rng.random())
        want = choose_token(logits, settings, seen, u)
        got = sample_on_gpu(gpu, logits, settings, seen, u)
        assert 0 <= got < vocab
        agree += got == want
        if temperature == 0:
            assert got == want
        else:  # the pick is one of the host's kept ids
            assert got in set(candidates(logits, settings, seen)[0].tolist())
    assert agree >= 0.97 * draws, f"{agree}/{draws} draws agree with the host Sampler"


def test_sampling_ties_pick_the_lowest_id(gpu):
    from awq_edge.sampling import SamplingSettings

    logits = np.zeros(5000, np.float32)
    logits[[4000, 17, 2500]] = 5.0
    assert sample_on_gpu(gpu, logits, SamplingSettings(0.0), [], 0.0) == 17


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [(0.0, 0, 1.0, 1.0), (0.0, 0, 1.0, 1.3),
                                                                  (1.0, 0, 1.0, 1.0), (0.7, 50, 0.9, 1.2)])
def test_sampling_never_picks_a_nan_logit(gpu, temperature, top_k, top_p, penalty):
    """A NaN counts as -inf, as in choose_token; with no logit above -inf the token is -1."""
    from awq_edge.sampling import SamplingSettings, choose_token

    settings = SamplingSettings(temperature, top_k, top_p, penalty)
    rng = np.random.default_rng(7)
    for i in range(20):
        logits = (rng.standard_normal(49152) * 3).astype(np.float32)
        nan_ids = rng.integers(0, 49152, size=50).tolist() + [int(np.argmax(logits))]
        logits[nan_ids] = np.nan
        seen = nan_ids[:5] + rng.integers(0, 49152, size=10).tolist()
        u = float(rng.random())
        got = sample_on_gpu(gpu, logits, settings, seen, u)
        assert 0 <= got < 49152 and got not in nan_ids
        if temperature == 0:
            assert got == choose_token(logits, settings, seen, u)
    nothing = np.full(1000, np.nan, np.float32)
    nothing[:500] = -np.inf
    assert sample_on_gpu(gpu, nothing, settings, [], 0.5) == -1


def test_sampling_invalid_arguments_are_refused(gpu):
    cuda, lib = gpu
    buf = cuda.malloc(1 << 16)
    try:
        for vocab, penalty, temperature, top_k, top_p, u in [(0, 1, 1, 0, 1, 0.5), (10, 0, 1, 0, 1, 0.5),
                                                             (10, 1, -1, 0, 1, 0.5), (10, 1, 1, -1, 1, 0.5),
                                                             (10, 1, 1, 0, 0, 0.5), (10, 1, 1, 0, 1, 1.0)]:
            assert lib.awq_sample_token(buf, vocab, buf, 0, penalty, temperature, top_k, top_p, u, buf, buf,
                                        None) == -1
    finally:
        cuda.free(buf)


# ---------------------------------------------------------------- attention with the in-place KV cache

def rope_tables(positions: int, d: int, base: float = 10000.0):
    inv_freq = 1.0 / base ** (np.arange(0, d, 2) / d)
    angles = np.arange(positions)[:, None] * inv_freq[None]
    return np.cos(angles).astype(np.float16), np.sin(angles).astype(np.float16)


def rotate(x, cos, sin):
    """HF rotate_half RoPE on the last axis; x [..., D], cos/sin [..., D/2] broadcast."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("s, past, heads, kv_heads, d, window, softcap", [
    (1, 0, 9, 3, 64, 0, 0.0), (1, 300, 9, 3, 64, 0, 0.0), (7, 100, 8, 8, 128, 0, 0.0),
    (64, 0, 4, 1, 256, 0, 50.0), (1, 500, 8, 2, 128, 64, 0.0), (33, 40, 8, 4, 64, 16, 0.0),
    (200, 60, 8, 2, 128, 0, 0.0),  # S >= 16: blocks of 64 tokens on tensor cores
    (1, 300, 8, 2, 96, 0, 0.0), (40, 130, 4, 2, 96, 20, 30.0),  # Phi-3's head size: per token, then blocks
    (1, 300, 8, 2, 80, 0, 0.0), (40, 130, 4, 2, 80, 20, 0.0)])  # EXAONE 3.5 2.4B's
def test_attention_writes_the_cache_in_place_and_matches_a_reference(gpu, s, past, heads, kv_heads, d, window,
                                                                     softcap):
    cuda, lib = gpu
    rng = np.random.default_rng(s * 1000 + past + d)
    capacity, positions = 640, 1024
    scale = d ** -0.5
    q = rng.standard_normal((s, heads, d)).astype(np.float16)
    k = rng.standard_normal((s, kv_heads, d)).astype(np.float16)
    v = rng.standard_normal((s, kv_heads, d)).astype(np.float16)
    k_cache = rng.standard_normal((kv_heads, capacity, d)).astype(np.float16)  # rows < past: earlier steps
    v_cache = rng.standard_normal((kv_heads, capacity, d)).astype(np.float16)
    k_cache[:, past + s:] = v_cache[:, past + s:] = 7.0  # rows after the step must stay untouched
    cos, sin = rope_tables(positions, d)

    pos = past + np.arange(s)
    k_rot = rotate(k.astype(np.float64), cos[pos][:, None], sin[pos][:, None])  # [s, Hkv, D]
    q_rot = rotate(q.astype(np.float64), cos[pos][:, None], sin[pos][:, None])
    keys = k_cache.astype(np.float64).copy()
    values = v_cache.astype(np.float64).copy()
    keys[:, pos] = k_rot.transpose(1, 0, 2)
    values[:, pos] = v.astype(np.float64).transpose(1, 0, 2)
    want = np.empty((s, heads, d))
    for h in range(heads):
        kv = h // (heads // kv_heads)
        for i, p in enumerate(pos):
            lo = max(0, p - window + 1) if window else 0
            scores = keys[kv, lo:p + 1] @ q_rot[i, h] * scale
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            w = np.exp(scores - scores.max())
            want[i, h] = (w / w.sum()) @ values[kv, lo:p + 1]

    arrays = [q, k, v, k_cache, v_cache, np.array([past], np.int64), cos, sin]
    ptrs = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
    q_rot_dev, out = cuda.malloc(q.nbytes), cuda.malloc(q.nbytes)
    flag = cuda.to_device(np.zeros(1, np.int32))
    try:
        cuda.memset(out, NAN_FP16, q.nbytes)
        status = lib.awq_attention(*ptrs, q_rot_dev, out, s, heads, kv_heads, d, capacity, positions, window, scale,
                                   softcap, flag, None)
        assert status == 0
        cuda.synchronize()
        got, flag_after = np.empty_like(q), np.empty(1, np.int32)
        cuda.to_host(out, got)
        cuda.to_host(flag, flag_after)
        assert flag_after[0] == 0, "a step that fits set the over-capacity flag"
        k_after, v_after = np.empty_like(k_cache), np.empty_like(v_cache)
        cuda.to_host(ptrs[3], k_after)
        cuda.to_host(ptrs[4], v_after)
    finally:
        for p in (*ptrs, q_rot_dev, out, flag):
            cuda.free(p)
    assert not np.isnan(got).any()
    np.testing.assert_array_equal(k_after[:, :past], k_cache[:, :past])
    np.testing.assert_array_equal(k_after[:, past + s:], k_cache[:, past + s:])
    np.testing.assert_array_equal(v_after[:, past + s:], v_cache[:, past + s:])
    np.testing.assert_array_equal(v_after[:, pos], v.transpose(1, 0, 2))
    np.testing.assert_allclose(k_after[:, pos].astype(np.float64), keys[:, pos], atol=4e-3, rtol=2e-3)
    err = np.abs(got.astype(np.float64) - want).max() / np.abs(want).max()
    print(f"error awq_attention S={s} past={past} heads={heads}/{kv_heads} D={d}: worst element {err:.2e}")
    assert err < 5e-3, f"max relative error {err:.2e}"


def test_attention_past_the_capacity_writes_nothing_returns_nan_and_sets_the_flag(gpu):
    cuda, lib = gpu
    heads, d, capacity = 2, 64, 16
    cos, sin = rope_tables(64, d)
    cache = np.full((1, capacity, d), 3.0, np.float16)
    arrays = [np.ones((1, heads, d), np.float16), np.ones((1, 1, d), np.float16), np.ones((1, 1, d), np.float16),
              cache, cache, np.array([capacity], np.int64), cos, sin]
    ptrs = [cuda.to_device(np.ascontiguousarray(a)) for a in arrays]
    out = cuda.malloc(heads * d * 2)
    flag = cuda.to_device(np.array([4], np.int32))  # other bits stay as they are
    try:
        assert lib.awq_attention(*ptrs, out, out, 1, heads, 1, d, capacity, 64, 0, 0.125, 0.0, flag, None) == 0
        assert lib.awq_attention(*ptrs, out, out, 1, heads, 1, d, capacity, 64, 0, 0.125, 0.0, None, None) == 0
        cuda.synchronize()
        got, after, flag_after = np.empty((heads, d), np.float16), np.empty_like(cache), np.empty(1, np.int32)
        cuda.to_host(out, got)
        cuda.to_host(ptrs[3], after)
        cuda.to_host(flag, flag_after)
    finally:
        for p in (*ptrs, out, flag):
            cuda.free(p)
    assert np.isnan(got).all() and (after == 3.0).all()
    assert flag_after[0] == 4 | 1, f"over-capacity flag not set: {flag_after[0]}"  # AWQ_ATTENTION_OVER_CAPACITY
    assert lib.awq_attention(*([0] * 10), 1, 2, 1, 96, 16, 64, 0, 0.125, 0.0, None, None) == -1  # D 96, null pointers
