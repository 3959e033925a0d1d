"""CUDA kernels' own source run on the CPU (tests/cuda_on_cpu/emulate.h: a thread per GPU
thread, barriers for __syncthreads and the warp collectives), against their twins: the int4
head's candidate search and re-scoring (plugins/kernels/head_top_k.cu) and the decode sampler
(sample.cu), both built on select.cuh. This checks their logic (indices, synchronization, what
the warp collectives return) in CI; the GPU tests check them on the hardware."""
from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

from awq_edge import plugins
from awq_edge.decoder import HEAD_TOP_K, head_slices
from awq_edge.reference_backend import twin_head_top_k, twin_lm_head
from awq_edge.sampling import SamplingSettings, candidates, choose_token
from native_helpers import head_candidates_twin

HERE = plugins.PLUGINS_DIR.parent / "tests" / "cuda_on_cpu"
THREADS = 1024  # the kernels' block (cuda_backend.HEAD_SELECT_THREADS, SAMPLE_THREADS)
P, I32, F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_float


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    cxx, include = shutil.which("g++"), plugins.cuda_include_dir()
    if cxx is None or include is None:
        pytest.skip(f"needs g++ and the CUDA headers; found g++={cxx}, CUDA include={include}")
    out = tmp_path_factory.mktemp("cuda_on_cpu")
    objects = []
    for name in ("head_top_k", "sample"):
        objects.append(out / f"{name}.o")
        subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-fPIC", "-Werror", "-Wall", "-Wno-unknown-pragmas",
                        "-Wno-unused-function", "-c",
                        "-I", str(plugins.PLUGINS_DIR / "kernels"), "-isystem", str(include),
                        "-include", str(HERE / "emulate.h"), "-o", str(objects[-1]), str(HERE / f"{name}.cpp")],
                       check=True)
    subprocess.run([cxx, "-shared", "-pthread", "-o", str(out / "kernels.so"), *map(str, objects)], check=True)
    lib = ctypes.CDLL(str(out / "kernels.so"))
    lib.cpu_head_candidates.argtypes = [P, I32, I32, I32, P, P, I32, I32]
    lib.cpu_head_rescore.argtypes = [P, P, I32, I32, P, P, I32, F32, P, I32, I32]
    lib.cpu_sample_step.argtypes = [P, I32, P, P, I32, F32, F32, I32, F32, P, P, P, I32]
    return lib


@pytest.mark.parametrize("vocab", [5, 100, 2049, 5000])
def test_the_int4_heads_selection_kernels_choose_the_twins_set(kernels, vocab):
    """awq_head_candidates: each slice's top 64 keys and ids exactly as its block plan has them;
    awq_head_rescore: the top 64 of those (lowest ids on ties, NaN last) recomputed from the
    table in place, every other logit untouched: on logits with ties within and across slices,
    infinities and NaN, and all equal."""
    rng = np.random.default_rng(vocab)
    top_k = min(HEAD_TOP_K, vocab)
    slices, length = head_slices(vocab)
    hidden = 16
    x = rng.standard_normal(hidden).astype(np.float16)
    table = rng.standard_normal((vocab, hidden)).astype(np.float16)
    few = np.array([np.nan, -np.inf, np.inf, -1.5, 0.0, 2.25, 7.0], np.float32)
    for logits in (rng.choice(few, vocab), np.round(rng.standard_normal(vocab), 1).astype(np.float32),
                   np.full(vocab, 3.0, np.float32)):
        keys, ids = np.full(slices * top_k, 7, np.uint32), np.full(slices * top_k, -7, np.int32)
        kernels.cpu_head_candidates(logits.ctypes.data, vocab, length, top_k, keys.ctypes.data, ids.ctypes.data,
                                    slices, THREADS)
        want_keys, want_ids = head_candidates_twin(logits, vocab, length, top_k)
        assert np.array_equal(keys, want_keys.reshape(-1)) and np.array_equal(ids, want_ids.reshape(-1))
        got = logits.copy()
        kernels.cpu_head_rescore(keys.ctypes.data, ids.ctypes.data, slices * top_k, top_k, x.ctypes.data,
                                 table.ctypes.data, hidden, 30.0, got.ctypes.data, -(-top_k // 8), THREADS)
        chosen = twin_head_top_k(logits, top_k)
        assert np.allclose(got[chosen], twin_lm_head(x, table[chosen], 30.0), rtol=1e-5, atol=1e-5)
        others = np.setdiff1d(np.arange(vocab), chosen)
        assert np.array_equal(got[others], logits[others], equal_nan=True)


def sample_on_cpu(kernels, logits: np.ndarray, settings: SamplingSettings, seen, uniform: float):
    """(token, the history after the step) of awq_sample_step, the cuda backend's sampler."""
    vocab = logits.size
    history = np.zeros(64, np.int32)
    history[:len(seen)] = seen
    n_seen = np.array([len(seen)], np.int32)
    work, token = np.zeros(2 * vocab, np.float32), np.full(1, -7, np.int32)
    draw = np.array([uniform], np.float32)
    kernels.cpu_sample_step(logits.ctypes.data, vocab, history.ctypes.data, n_seen.ctypes.data, history.size,
                            settings.repetition_penalty, settings.temperature, settings.top_k, settings.top_p,
                            draw.ctypes.data, work.ctypes.data, token.ctypes.data, THREADS)
    return int(token[0]), history[:int(n_seen[0])].tolist()


@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (0.0, 50, 0.95, 1.0), (0.0, 0, 1.0, 1.3), (0.7, 50, 0.95, 1.0), (1.0, 0, 0.9, 1.0), (1.2, 300, 0.5, 1.1),
    (0.5, 1, 1.0, 1.0)])
def test_the_decode_sampler_picks_the_host_samplers_token(kernels, temperature, top_k, top_p, penalty):
    """awq_sample_step on the CPU against sampling.choose_token: the same token for the same
    draw (greedy always; else at least 3 of 4 draws, float rounding at a boundary aside, and
    always one of the host's kept ids), appended to the device history; NaN logits never win,
    ties go to the lowest id."""
    settings = SamplingSettings(temperature, top_k, top_p, penalty)
    rng = np.random.default_rng(top_k + int(10 * temperature))
    agree = 0
    for vocab in (600, 1500):
        logits = (rng.standard_normal(vocab) * 3).astype(np.float32)
        nan_ids = rng.integers(0, vocab, 5).tolist() + [int(np.argmax(logits))]
        logits[nan_ids] = np.nan
        seen = rng.integers(0, vocab, 10).tolist()
        for u in rng.random(2):
            got, history = sample_on_cpu(kernels, logits, settings, seen, float(u))
            assert history == seen + [got] and got not in nan_ids
            want = choose_token(logits, settings, seen, float(u))
            agree += got == want
            assert got == want if temperature == 0 else got in set(candidates(logits, settings, seen)[0].tolist())
    assert agree >= 3
    ties = np.zeros(2000, np.float32)
    ties[[1500, 17, 900]] = 5.0
    assert sample_on_cpu(kernels, ties, SamplingSettings(0.0), [], 0.0)[0] == 17
    close = np.zeros(2000, np.float32)
    close[[17, 900]] = 5.0, 4.9  # top-k 1 keeps 17 alone, however high the draw
    assert sample_on_cpu(kernels, close, SamplingSettings(1.0, 1, 1.0), [], 0.99)[0] == 17
