"""Host-side cross-check of the plugin weight layout: Python packer vs the CUDA dequant helpers.

plugins/tests/dequant_host_check.cpp runs kernels/dequant.cuh's host path (same bit tricks
and zero-point arithmetic as the GPU path) on weights written by packing.pack_for_plugin;
the result must equal packing.dequantize() rounded to fp16, bit for bit.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from awq_edge import packing, plugins
from native_helpers import emulate_mma_16816


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    cxx = shutil.which("g++")
    include = plugins.cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip(f"needs g++ and the CUDA headers (cuda_fp16.h); found g++={cxx}, CUDA include={include}")
    exe = tmp_path_factory.mktemp("host_check") / "dequant_host_check"
    subprocess.run([cxx, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror",
                    "-I", str(plugins.PLUGINS_DIR / "kernels"), "-isystem", str(include),
                    str(plugins.PLUGINS_DIR / "tests" / "dequant_host_check.cpp"), "-o", str(exe)],
                   check=True, capture_output=True, text=True)
    return exe


def run_host_dequant(exe, tmp_path, packed: dict, n: int, k: int, group_size: int) -> np.ndarray:
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    with open(src, "wb") as f:
        f.write(np.array([n, k, group_size], dtype=np.int32).tobytes())
        for name in ("qweight", "scales", "zeros"):
            f.write(np.ascontiguousarray(packed[name]).tobytes())
    subprocess.run([str(exe), str(src), str(dst)], check=True, capture_output=True)
    return np.fromfile(dst, dtype=np.float16).reshape(n, k)


def random_quantized(rng, n, k, group_size, scale_range=(1e-3, 0.1)):
    groups = packing.num_groups(k, group_size)
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    zeros = rng.integers(0, 16, size=(n, groups), dtype=np.uint8)
    scales = rng.uniform(*scale_range, size=(n, groups)).astype(np.float16)
    return q, scales, zeros


@pytest.mark.parametrize("n, k, group_size", [
    (16, 576, 128),   # SmolLM2 hidden size: last group is 64 wide (ragged K)
    (24, 256, 32),
    (8, 200, 64),     # K % 32 != 0: the kernels' word-at-a-time path, last group 8 wide
    (32, 1024, 128),
    (8, 8, 32),       # a single word, a single short group
])
def test_host_dequant_matches_python_reference(host_check, tmp_path, n, k, group_size):
    rng = np.random.default_rng(1000 * n + k + group_size)
    q, scales, zeros = random_quantized(rng, n, k, group_size)
    packed = packing.pack_for_plugin(q, scales, zeros, group_size)
    got = run_host_dequant(host_check, tmp_path, packed, n, k, group_size)
    want = packing.dequantize(q, scales, zeros, group_size).astype(np.float16)
    mismatch = np.argwhere(got.view(np.uint16) != want.view(np.uint16))
    assert mismatch.size == 0, f"{len(mismatch)} mismatches, first at {tuple(mismatch[0])}: " \
                               f"{got[tuple(mismatch[0])]} vs {want[tuple(mismatch[0])]}"


def test_host_dequant_extremes(host_check, tmp_path):
    """Full nibble range, zero points 0 and 15, large, tiny (subnormal) and negative scales."""
    n, k, group_size = 8, 256, 32
    groups = packing.num_groups(k, group_size)
    q = np.tile(np.arange(16, dtype=np.uint8), (n, k // 16))
    zeros = np.zeros((n, groups), dtype=np.uint8)
    zeros[::2] = 15
    scales = np.full((n, groups), 4000.0, dtype=np.float16)  # 15 * 4000 = 60000 < fp16 max
    scales[1::4] = 1e-7                                        # subnormal products
    scales[2::4] = -0.37
    packed = packing.pack_for_plugin(q, scales, zeros, group_size)
    got = run_host_dequant(host_check, tmp_path, packed, n, k, group_size)
    want = packing.dequantize(q, scales, zeros, group_size).astype(np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_host_dequant_detects_a_wrong_nibble_order(host_check, tmp_path):
    """Packing in natural nibble order (not AWQ_ORDER) must NOT match: the check can fail."""
    n, k, group_size = 8, 64, 32
    rng = np.random.default_rng(7)
    q, scales, zeros = random_quantized(rng, n, k, group_size)
    natural = np.zeros((n, k // 8), dtype=np.uint32)
    for i in range(8):
        natural |= q[:, i::8].astype(np.uint32) << np.uint32(4 * i)
    packed = dict(packing.pack_for_plugin(q, scales, zeros, group_size), qweight=natural.view(np.int32))
    got = run_host_dequant(host_check, tmp_path, packed, n, k, group_size)
    want = packing.dequantize(q, scales, zeros, group_size).astype(np.float16)
    assert (got.view(np.uint16) != want.view(np.uint16)).any()


# ---------------------------------------------------------------- the tensor-core GEMV's fragment plan

def gemv_mma_lanes(x: np.ndarray, w_hat: np.ndarray, tiles: int = 1) -> np.ndarray:
    """awq_gemv_mma (plugins/kernels/gemv_w4a16.cu) lane by lane, in float64: blocks of 16 output
    rows a tile (tiles = 2: awq_gemv_mma32), 4 warps taking 128-k windows two at a time, lane (g, t)
    holding rows g and g + 8 of each tile for its 32 k (chunk 4 window + t) and row g of x; for
    word i and half h its 4 k are chunk 32 + 8i + 4h .. + 3, the pairs dequant_word gives as 2h
    and 2h + 1. Then the warps' tiles summed."""
    M, K = x.shape
    N = w_hat.shape[0]
    xp = np.zeros((8, K))
    xp[:M] = x
    windows, y = -(-K // 128), np.zeros((M, N))
    for n0 in range(0, N, 16 * tiles):
        partial = np.zeros((4, 16 * tiles, 8))
        for warp in range(4):
            acc = np.zeros((tiles, 32, 4))
            for w0 in range(2 * warp, windows, 8):
                for s in range(2):
                    for i in range(4):
                        for j in range(tiles):
                            for h in range(2):
                                a, b = np.zeros((32, 4, 2)), np.zeros((32, 2, 2))
                                for lane in range(32):
                                    g, t = divmod(lane, 4)
                                    k = ((w0 + s) * 4 + t) * 32 + 8 * i + 4 * h
                                    if k >= K:
                                        continue
                                    row = [w_hat[n] if n < N else np.zeros(K) for n in (n0 + 16 * j + g,
                                                                                         n0 + 16 * j + g + 8)]
                                    a[lane] = row[0][k:k + 2], row[1][k:k + 2], row[0][k + 2:k + 4], row[1][k + 2:k + 4]
                                    b[lane] = xp[g, k:k + 2], xp[g, k + 2:k + 4]
                                emulate_mma_16816(acc[j], a, b)
            for j in range(tiles):
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    partial[warp, 16 * j + g, 2 * t:2 * t + 2] = acc[j, lane, :2]
                    partial[warp, 16 * j + g + 8, 2 * t:2 * t + 2] = acc[j, lane, 2:]
        rows = min(16 * tiles, N - n0)
        y[:, n0:n0 + rows] = partial.sum(axis=0)[:rows, :M].T
    return y


@pytest.mark.parametrize("m, n, k", [(2, 72, 576), (5, 40, 96), (8, 24, 1024), (3, 16, 32)])
def test_the_tensor_core_gemvs_fragment_plan_computes_x_times_w_hat(m, n, k):
    """The k order awq_gemv_mma gives its lanes (each lane's own words, in dequant_word's pairs, as
    the mma's A columns and the matching x as its B rows) covers every k of every row once: with
    ragged windows (K = 576, 96, 32: windows some lanes or warps have nothing of) and N % 16 = 8;
    with blocks of one tile of 16 rows and (awq_gemv_mma32) of two, x shared by both."""
    rng = np.random.default_rng(m * n + k)
    w_hat = rng.standard_normal((n, k))
    x = rng.standard_normal((m, k))
    for tiles in (1, 2):
        got = gemv_mma_lanes(x, w_hat, tiles)
        assert np.allclose(got, x @ w_hat.T, rtol=1e-12, atol=1e-9), tiles
