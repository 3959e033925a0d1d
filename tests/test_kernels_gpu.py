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


def run(gpu, entry: str, m: int, n: int, k: int, group_size: int, seed: int):
    cuda, lib = gpu
    rng = np.random.default_rng(seed)
    groups = packing.num_groups(k, group_size)
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    zeros = rng.integers(0, 16, size=(n, groups), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, size=(n, groups)).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float16)
    packed = packing.pack_for_plugin(q, scales, zeros, group_size)
    w_hat = packing.dequantize(q, scales, zeros, group_size).astype(np.float64)
    want = x.astype(np.float64) @ w_hat.T

    ptrs = [cuda.to_device(np.ascontiguousarray(a)) for a in (x, packed["qweight"], packed["scales"], packed["zeros"])]
    y_dev = cuda.malloc(m * n * 2)
    try:
        cuda.memset(y_dev, NAN_FP16, m * n * 2)  # 0x7E7E is a NaN in fp16
        status = getattr(lib, entry)(*ptrs, y_dev, m, n, k, group_size, None)
        assert status == 0, lib.awq_w4a16_status_string(status).decode()
        cuda.synchronize()
        got = np.empty((m, n), dtype=np.float16)
        cuda.to_host(y_dev, got)
    finally:
        for p in (*ptrs, y_dev):
            cuda.free(p)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} outputs never written"
    err = np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want)
    worst = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert err < 5e-3 and worst < 2e-2, f"relative error {err:.2e} (worst element {worst:.2e})"


SHAPES = [(4096, 4096, 128), (576, 1536, 128), (1536, 576, 64), (200, 64, 32), (11008, 256, 128), (96, 72, 64)]


@pytest.mark.parametrize("m", range(1, 9))
@pytest.mark.parametrize("k, n, group_size", SHAPES)
def test_gemv(gpu, m, k, n, group_size):
    run(gpu, "awq_w4a16_gemv", m, n, k, group_size, seed=m * 7919 + k + n)


@pytest.mark.parametrize("m", [1, 9, 16, 100, 128, 512, 2048])
@pytest.mark.parametrize("k, n, group_size", SHAPES)
def test_gemm(gpu, m, k, n, group_size):
    run(gpu, "awq_w4a16_gemm", m, n, k, group_size, seed=m * 104729 + k + n)


@pytest.mark.parametrize("m", [1, 8, 9, 64])
def test_matmul_dispatch(gpu, m):
    run(gpu, "awq_w4a16_matmul", m, 512, 576, 128, seed=m)


def test_invalid_arguments_are_refused(gpu):
    cuda, lib = gpu
    buf = cuda.malloc(1 << 16)
    try:
        for m, n, k, g in [(0, 64, 64, 32), (1, 60, 64, 32), (1, 64, 60, 32), (1, 64, 64, 48)]:
            assert lib.awq_w4a16_matmul(buf, buf, buf, buf, buf, m, n, k, g, None) == -1
        assert lib.awq_w4a16_gemv(buf, buf, buf, buf, buf, 9, 64, 64, 32, None) == -1  # GEMV is for M <= 8
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
