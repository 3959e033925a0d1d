"""CUDA kernels' own source run on the CPU (tests/cuda_on_cpu/emulate.h: a thread per GPU
thread, barriers for __syncthreads and the warp collectives, mma.sync's fragments exchanged),
against their twins: the int4 head's candidate search and re-scoring (head_top_k.cu), the decode
sampler (sample.cu), both built on select.cuh; then the whole cuda backend, every kernel of a
decode step and of prefill, against the reference executor. This checks their logic (indices,
synchronization, what the collectives return, the fragment layouts) in CI; the GPU tests check
them on the hardware."""
from __future__ import annotations

import numpy as np
import pytest

from awq_edge.cuda_backend import GEMV_FUSIONS, LM_HEAD_ROWS_PER_BLOCK, NORM_THREADS
from awq_edge.cuda_driver import f32, i32, ptr
from awq_edge.decoder import HEAD_TOP_K, head_slices
from awq_edge.reference_backend import twin_embed, twin_head_top_k, twin_lm_head
from awq_edge.sampling import SamplingSettings, candidates, choose_token
from native_helpers import (EmulatedDriver, build_emulated_kernels, fused_gemv_error, head_candidates_twin,
                            load_benchmark, on_device, prefill_attention_error, random_quantized,
                            split_attention_errors, tie_heavy_logits)
from test_export_helpers import longrope

THREADS = 1024  # the selection kernels' block (cuda_backend.HEAD_SELECT_THREADS, SAMPLE_THREADS)


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    lib = build_emulated_kernels(tmp_path_factory.mktemp("cuda_on_cpu"))
    if lib is None:
        pytest.skip("needs g++ and the CUDA headers")
    return lib


def run(lib, name: str, grid: tuple, threads: int, args: list, adversarial: bool = False,
        concurrent: bool = False) -> None:
    """One kernel over host arrays: args are numpy arrays (copied to the driver's guarded memory
    and back: an access past an end fails), ints or floats; in emulate.h's plain, adversarial or
    concurrent schedule (EmulatedDriver)."""
    driver = EmulatedDriver(lib, adversarial, concurrent)
    arrays = [a for a in args if isinstance(a, np.ndarray)]
    with on_device(driver, {i: a for i, a in enumerate(arrays)}) as dev:
        pointers = iter(dev.values())
        values = [ptr(next(pointers)) if isinstance(a, np.ndarray) else f32(a) if isinstance(a, float) else i32(a)
                  for a in args]
        driver.run(name, grid, (threads,), values)
        for i, a in enumerate(arrays):
            driver.download(a, dev[i])


# The kernel tests below run each case twice: in the emulation's plain schedule (a cp.async copy
# lands at its wait: a stage read too early is stale) and its adversarial one (warps one at a time
# to their next barrier, from either end in turn, blocks in reverse, copies landed at issue: a
# stage refilled while another warp still reads it is overwritten; emulate.h).
SCHEDULES = pytest.mark.parametrize("adversarial", [False, True], ids=["plain", "adversarial"])


def test_an_access_a_gpu_faults_on_fails_its_emulated_launch_which_says_where(emulated):
    """What runs on an x86 but faults on a GPU fails the emulated launch, saying where: the fp16
    head (16-byte loads of its table rows) on a table 2 bytes past an aligned address (on an x86
    the right logits), at the kernel's line; a vocabulary past the table's end, or a table
    starting before its buffer (an adversarial driver's guard page is before each buffer), at the
    address. An index past a local array fails the same way (-fsanitize=bounds: launch.cpp). On
    an aligned table of the right size the same launch gives the twin's logits."""
    rng = np.random.default_rng(3)
    hidden, vocab = 64, 40
    x, table = rng.standard_normal(hidden).astype(np.float16), rng.standard_normal((vocab, hidden)).astype(np.float16)
    for adversarial in (False, True):
        driver = EmulatedDriver(emulated, adversarial)
        row = 2 * hidden
        with on_device(driver, {"x": x, "table": np.zeros(table.nbytes + 16, np.uint8),
                                "logits": np.zeros(vocab + 32, np.float32)}) as dev:
            def head(at: int, rows: int = vocab):
                driver.run("awq_lm_head", (-(-rows // LM_HEAD_ROWS_PER_BLOCK),), (NORM_THREADS,),
                           [ptr(dev["x"]), ptr(at), ptr(dev["logits"]), i32(rows), i32(hidden), f32(30.0), ptr(0)])
                return driver.array_at(dev["logits"], np.float32, (rows,)).copy()

            driver.upload(dev["table"], table)
            assert np.allclose(head(dev["table"]), twin_lm_head(x, table, 30.0), rtol=1e-5, atol=1e-5)
            driver.upload(dev["table"] + 2, table)
            at_its_line = r"awq_lm_head: block \(\d+, 0, 0\), thread \d+: \S*/lm_head\.cuh:\d+:\d+: a misaligned"
            with pytest.raises(AssertionError, match=at_its_line):
                head(dev["table"] + 2)
            past = (dev["table"] - 16 * row, vocab) if adversarial else (dev["table"], vocab + 24)
            with pytest.raises(AssertionError, match=r"awq_lm_head: block .*: an access at 0x[0-9a-f]+ outside every"):
                head(*past)


def test_the_embedding_and_heads_reach_the_last_rows_of_a_table_past_2_gib(emulated):
    """Gemma 3 27B's vocabulary (262144) at its hidden size (5376): an fp16 table of 2.8 GB, whose
    byte offsets do not fit 32 bits. The embedding of the last ids, the last block of the fp16,
    int8 and int4 heads (CUDA and tensor cores), and the int4 head's re-scoring of the last rows
    give those rows' values: an offset computed in 32 bits fails as a signed overflow
    (-fsanitize), or wrapped reads another row or faults. The tables are untouched zero pages but
    for their last rows, and the heads' grids run their last block only (cpu_first_block: every
    logit before that block's rows stays NaN)."""
    from awq_edge.cuda_backend import GEMV_TC_ROWS, GEMV_TC_THREADS
    from awq_edge.packing import dequantize

    vocab, hidden, g, last = 262144, 5376, 128, 32
    rng = np.random.default_rng(27)
    driver = EmulatedDriver(emulated)
    x = rng.standard_normal(hidden).astype(np.float16)

    def buffer(shape, dtype, tail=None) -> int:  # zero pages; the last rows `tail`
        at = driver.alloc(int(np.prod(shape)) * np.dtype(dtype).itemsize)
        if tail is not None:
            driver.array_at(at, dtype, shape)[-len(tail):] = tail
        return at

    def launch(name, blocks, threads, args, last_block_only=True):
        emulated.cpu_first_block(blocks - 1 if last_block_only else 0)
        driver.run(name, (blocks,), (threads,), args)

    def close(got, want):
        return np.abs(got - want).max() <= 1e-3 * np.abs(want).max()

    x_at, logits = buffer((1, hidden), np.float16, x[None]), buffer((vocab,), np.float32)
    driver.array_at(logits, np.float32, (vocab,))[:] = np.nan

    def got_logits(n: int) -> np.ndarray:  # the last n, none before them written; poisoned again after
        every = driver.array_at(logits, np.float32, (vocab,))
        assert np.isnan(every[:-n]).all(), "a logit before the last block's rows was written"
        got = every[-n:].copy()
        every[:] = np.nan
        return got

    rows = rng.standard_normal((last, hidden)).astype(np.float16)  # fp16 table
    table = buffer((vocab, hidden), np.float16, rows)
    ids, out = buffer((last,), np.int32, np.arange(vocab - last, vocab, dtype=np.int32)), buffer(rows.shape, np.float16)
    launch("awq_embed", last, NORM_THREADS, [ptr(ids), ptr(table), ptr(out), i32(hidden), i32(vocab), f32(1.0)],
           last_block_only=False)
    assert np.array_equal(driver.array_at(out, np.float16, rows.shape), rows)
    bias = rng.standard_normal(last).astype(np.float32)  # a head bias (Phi's), its last rows
    bias_at = buffer((vocab,), np.float32, bias)
    launch("awq_lm_head", vocab // LM_HEAD_ROWS_PER_BLOCK, NORM_THREADS,
           [ptr(x_at), ptr(table), ptr(logits), i32(vocab), i32(hidden), f32(0.0), ptr(bias_at)])
    assert close(got_logits(last), twin_lm_head(x, rows, 0.0, bias))
    keys = buffer((8,), np.uint32, np.arange(8, dtype=np.uint32))
    chosen = buffer((8,), np.int32, np.arange(vocab - 8, vocab, dtype=np.int32))
    launch("awq_head_rescore", 1, THREADS, [ptr(keys), ptr(chosen), i32(8), i32(8), ptr(x_at), ptr(table),
                                            i32(hidden), f32(30.0), ptr(logits)])
    assert close(got_logits(8), twin_lm_head(x, rows[-8:], 30.0))
    for at in (table, ids, out, keys, chosen, bias_at):
        driver.free(at)

    q8 = rng.integers(-127, 128, (last, hidden)).astype(np.int8)  # int8 table, a scale a 32 values
    s8 = rng.uniform(0.001, 0.01, (last, hidden // 32)).astype(np.float16)
    table, scales = buffer((vocab, hidden), np.int8, q8), buffer((vocab, hidden // 32), np.float16, s8)
    launch("awq_lm_head_q8", vocab // LM_HEAD_ROWS_PER_BLOCK, NORM_THREADS,
           [ptr(x_at), ptr(table), ptr(scales), ptr(logits), i32(vocab), i32(hidden), f32(0.0), ptr(0)])
    w8 = q8.astype(np.float32) * np.repeat(s8.astype(np.float32), 32, axis=1)
    assert close(got_logits(last), w8 @ x.astype(np.float32))
    ids, out = buffer((last,), np.int32, np.arange(vocab - last, vocab, dtype=np.int32)), buffer((last, hidden),
                                                                                                  np.float16)
    launch("awq_embed_q8", last, NORM_THREADS, [ptr(ids), ptr(table), ptr(scales), ptr(out), i32(hidden), i32(vocab),
                                                f32(2.0)], last_block_only=False)  # (an int8 table: 1.4 GB)
    assert np.array_equal(driver.array_at(out, np.float16, (last, hidden)), twin_embed(np.arange(last), q8, 2.0, s8))
    for at in (table, scales, ids, out):
        driver.free(at)

    q, s, z, packed = random_quantized(rng, last, hidden, g)  # int4 head, group 128
    weights = [buffer((vocab, *packed[name].shape[1:]), packed[name].dtype, packed[name])
               for name in ("qweight", "scales", "zeros")]
    want = dequantize(q, s, z, g).astype(np.float16).astype(np.float32) @ x.astype(np.float32)
    args = [*map(ptr, (x_at, *weights, logits)), i32(vocab), i32(hidden), i32(vocab), f32(0.0)]
    launch(f"awq_gemv_logits_g{g}_w4", vocab // 4, 128, args)
    assert close(got_logits(4), want[-4:])
    launch(f"awq_gemv_tc_logits_g{g}", vocab // GEMV_TC_ROWS, GEMV_TC_THREADS, args)
    assert close(got_logits(GEMV_TC_ROWS), want[-GEMV_TC_ROWS:])


@SCHEDULES
@pytest.mark.parametrize("vocab", [5, 100, 2049, 5000])
def test_the_int4_heads_selection_kernels_choose_the_twins_set(emulated, vocab, adversarial):
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
    for logits in tie_heavy_logits(rng, vocab):
        keys, ids = np.full(slices * top_k, 7, np.uint32), np.full(slices * top_k, -7, np.int32)
        run(emulated, "awq_head_candidates", (slices,), THREADS, [logits, vocab, length, top_k, keys, ids], adversarial)
        want_keys, want_ids = head_candidates_twin(logits, vocab, length, top_k)
        assert np.array_equal(keys, want_keys.reshape(-1)) and np.array_equal(ids, want_ids.reshape(-1))
        got = logits.copy()
        run(emulated, "awq_head_rescore", (-(-top_k // 8),), THREADS,
            [keys, ids, slices * top_k, top_k, x, table, hidden, 30.0, got], adversarial)
        chosen = twin_head_top_k(logits, top_k)
        assert np.allclose(got[chosen], twin_lm_head(x, table[chosen], 30.0), rtol=1e-5, atol=1e-5)
        others = np.setdiff1d(np.arange(vocab), chosen)
        assert np.array_equal(got[others], logits[others], equal_nan=True)


def sample_on_cpu(lib, logits: np.ndarray, settings: SamplingSettings, seen, uniform: float, adversarial=False):
    """(token, the history after the step) of awq_sample_step, the cuda backend's sampler."""
    vocab = logits.size
    history = np.zeros(64, np.int32)
    history[:len(seen)] = seen
    n_seen = np.array([len(seen)], np.int32)
    work, token = np.zeros(2 * vocab, np.float32), np.full(1, -7, np.int32)
    draw = np.array([uniform], np.float32)
    run(lib, "awq_sample_step", (1,), THREADS,
        [logits, vocab, history, n_seen, history.size, float(settings.repetition_penalty),
         float(settings.temperature), settings.top_k, float(settings.top_p), draw, work, token], adversarial)
    return int(token[0]), history[:int(n_seen[0])].tolist()


@SCHEDULES
@pytest.mark.parametrize("temperature, top_k, top_p, penalty", [
    (0.0, 50, 0.95, 1.0), (0.0, 0, 1.0, 1.3), (0.7, 50, 0.95, 1.0), (1.0, 0, 0.9, 1.0), (1.2, 300, 0.5, 1.1),
    (0.5, 1, 1.0, 1.0)])
def test_the_decode_sampler_picks_the_host_samplers_token(emulated, temperature, top_k, top_p, penalty, adversarial):
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
            got, history = sample_on_cpu(emulated, logits, settings, seen, float(u), adversarial)
            assert history == seen + [got] and got not in nan_ids
            want = choose_token(logits, settings, seen, float(u))
            agree += got == want
            assert got == want if temperature == 0 else got in set(candidates(logits, settings, seen)[0].tolist())
    assert agree >= 3
    ties = np.zeros(2000, np.float32)
    ties[[1500, 17, 900]] = 5.0
    assert sample_on_cpu(emulated, ties, SamplingSettings(0.0), [], 0.0, adversarial)[0] == 17
    close = np.zeros(2000, np.float32)
    close[[17, 900]] = 5.0, 4.9  # top-k 1 keeps 17 alone, however high the draw
    assert sample_on_cpu(emulated, close, SamplingSettings(1.0, 1, 1.0), [], 0.99, adversarial)[0] == 17


@SCHEDULES
@pytest.mark.parametrize("kernel, m", [("awq_gemv_mma_g32", 8), ("awq_gemv_mma_g32", 3), ("awq_gemv_mma_g64", 2),
                                       ("awq_gemv_mma_g128", 5), ("awq_gemv_mma32_g32", 8),
                                       ("awq_gemv_mma32_g64", 4), ("awq_gemv_mma32_g128", 3),
                                       ("awq_gemv_mma_x16_g64", 9), ("awq_gemv_mma_x16_g128", 16),
                                       ("awq_gemv_mma_x32_g32", 17), ("awq_gemv_mma_x32_g64", 24),
                                       ("awq_gemv_mma_x32_g128", 32)])
@pytest.mark.parametrize("n, k", [(72, 576), (40, 256), (40, 2176)])
def test_the_tensor_core_gemvs_give_x_times_w_hat(emulated, kernel, m, n, k, adversarial):
    """The tensor-core GEMV with 16 and 32 rows a block, and for up to 16 and 32 rows of x in one
    pass (B tiles of 8 rows, the last one partly past M): N = 72 and 40 leave a block's second
    tile (of 32 rows) or half a tile outside, K = 576 windows some warps have nothing of, and
    K = 2176 (17 windows) gives a warp 3 steps, each loaded while the one before is multiplied."""
    from awq_edge.packing import dequantize

    g = int(kernel.rsplit("_g", 1)[1])
    rng = np.random.default_rng(m + n + k + g)
    q, scales, zeros, packed = random_quantized(rng, n, k, g)
    x = rng.standard_normal((m, k)).astype(np.float16)
    y = np.full((m, n), np.nan, np.float16)
    rows = 32 if "mma32" in kernel else 16
    run(emulated, kernel, (-(-n // rows),), 128, [x, packed["qweight"], packed["scales"], packed["zeros"], y, m, n, k],
        adversarial)
    want = x.astype(np.float32) @ dequantize(q, scales, zeros, g).astype(np.float16).astype(np.float32).T
    assert np.abs(y.astype(np.float32) - want).max() <= 2e-3 * np.abs(want).max()


@SCHEDULES
@pytest.mark.parametrize("g", [32, 64, 128])
def test_the_int4_heads_gemvs_give_soft_capped_logits_below_the_vocabulary(emulated, g, adversarial):
    """An int4 head's first pass at every group size: awq_gemv_logits_g{G}_w{W} (CUDA cores; W = 1
    at a K whose last group is short, 4 at K % 32 == 0) and awq_gemv_tc_logits_g{G} (tensor cores,
    a block a 16-row tile and 2 blocks taking them in turn): fp32 x W^T soft-capped, written for
    the rows below the vocabulary only (N = 72 rows, a vocabulary of 70)."""
    from awq_edge.cuda_backend import GEMV_TC_ROWS, GEMV_TC_THREADS
    from awq_edge.packing import dequantize

    n, vocab, softcap = 72, 70, 30.0
    rng = np.random.default_rng(g)
    for k, kernel, grid, threads in ((2 * g + 40, f"awq_gemv_logits_g{g}_w1", n // 4, 128),
                                     (2 * g, f"awq_gemv_logits_g{g}_w4", n // 4, 128),
                                     (2 * g, f"awq_gemv_tc_logits_g{g}", -(-n // GEMV_TC_ROWS), GEMV_TC_THREADS),
                                     (2 * g, f"awq_gemv_tc_logits_g{g}", 2, GEMV_TC_THREADS)):
        q, scales, zeros, packed = random_quantized(rng, n, k, g)
        x = (rng.standard_normal(k) * 3).astype(np.float16)
        logits = np.full(n, np.nan, np.float32)
        run(emulated, kernel, (grid,), threads,
            [x, packed["qweight"], packed["scales"], packed["zeros"], logits, n, k, vocab, softcap], adversarial)
        sums = x.astype(np.float32) @ dequantize(q, scales, zeros, g).astype(np.float16).astype(np.float32).T
        want = softcap * np.tanh(sums / softcap)
        assert np.abs(logits[:vocab] - want[:vocab]).max() <= 1e-3 * np.abs(want).max(), (kernel, grid)
        assert np.isnan(logits[vocab:]).all(), (kernel, grid)


@SCHEDULES
@pytest.mark.parametrize("g, wide", [(32, False), (32, True), (64, False), (64, True), (128, False), (128, True)])
def test_the_cuda_core_gemv_of_1_to_8_rows_gives_x_times_w_hat(emulated, g, wide, adversarial):
    """awq_gemv_rows{M}_g{G}_w{W} (short prefill chunks where K % 32 != 0, 8 rows at a time; the C
    launcher awq_w4a16_gemv) for every M = 1..8 at every group size: W = 1 (a word a load) at a K
    whose last group is short, W = 4 (16-byte loads) at K % 32 == 0; N = 12, three blocks."""
    from awq_edge.packing import dequantize

    n, k = 12, 2 * g + (0 if wide else 40)
    rng = np.random.default_rng(g + k)
    q, scales, zeros, packed = random_quantized(rng, n, k, g)
    w_hat = dequantize(q, scales, zeros, g).astype(np.float16).astype(np.float32)
    for m in range(1, 9):
        x = rng.standard_normal((m, k)).astype(np.float16)
        y = np.full((m, n), np.nan, np.float16)
        run(emulated, f"awq_gemv_rows{m}_g{g}_w{4 if wide else 1}", (n // 4,), 128,
            [x, packed["qweight"], packed["scales"], packed["zeros"], y, n, k], adversarial)
        want = x.astype(np.float32) @ w_hat.T
        assert np.abs(y.astype(np.float32) - want).max() <= 2e-3 * np.abs(want).max(), m


@SCHEDULES
@pytest.mark.parametrize("splits, m, n, k, g", [(3, 70, 72, 576, 128), (2, 40, 136, 200, 32), (1, 5, 40, 96, 64),
                                                 (1, 65, 128, 40, 32), (2, 33, 40, 200, 64), (1, 20, 72, 328, 128)])
def test_the_gemm_with_k_split_gives_x_times_w_hat(emulated, splits, m, n, k, g, adversarial):
    """awq_gemm_g{G}_v{V} over gridDim.z splits of its K steps (uneven shares; K = 200, 328 and 40:
    one-word copies (V = 0, at every group size) and a short last step; K = 40 and 96: fewer steps
    than the pipeline copies ahead; N = 72 and 136: tiles of 128 rows partly past N), each split's
    accumulators summed by the output tile's last block, twice on the same workspace: the counters
    must be left at zero. The emulated cp.async lands a copy only at its thread's wait, so a step
    read before its wait fails."""
    from awq_edge.cuda_backend import GEMM_SPLIT_TILE_BYTES, GEMM_THREADS, gemm_grid
    from awq_edge.packing import dequantize

    rng = np.random.default_rng(splits + m + n + k)
    q, scales, zeros, packed = random_quantized(rng, n, k, g)
    grid = (*gemm_grid(m, n), splits)
    partials = np.full(splits * grid[0] * grid[1] * GEMM_SPLIT_TILE_BYTES // 4, np.nan, np.float32)
    counters = np.zeros(grid[0] * grid[1], np.int32)
    for _ in range(2):
        x = rng.standard_normal((m, k)).astype(np.float16)
        y = np.full((m, n), np.nan, np.float16)
        run(emulated, f"awq_gemm_g{g}_v{int(k % 32 == 0)}", grid, GEMM_THREADS,
            [x, packed["qweight"], packed["scales"], packed["zeros"], y, m, n, k, partials, counters], adversarial)
        want = x.astype(np.float32) @ dequantize(q, scales, zeros, g).astype(np.float16).astype(np.float32).T
        assert np.abs(y.astype(np.float32) - want).max() <= 2e-3 * np.abs(want).max()
        assert not counters.any()


@SCHEDULES
@pytest.mark.parametrize("n, k, g", [(40, 256, 32), (24, 192, 64), (16, 384, 128), (8, 200, 32)])
def test_the_dequantize_kernel_gives_w_hat_bit_for_bit(emulated, n, k, g, adversarial):
    """awq_dequantize_g{G} (cuBLAS prefill's first half) at every group size, K = 200 a short last
    group: packing.dequantize's fp16 values exactly (the GEMM and the GEMV round the same way)."""
    from awq_edge.packing import dequantize

    rng = np.random.default_rng(n + k + g)
    q, scales, zeros, packed = random_quantized(rng, n, k, g)
    w = np.full((n, k), np.nan, np.float16)
    run(emulated, f"awq_dequantize_g{g}", (-(-n * k // 8 // 256),), 256,
        [packed["qweight"], packed["scales"], packed["zeros"], w, n, k], adversarial)
    assert np.array_equal(w, dequantize(q, scales, zeros, g).astype(np.float16))


@SCHEDULES
@pytest.mark.parametrize("blocks", [None, 3], ids=["block-a-tile", "persistent"])
@pytest.mark.parametrize("k, n, group_size", [(576, 192, 128), (256, 200, 64), (512, 256, 32)])
@pytest.mark.parametrize("fusion", GEMV_FUSIONS)
def test_the_tensor_core_decode_gemvs_match_their_twins(emulated, fusion, k, n, group_size, blocks, adversarial):
    """awq_gemv_tc_* (gemv_tc: the window sums scaled after the mma at G = 128, dequantized
    operands at G = 32 and 64) with every fusion, against the twins, on a block a tile and on 3
    blocks taking 4-6 tiles each: K = 576 and 256 leave some of the 8 warps without a window and
    a window half empty, N = 200 half a tile (256 with RoPE: q/k/v rows are whole heads of 64)."""
    n = -(-n // 64) * 64 if fusion.endswith("rope") else n
    driver = EmulatedDriver(emulated, adversarial)
    err = fused_gemv_error(driver, f"awq_gemv_tc_{fusion}_g{group_size}", fusion, k, n, group_size,
                           tensor_cores=True, blocks=blocks)
    assert err < 5e-3, err


@SCHEDULES
@pytest.mark.parametrize("k, n, group_size", [(136, 192, 32), (256, 136, 32), (256, 200, 64), (200, 136, 64),
                                              (384, 136, 128), (328, 200, 128)])
@pytest.mark.parametrize("fusion", GEMV_FUSIONS)
def test_the_cuda_core_decode_gemvs_match_their_twins(emulated, fusion, k, n, group_size, adversarial):
    """awq_gemv_{fusion}_g{G}_w{W} (the CUDA-core decode GEMV) with every fusion at every group
    size and both load widths, against the twins: K = 136, 200 and 328 one word a load (w1, a
    short last group), K % 32 == 0 16 bytes (w4); N = 200 and 136 a last block partly past N
    (whole heads of 64 with RoPE)."""
    n = -(-n // 64) * 64 if fusion.endswith("rope") else n
    driver = EmulatedDriver(emulated, adversarial)
    err = fused_gemv_error(driver, f"awq_gemv_{fusion}_g{group_size}_w{4 if k % 32 == 0 else 1}", fusion, k, n,
                           group_size, tensor_cores=False)
    assert err < 5e-3, err


@pytest.mark.parametrize("kind", ["silu", "gelu_tanh", "gelu", "relu2"])
def test_the_act_kernel_is_its_twin_and_the_twin_is_transformers_activation(emulated, kind):
    """awq_act (activation.cuh, which the decode GEMV's act epilogue shares) over every activation
    without parameters, gated (act(gate) * up, rows interleaved) and not: its twin's fp16 values
    within one rounding; the twin within one fp16 rounding of transformers' own function of that
    name in float64 (exact GELU's erf is not the tanh approximation: ~10 % apart at -3)."""
    import torch
    from transformers.activations import ACT2FN

    from awq_edge.cuda_backend import act_code
    from awq_edge.export.spec import ACTIVATION_NAMES
    from awq_edge.reference_backend import twin_act

    rng = np.random.default_rng(len(kind))
    rows, inter = 3, 200
    for gated in (True, False):
        gate_up = (rng.standard_normal((rows, (2 if gated else 1) * inter)) * 3).astype(np.float16)
        got = np.full((rows, inter), np.nan, np.float16)
        run(emulated, "awq_act", (rows,), NORM_THREADS,
            [gate_up, got, inter, act_code(kind, gated), np.zeros(4, np.float32)])
        want = twin_act(gate_up, kind, gated)
        g = torch.from_numpy(gate_up[:, 0::2] if gated else gate_up).double()
        exact = ACT2FN[ACTIVATION_NAMES[kind][0]](g) * (torch.from_numpy(gate_up[:, 1::2]).double() if gated else 1)
        # one fp16 step at each value, and 1e-5 where 1 + tanh or 1 + erf cancels in float32 (x below -4; the
        # tanh approximation is 1e-4 to 4e-4 off for x in -4..-1)
        bound = np.spacing(np.abs(want)).astype(np.float64) + 1e-5
        assert np.all(np.abs(got.astype(np.float64) - want) <= bound), (kind, gated)
        assert np.all(np.abs(want - exact.numpy()) <= bound), (kind, gated)


@SCHEDULES
@pytest.mark.parametrize("kernel, d, heads, past, rows, window, softcap, sinks", [
    ("mma", 256, (2, 1), 40, 37, 9, 0.0, False), ("mma", 256, (2, 2), 0, 70, 0, 30.0, False),
    ("mma", 128, (4, 2), 100, 20, 0, 0.0, False), ("block", 64, (2, 1), 20, 37, 9, 0.0, False),
    ("block", 128, (4, 2), 0, 20, 0, 30.0, False), ("block", 256, (2, 2), 30, 17, 0, 0.0, False),
    ("", 128, (4, 2), 30, 9, 0, 0.0, False), ("", 256, (2, 1), 40, 15, 7, 30.0, False),
    ("mma", 96, (4, 2), 140, 70, 0, 0.0, False), ("", 96, (2, 1), 130, 9, 50, 30.0, False),
    ("mma", 64, (4, 2), 10, 20, 5, 0.0, True), ("block", 64, (4, 2), 10, 20, 0, 0.0, True),
    ("", 64, (4, 2), 10, 3, 0, 0.0, True)])
def test_the_prefill_attentions_match_their_twin(emulated, kernel, d, heads, past, rows, window, softcap, sinks,
                                                 adversarial):
    """awq_attend_mma_d{D} (tensor cores, 32-key tiles at head size 256): a window shorter than a
    warp's tokens, GQA, a last block of 6 tokens, the soft-cap. awq_attend_block_d{D} (16 tokens a
    block sharing each K/V tile, CUDA cores; benchmarks/cuda_attention.py measures it beside the
    others) at every head size, a last block of 5 or 1 tokens. awq_attend_d{D} (a block per token:
    chunks of fewer than 16 rows, as a chat's next turn feeds) at head sizes 128 and 256, which the
    backend cases reach only at 64. Head size 96 (Phi-3 and 3.5-mini; 12 chunks of 8 dims, 10 groups
    of 120 threads, 8 idle in the value walk) on both, past more than a tile of keys. Outputs
    poisoned with NaN. Each with a sink a head (gpt-oss's, Granite SWA's) at head size 64."""
    driver = EmulatedDriver(emulated, adversarial)
    name = f"awq_attend_{kernel}_d{d}" if kernel else f"awq_attend_d{d}"
    err = prefill_attention_error(driver, name, kernel, d, heads, past, rows, window, softcap, sinks)
    assert err < 5e-3, err


@SCHEDULES
@pytest.mark.parametrize("d, heads, window, softcap, sinks", [
    (64, (9, 3), 0, 0.0, False), (128, (4, 2), 100, 0.0, False), (256, (2, 2), 0, 50.0, False),
    (96, (4, 2), 0, 0.0, False), (96, (2, 1), 200, 30.0, False), (64, (4, 2), 0, 0.0, True)])
def test_the_split_decode_attention_matches_its_twin(emulated, d, heads, window, softcap, sinks, adversarial):
    """awq_attend_split over a 400-row cache at positions 300 and 301: full tiles of 128 keys (the
    value walk's batched loads and its remainder), splits past the position or before the window,
    and the per-head counters reset between the two steps. Head size 96: 13 keys a group, the
    last of them past the tile for the last 2 groups. A sink a head, added once in the merge."""
    driver = EmulatedDriver(emulated, adversarial)
    for pos, err in split_attention_errors(driver, f"awq_attend_split_d{d}", d, heads, window, softcap, 400,
                                           (300, 301), sinks):
        assert err < 5e-3, (pos, err)


@pytest.mark.parametrize("experts, top_k, sigmoid, bias, normalize, router_bias", [
    (64, 6, False, True, True, False), (32, 4, True, True, True, False), (128, 8, False, False, False, False),
    (5, 2, False, False, True, False), (32, 4, False, False, True, True)])
def test_the_expert_router_matches_its_twin(emulated, experts, top_k, sigmoid, bias, normalize, router_bias):
    """awq_moe_route (plugins/kernels/moe.cu) over 5 rows: the softmax (ERNIE 4.5's with expert biases,
    Qwen3-MoE's 128 experts, gpt-oss's with its logits biased) or sigmoid (LFM2-MoE's) router,
    renormalized or not, times a scale: the same experts in the same order as twin_moe_route, each
    expert's weight within float32 rounding. Experts 3 and 4 have the same router row (and biases):
    equal scores, the lower chosen first (the CPU engines' order)."""
    from awq_edge.cuda_backend import MOE_THREADS
    from awq_edge.reference_backend import twin_moe_route
    from native_helpers import on_device

    driver = EmulatedDriver(emulated)
    rng = np.random.default_rng(experts)
    rows, hidden = 5, 96
    x = rng.standard_normal((rows, hidden)).astype(np.float16)
    router = (rng.standard_normal((experts, hidden)) * 0.3).astype(np.float32)
    router[4] = router[3]
    expert_bias = rng.normal(0, 0.05, experts).astype(np.float32)
    expert_bias[4] = expert_bias[3]
    logit_bias = rng.normal(0, 0.5, experts).astype(np.float32)
    logit_bias[4] = logit_bias[3]
    arrays = {"x": x, "router": router, "bias": expert_bias, "logit_bias": logit_bias,
              "ids": np.full(rows * top_k, -1, np.int32), "weights": np.full(rows * top_k, np.nan, np.float32)}
    with on_device(driver, arrays) as dev:
        driver.launch("awq_moe_route", (rows,), (MOE_THREADS,),
                      [ptr(dev["x"]), ptr(dev["router"]), ptr(dev["logit_bias"] if router_bias else 0),
                       ptr(dev["bias"] if bias else 0), ptr(dev["ids"]),
                       ptr(dev["weights"]), i32(experts), i32(hidden), i32(top_k), i32(normalize), i32(sigmoid),
                       f32(1.5)])
        ids, weights = np.empty(rows * top_k, np.int32), np.empty(rows * top_k, np.float32)
        driver.download(ids, dev["ids"])
        driver.download(weights, dev["weights"])
    for r in range(rows):
        want_ids, want = twin_moe_route(x[r], router, logit_bias if router_bias else None,
                                        expert_bias if bias else None, top_k, normalize, sigmoid, 1.5)
        assert ids[r * top_k:(r + 1) * top_k].tolist() == want_ids, r
        np.testing.assert_allclose(weights[r * top_k:(r + 1) * top_k], want, rtol=1e-5)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_the_expert_gemvs_and_their_sum_match_their_twins(emulated, group_size):
    """awq_moe_gemv_{act,store}_g{G}_w{1,4} over 3 stacked experts (rows e * N ..), 2 rows of 2 slots each
    reading its expert's id from device memory (expert 2 twice, expert 0 once, expert 1 never), K = 128
    (16-byte loads) and 136 (4-byte), biases on the store's (gpt-oss's), outputs poisoned: each slot's
    rows as the twin computes that expert's (twin_linear, twin_act). Then awq_moe_combine: the slots'
    weighted sum plus a shared expert's output times sigmoid(its gate . x) (Qwen2-MoE's)."""
    from awq_edge.cuda_backend import GEMV_ROWS_PER_BLOCK, GEMV_THREADS, MOE_THREADS, act_code
    from awq_edge.reference_backend import dequantized, twin_act, twin_linear
    from native_helpers import on_device

    driver = EmulatedDriver(emulated)
    rng = np.random.default_rng(group_size)
    experts, n, rows, top_k = 3, 16, 2, 2
    ids = np.array([2, 0, 2, 2], np.int32)
    for k in (128, 136):
        packed = [random_quantized(rng, n, k, group_size)[3] for _ in range(experts)]
        stack = {key: np.concatenate([p[key] for p in packed]) for key in ("qweight", "scales", "zeros")}
        w_hat = dequantized(stack["qweight"], stack["scales"], stack["zeros"], group_size)
        bias = rng.normal(0, 0.5, experts * n).astype(np.float16)
        x = rng.standard_normal((rows, k)).astype(np.float16)
        for fusion, width in (("act", n // 2), ("store", n)):
            arrays = {"x": x, "ids": ids, "bias": bias, "y": np.full(rows * top_k * width, np.nan, np.float16), **stack}
            with on_device(driver, arrays) as dev:
                driver.launch(f"awq_moe_gemv_{fusion}_g{group_size}_w{4 if k % 32 == 0 else 1}",
                              (n // GEMV_ROWS_PER_BLOCK, top_k, rows), (GEMV_THREADS,),
                              [ptr(dev["x"]), i32(k), i32(0), ptr(dev["ids"]), i32(top_k), i32(experts),
                               ptr(dev["qweight"]), ptr(dev["scales"]), ptr(dev["zeros"]),
                               ptr(dev["bias"] if fusion == "store" else 0), ptr(dev["y"]), i32(n), i32(k),
                               i32(act_code("silu", True))])
                got = np.empty(rows * top_k * width, np.float16)
                driver.download(got, dev["y"])
            for slot, e in enumerate(ids):
                rows_e = slice(e * n, (e + 1) * n)
                y = twin_linear(x[slot // top_k][None], w_hat[rows_e], bias[rows_e] if fusion == "store" else None)
                want = twin_act(y, "silu") if fusion == "act" else y
                np.testing.assert_allclose(got[slot * width:(slot + 1) * width].astype(np.float32),
                                           want[0].astype(np.float32), rtol=2e-3, atol=2e-3, err_msg=(fusion, k, slot))
    hidden = 96
    y = rng.standard_normal((rows * top_k, hidden)).astype(np.float16)
    weights = rng.uniform(0.1, 1.0, rows * top_k).astype(np.float32)
    shared, gate = rng.standard_normal((rows, hidden)).astype(np.float16), rng.normal(0, 0.2, hidden).astype(np.float32)
    x = rng.standard_normal((rows, hidden)).astype(np.float16)
    arrays = {"y": y, "weights": weights, "shared": shared, "gate": gate, "x": x,
              "out": np.full(rows * hidden, np.nan, np.float16)}
    with on_device(driver, arrays) as dev:
        driver.launch("awq_moe_combine", (rows,), (MOE_THREADS,),
                      [ptr(dev["y"]), ptr(dev["weights"]), i32(top_k), ptr(dev["shared"]), ptr(dev["gate"]),
                       ptr(dev["x"]), ptr(dev["out"]), i32(hidden)])
        got = np.empty(rows * hidden, np.float16)
        driver.download(got, dev["out"])
    sigmoid = 1 / (1 + np.exp(-(x.astype(np.float64) @ gate)))
    want = (weights.reshape(rows, top_k, 1) * y.reshape(rows, top_k, hidden)).sum(1) + sigmoid[:, None] * shared
    np.testing.assert_allclose(got.reshape(rows, hidden), want, rtol=2e-3, atol=2e-3)


# (family, --lm-head, config overrides, fused op list, prompt length, decode GEMV, kernels it must
# launch): between them every kind of kernel the backend launches, at head sizes 64, 96, 128 and 256,
# K % 32 == 0 and not, a full prefill chunk, and every decode GEMV choice (cuda_backend.DECODE_GEMVS;
# "auto": the normed linears on the persistent tensor-core grid where K % 32 == 0, the rest on CUDA cores)
MOE_KERNELS = {"awq_moe_route", "awq_moe_gemv_act_g32_w4", "awq_moe_gemv_store_g32_w4", "awq_moe_combine"}
BACKEND_CASES = {
    "llama-int4-head-cuda-cores": ("llama", 4, {}, True, 20, "cuda_cores",
                        {"awq_gemv_logits_g32_w4", "awq_head_candidates", "awq_head_rescore", "awq_gemv_mma_x32_g32",
                         "awq_attend_mma_d64", "awq_gemv_norm_rope_g32_w4", "awq_gemv_norm_act_g32_w4",
                         "awq_gemv_residual_g32_w4", "awq_gemm_g32_v1"}),
    "qwen3-unfused-9-rows": ("qwen3", "auto", {}, False, 9, "auto",
                             {"awq_attend_d64", "awq_gemv_mma_x16_g32", "awq_head_rms_norm", "awq_add_norm",
                              "awq_gemv_store_g32_w4", "awq_lm_head_q8"}),
    "gemma3-fp16-head": ("gemma3_text", None, {"query_pre_attn_scalar": 64, "num_hidden_layers": 2}, True, 20,
                         "cuda_cores",
                         {"awq_lm_head", "awq_gemv_norm_store_g32_w4", "awq_gemv_act_g32_w4"}),
    "qwen2-ragged": ("qwen2", "auto", {"hidden_size": 136, "intermediate_size": 200}, True, 20, "auto",
                     {"awq_gemm_g32_v0", "awq_gemv_rows8_g32_w1", "awq_gemv_norm_rope_g32_w1", "awq_bias_add"}),
    "mistral-d128-window": ("mistral", 4, {"head_dim": 128, "sliding_window": 5}, True, 20, "auto",
                            {"awq_attend_mma_d128", "awq_attend_split_d128"}),
    "llama-d256-full-chunk": ("llama", "auto", {"head_dim": 256}, True, 300, "auto",
                              {"awq_attend_mma_d256", "awq_attend_split_d256"}),
    # a random engine at group 128 (synthetic.write_random_engine), prefill's long chunks through
    # the dequantize kernel and a stand-in cuBLAS computing on the host (RecordingCublas)
    "random-g128-cublas-path": ("random", 4, {}, True, 70, "cuda_cores",
                                {"awq_dequantize_g128", "awq_gemv_norm_rope_g128_w4", "awq_gemv_logits_g32_w4"}),
    # decode on the tensor-core GEMV (set_decode_gemv): group 32 (a fused Llama with an int4 head),
    # group 128 (the scaled-after-the-mma path), and the unfused list
    "llama-tensor-core-gemv": ("llama", 4, {}, True, 20, "tensor_cores",
                               {"awq_gemv_tc_norm_rope_g32", "awq_gemv_tc_norm_act_g32", "awq_gemv_tc_residual_g32",
                                "awq_gemv_tc_logits_g32"}),
    "qwen2-unfused-tensor-core-gemv": ("qwen2", "auto", {}, False, 20, "tensor_cores",
                                       {"awq_gemv_tc_store_g32"}),
    "random-g128-tensor-core-gemv": ("random", 4, {}, True, 70, "tensor_cores",
                                     {"awq_gemv_tc_norm_rope_g128", "awq_gemv_tc_norm_act_g128",
                                      "awq_gemv_tc_residual_g128", "awq_gemv_tc_logits_g32"}),
    # the same on a persistent grid (EmulatedDriver's 2 SMs: 4 blocks, each taking several tiles)
    "llama-int4-head-tensor-core-persistent-gemv": ("llama", 4, {}, True, 20, "tensor_cores_persistent",
                                                    {"awq_gemv_tc_norm_act_g32", "awq_gemv_tc_logits_g32"}),
    # decode in one persistent launch (decode_step.cu): its fused GEMV bodies, split attention at
    # 64/128/256 (Gemma's windows), Qwen3's q/k norms and RoPE after them, Gemma 3's sandwich norms
    # (add_norm, GELU), bias, the unfused list (norm, act, store), groups 32, 64 and 128, the fp16,
    # int8 and int4 heads (K % 32 != 0 is refused: test_a_persistent_step_that_waits_in_vain_...)
    "qwen3-d128-persistent-step": ("qwen3", "auto", {"head_dim": 128}, True, 20, "persistent_step",
                                   {"awq_decode_step_g32"}),
    "gemma3-d256-persistent-step": ("gemma3_text", None, {"query_pre_attn_scalar": 64, "head_dim": 256,
                                                          "num_hidden_layers": 2}, True, 20, "persistent_step",
                                    {"awq_decode_step_g32", "awq_lm_head"}),
    "qwen2-unfused-persistent-step": ("qwen2", "auto", {}, False, 20, "persistent_step", {"awq_decode_step_g32"}),
    # Gemma 2's soft-capped scores and logits (caps of 0.5, test_export_helpers.TINY_EXTRA); Phi-3's
    # fused linears read split, half of each head rotated, LongRoPE switching at position 12
    "gemma2-softcaps-persistent-step": ("gemma2", "auto", {"query_pre_attn_scalar": 64, "num_hidden_layers": 2},
                                        True, 20, "persistent_step", {"awq_decode_step_g32"}),
    "phi3-longrope-partial-rotary": ("phi3", "auto", {"original_max_position_embeddings": 12,
                                                      "rope_parameters": longrope(64, 12)["rope_parameters"]},
                                     True, 9, "auto", set()),
    # Phi-3 and 3.5-mini's head size 96: prefill on tensor cores, decode on split attention's
    # launch (the persistent step refuses it: test_the_persistent_step_refuses_what_it_lacks)
    "phi3-d96": ("phi3", "auto", {"hidden_size": 192, "head_dim": 96}, True, 20, "auto",
                 {"awq_attend_mma_d96", "awq_attend_split_d96"}),
    # EXAONE 3.5 2.4B's head size 80 (under EXAONE's own tensor names), as 96: 8 of 128 threads idle
    "exaone-d80": ("exaone", "auto", {"hidden_size": 160, "head_dim": 80}, True, 9, "auto",
                   {"awq_attend_mma_d80", "awq_attend_split_d80", "awq_attend_d80"}),
    # OLMo 2's post-norm block: no norm before q/k/v or gate/up, the residual adds as kernels of their own,
    # q/k norms as wide as all heads
    "olmo2-post-norms": ("olmo2", "auto", {"num_hidden_layers": 2}, True, 20, "cuda_cores",
                         {"awq_residual_add", "awq_head_rms_norm", "awq_gemv_store_g32_w4"}),
    # Hunyuan's q/k norms after RoPE: q and k rotated in place, normed, then stored as they are
    "hunyuan-rope-before-norms": ("hunyuan_v1_dense", "auto", {}, True, 20, "cuda_cores",
                                  {"awq_rope_in_place", "awq_head_rms_norm", "awq_rope_store"}),
    # Jais 2's block: LayerNorms with a bias (norm ops of their own, never a GEMV's prologue), an MLP
    # without a gate (relu(up)^2 in the GEMV's act epilogue, awq_act's in prefill), a bias on every
    # linear (the act and residual epilogues add them; awq_bias_add in prefill); unfused, on the
    # persistent step (its add_norm's bias, its act op without a gate)
    "jais2-layer-norm-no-gate-biases": ("jais2", "auto", {}, True, 20, "cuda_cores",
                                        {"awq_norm", "awq_gemv_act_g32_w4", "awq_act", "awq_bias_add"}),
    "jais2-unfused-persistent-step": ("jais2", "auto", {}, False, 9, "persistent_step",
                                      {"awq_decode_step_g32", "awq_add_norm"}),
    # Phi's parallel block (attention and an MLP without a gate, gelu, on one LayerNorm; Cohere's block
    # too) and its head's bias: fused, on the persistent step (its int8 head); unfused, the attention's
    # residual add an op of its own, the head a kernel of its own
    "phi-parallel-head-bias-persistent-step": ("phi", "auto", {}, True, 9, "persistent_step",
                                               {"awq_decode_step_g32"}),
    "phi-unfused-parallel-head-bias": ("phi", "auto", {}, False, 9, "cuda_cores",
                                       {"awq_residual_add", "awq_add_norm", "awq_lm_head_q8"}),
    # Apertus's xIELU, each layer's parameters: an act op of its own after the normed GEMV, in prefill and
    # decode, on the persistent step too
    "apertus-xielu": ("apertus", "auto", {}, True, 9, "cuda_cores", {"awq_act", "awq_gemv_norm_store_g32_w4"}),
    "apertus-xielu-persistent-step": ("apertus", "auto", {}, True, 9, "persistent_step", {"awq_decode_step_g32"}),
    # nanochat's embedding norm (a norm op in place on h, every row; the persistent step's first after
    # its embed), its weightless norms (ones) and a RoPE turning the other way (q/k rows swapped)
    "nanochat-embed-norm-persistent-step": ("nanochat", "auto", {}, True, 9, "persistent_step",
                                            {"awq_decode_step_g32", "awq_norm"}),
    # LFM2's short convolutions (with conv_bias: in_proj's, out_proj's and the convolution's biases) around
    # attention: awq_short_conv reading the tokens before each step from its store, across the prompt,
    # the decode steps and the 40-token chunk; unfused too, its out_proj's residual add an op of its own
    "lfm2-short-conv": ("lfm2", "auto", {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"],
                                         "conv_bias": True}, True, 20, "cuda_cores",
                        {"awq_short_conv", "awq_gemv_norm_store_g32_w4"}),
    "lfm2-unfused": ("lfm2", "auto", {"num_hidden_layers": 2, "conv_bias": True}, False, 9, "tensor_cores",
                     {"awq_short_conv", "awq_add_norm"}),
    # LFM3's head gates (awq_head_gate after each attention, on its normed input: an add_norm op, not a
    # prologue), sandwich norms, a sliding layer (5 tokens) and a full one turning half its pairs
    # ("proportional" RoPE), across the prompt, the decode steps and the chunk (its short convolutions are
    # LFM2's, above; the reference executor's test runs them with its post-norms against ONNX Runtime)
    "lfm3-head-gate": ("lfm3", "auto", {"num_hidden_layers": 2, "sliding_window": 5,
                                        "layer_types": ["sliding_attention", "full_attention"]},
                       True, 9, "cuda_cores", {"awq_head_gate", "awq_add_norm"}),
    # OLMo 1's clip_qkv (0.1 here: it bites): q, k and v clamped after their GEMV (awq_clamp), RoPE then in
    # rope_store, not the GEMV's epilogue
    "olmo-clip-qkv": ("olmo", "auto", {"num_hidden_layers": 2}, True, 9, "cuda_cores",
                      {"awq_clamp", "awq_gemv_store_g32_w4", "awq_rope_store"}),
    # GPT-NeoX's parallel block (attention and an MLP without a gate side by side, each on its own LayerNorm:
    # the MLP's norm taken before o_proj adds into h), exact GELU in the act epilogue, biases everywhere; on
    # the persistent step; and (use_parallel_residual false) one after the other, exact GELU in the decode
    # GEMV's act epilogue (the native C decode runs the parallel block unfused: test_cpu_native)
    "gpt_neox-parallel-norms-persistent-step": ("gpt_neox", "auto", {}, True, 9, "persistent_step",
                                                {"awq_decode_step_g32", "awq_norm", "awq_act"}),
    "gpt_neox-sequential-gelu-epilogue": ("gpt_neox", "auto", {"use_parallel_residual": False}, True, 20,
                                          "cuda_cores", {"awq_gemv_act_g32_w4", "awq_norm"}),
    # StarCoder 1's learned positions (awq_add_positions after the embedding, each row's position from the
    # device counter: the prompt, the decode steps' graph replays, the chunk) and multi-query attention
    "gpt_bigcode-learned-positions": ("gpt_bigcode", "auto", {}, True, 20, "cuda_cores",
                                      {"awq_add_positions", "awq_gemv_act_g32_w4"}),
    # OPT's positions from row 2 of its table (cut off at packing) and its ReLU on the persistent step (its
    # embed op adds the position's row; prefill's awq_add_positions)
    "opt-positions-relu-persistent-step": ("opt", "auto", {"ffn_dim": 256}, True, 9, "persistent_step",
                                           {"awq_decode_step_g32", "awq_add_positions"}),
    # Granite SWA's sinks (a logit a head in each softmax's denominator): layer 0 full, rotating at its own
    # base; layer 1 sliding (5 tokens) without RoPE; prefill's per-token kernel (9 rows) and the persistent
    # step's split attention (gpt-oss's below: prefill on tensor cores, decode's split attention launch)
    "granite_swa-sinks-persistent-step": ("granite_swa", "auto", {"num_hidden_layers": 2}, True, 9,
                                          "persistent_step", {"awq_decode_step_g32", "awq_attend_d64"}),
    # mixtures of experts (plugins/kernels/moe.cu: each row's experts chosen on the device, their GEMVs by the
    # ids in device memory): LFM2-MoE's sigmoid router with expert biases and a scale (layer 1) after a short
    # convolution's dense layer, unfused (the input norm an op before); the kernels' other cases (shared
    # experts, the softmax routers): test_the_expert_router_..., test_the_expert_gemvs_...
    "lfm2_moe-sigmoid-router-unfused": ("lfm2_moe", "auto", {"num_hidden_layers": 2,
                                                             "layer_types": ["conv", "full_attention"]},
                                        False, 9, "cuda_cores", MOE_KERNELS),
    # gpt-oss: its experts' gate/up stored (with their biases), its clamped SwiGLU a kernel of its own, down
    # with its biases; the router's logits biased; attention with biases and sinks, layer 0 sliding, YaRN
    "gpt_oss-clamped-swiglu-sinks": ("gpt_oss", "auto", {"num_hidden_layers": 2, "intermediate_size": 64}, True, 9,
                                     "auto",
                                     {"awq_moe_route", "awq_moe_swiglu", "awq_moe_gemv_store_g32_w4",
                                      "awq_moe_combine"}),
    # AFMoE's attention: its output gated value by value (out_gate_proj's GEMV, then awq_output_gate), q/k norms,
    # layer 0 sliding, layer 1 full without RoPE; sandwich norms; scaled embeddings (its dense MLPs only: its
    # experts are lfm2_moe's sigmoid router's, with a shared expert as ERNIE 4.5's; the reference executor's
    # test runs them, and the mixture's post-norm, against ONNX Runtime)
    "afmoe-output-gate": ("afmoe", "auto", {"num_hidden_layers": 2, "num_dense_layers": 2,
                                            "global_attn_every_n_layers": 2},
                          True, 9, "cuda_cores", {"awq_output_gate", "awq_add_norm"}),
    # Qwen3.5's gated delta nets: its convolution (awq_delta_conv, its state moved on row by row) and its rule
    # (awq_delta_rule: a block a value head, two to its key head) across the prompt (kernels launched one by one:
    # a padded row would enter the state), the decode steps' graph replays and the chunk; then the attention
    # layer's output gate (in q_proj, read as out_gate_proj) and (1 + w) q/k norms over a quarter of each head
    # rotated
    "qwen3_5-delta-net": ("qwen3_5_text", "auto", {"num_hidden_layers": 2,
                                                   "layer_types": ["linear_attention", "full_attention"],
                                                   "linear_num_key_heads": 1, "linear_num_value_heads": 2,
                                                   "linear_key_head_dim": 32, "linear_value_head_dim": 64},
                          True, 9, "cuda_cores", {"awq_delta_conv", "awq_delta_rule", "awq_output_gate"}),
    # Granite 4.0-H's Mamba-2 mixer (awq_delta_conv with its bias, awq_mamba_rule: a block a head of 32, four to
    # its group, then awq_group_norm over each group's half of the heads), unfused (the input norm an op), before
    # attention without RoPE
    "granite4-mamba": ("granitemoehybrid", "auto", {"num_hidden_layers": 2, "layer_types": ["mamba", "attention"],
                                                     "mamba_n_heads": 8, "mamba_n_groups": 2, "mamba_d_state": 32,
                                                     "position_embedding_type": None},
                       False, 9, "cuda_cores", {"awq_delta_conv", "awq_mamba_rule", "awq_group_norm"}),
    "random-g128-persistent-step": ("random", 4, {}, True, 70, "persistent_step", {"awq_decode_step_g128"}),
    "random-g64-persistent-step": ("random", 4, {"group_size": 64}, True, 70, "persistent_step",
                                   {"awq_decode_step_g64"}),
}


def emulated_backend(lib, case: str, tmp_path, adversarial: bool = False, concurrent: bool = False):
    """BACKEND_CASES[case]'s engine (built under tmp_path the first time) on a CudaBackend over
    the emulated kernels (EmulatedDriver, in its plain, adversarial or concurrent schedule), the
    case's decode GEMV chosen; and the case's token ids (prompt, 3 decode steps, a 40-token chunk)."""
    from awq_edge.build import build_engine
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.decoder import decode_ops
    from awq_edge.devices import resolve
    from awq_edge.model import resolve_source
    from awq_edge.synthetic import SHAPES, write_random_engine
    from native_helpers import RecordingCublas, read_native_engine
    from test_export_helpers import tiny_checkpoint

    model_type, lm_head, overrides, fused, prompt, gemv, _ = BACKEND_CASES[case]
    overrides = dict(overrides)
    group_size = overrides.pop("group_size", 128)  # (a random engine's)
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
             "head_dim": 64, "num_hidden_layers": 1, "max_position_embeddings": 512, **overrides}
    engine = tmp_path / "engine"
    if model_type == "random":
        shape = {**SHAPES["smollm2-135m"], **shape, "hidden_size": 256, "intermediate_size": 512, "vocab_size": 512}
    if model_type == "random" and not engine.exists():
        write_random_engine(engine, shape, resolve("h200"), group_size=group_size, lm_head="int4")
    elif not engine.exists():
        ckpt = tiny_checkpoint(tmp_path, model_type, resolve_source("smollm2"), **shape)
        build_engine(str(ckpt), "h200", engine, backend="cuda", progress=False, lm_head_bits=lm_head)
    manifest, info = read_native_engine(engine)
    driver = EmulatedDriver(lib, adversarial, concurrent)
    cuda = CudaBackend(engine, manifest, info, prompt + 48, driver=driver)
    cuda.ops = decode_ops(info.spec, fused=fused)
    if model_type == "random":
        cuda.set_prefill_path(RecordingCublas(driver), 64, 2 * 256 * 96)  # from 64 rows, slabs of 96 rows
    cuda.set_decode_gemv(gemv)
    ids = np.random.default_rng(5).integers(0, 256, prompt + 3 + 40).tolist()
    return cuda, driver, info, ids


@pytest.mark.parametrize("case, refusal", [
    ("phi3-d96", "the persistent decode step takes head sizes 64, 128, 256, and this model's is 96; choose another"),
    ("hunyuan-rope-before-norms", "the persistent decode step does not rotate q and k before their norms"),
    ("lfm2-unfused", "the persistent decode step has no short convolution"),
    ("afmoe-output-gate", "the persistent decode step does not gate the attention's output"),
    ("olmo-clip-qkv", "the persistent decode step does not clamp q, k and v"),
    ("gpt_oss-clamped-swiglu-sinks", "the persistent decode step has no mixture of experts"),
], ids=["phi3-d96", "hunyuan", "lfm2", "afmoe", "olmo", "gpt_oss"])
def test_the_persistent_step_refuses_what_it_lacks(emulated, case, refusal, tmp_path):
    from awq_edge.errors import UserError

    cuda, _, _, _ = emulated_backend(emulated, case, tmp_path)
    with pytest.raises(UserError, match=refusal):
        cuda.set_decode_gemv("persistent_step")
    assert cuda.step_refusal() and not cuda.decodes_on_step()


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_the_cuda_backend_on_emulated_kernels_matches_the_reference(emulated, case, tmp_path):
    """The cuda backend itself (cuda_backend.py: its launches, buffers, graphs) running every
    kernel's own source on the CPU, against the reference executor over the same engine: a
    prompt (9 rows: the tensor-core GEMV for up to 16 rows, attention a block per token; 20: the
    one for up to 32, prefill attention in blocks of tokens; 300: a full 256-row chunk, then 44
    rows; each chunk padded and replayed as a graph, its tail launched for its real last row), 3
    decode steps (graph replays: the fused GEMVs, split attention, the head), then a 40-token
    chunk (the GEMM, launched one by one: its padding does not fit the cache), each step's
    logits within fp16 rounding and the same argmax; then a token sampled on the device.

    Then races the plain emulation cannot see: the same steps, and a token sampled with top-k,
    top-p and a penalty and fed, on a second backend in emulate.h's adversarial schedule (warps
    one at a time, each to its next barrier, from the last and the first in turn; blocks in
    reverse; cp.async copies landed at issue; every programmatic launch's blocks run up to their
    wait_for_previous_kernel() on the memory from before its chain's first kernel: pdl.cuh's
    contract) give every logit and the token bit for bit. Where decode runs on the persistent
    step, the prompt and 3 steps again in the concurrent schedule (the step's blocks side by
    side, so that its tasks wait for the ones before them under way): bit for bit too."""
    from awq_edge.reference_backend import ReferenceBackend
    from native_helpers import teacher_forced

    model_type, _, _, fused, prompt, gemv, expected = BACKEND_CASES[case]
    cuda, driver, info, ids = emulated_backend(emulated, case, tmp_path)
    reference = ReferenceBackend(tmp_path / "engine", prompt + 48, info)
    plain_logits = []
    errors, disagreements = teacher_forced(cuda, reference, ids[:prompt + 3], prompt, logits=plain_logits)
    got, want = np.asarray(cuda.forward(ids[prompt + 3:])), reference.forward(ids[prompt + 3:])
    plain_logits.append(got.copy())
    errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    launched = {fn for fn, *_ in driver.launches}
    print(f"{case}: errors {max(errors):.1e}, {driver.launch_count} launches of {len(launched)} kernels")
    assert max(errors) < 1e-2 and disagreements == [] and got.argmax() == want.argmax(), (errors, disagreements)
    assert cuda.sample_token(cuda.buf["logits"], SamplingSettings(0.0), ids, 0.0) == int(got.argmax())
    assert expected <= launched and "awq_sample_step" in driver.kernel_info, expected - launched
    if gemv == "persistent_step":  # decode's graph: the step, an int4 head's GEMV, candidates, re-scoring, the advance
        decode = [item[0] for item in cuda._graphs[1]]
        assert decode[0] == f"awq_decode_step_g{info.spec.group_size}" and decode[-1] == "awq_advance", decode
        assert len(decode) == (5 if info.spec.lm_head == "int4" else 2), decode
    if gemv in ("auto", "tensor_cores_persistent") and fused and info.spec.hidden % 32 == 0:  # a
        # persistent grid: fewer blocks than tiles somewhere
        assert any(grid[0] < -(-args[5].value // 16) for fn, grid, _, args in driver.launches
                   if fn.startswith("awq_gemv_tc_")), "no persistent grid"
    # graphs: the prompt's chunks (padded: 9 -> 12, 20 -> 24, 70 -> 96 rows; 300 = 256 + 44 -> 48; none with
    # delta nets) and decode's, each captured once; the 40-row chunk's padding (48) does not fit the 45 rows left
    chunk_graphs = 0 if info.spec.delta else 1 if prompt <= 256 else 2
    assert (driver.captures, driver.replays) == (chunk_graphs + 1, chunk_graphs + 3)
    assert model_type != "random" or cuda.cublas.calls  # (the 70-row prompt, the 40-row chunk is below 64)

    sampled = SamplingSettings(0.9, 20, 0.9, 1.3)
    token = cuda.sample_token(cuda.buf["logits"], sampled, ids, 0.37)
    plain_logits.append(np.asarray(cuda.forward([token])).copy())
    adversarial, _, _, _ = emulated_backend(emulated, case, tmp_path, adversarial=True)
    steps = [ids[:prompt], *[[t] for t in ids[prompt:prompt + 3]], ids[prompt + 3:]]
    again = [np.asarray(adversarial.forward(step)).copy() for step in steps]
    assert adversarial.sample_token(adversarial.buf["logits"], SamplingSettings(0.0), ids, 0.0) == int(got.argmax())
    assert adversarial.sample_token(adversarial.buf["logits"], sampled, ids, 0.37) == token
    again.append(np.asarray(adversarial.forward([token])).copy())
    for step, (a, b) in enumerate(zip(plain_logits, again)):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"step {step}: {np.abs(a - b).max()}"
    if gemv == "persistent_step":
        concurrent, _, _, _ = emulated_backend(emulated, case, tmp_path, concurrent=True)
        polls = emulated.cpu_polls_not_ready()
        side_by_side = [np.asarray(concurrent.forward(step)).copy() for step in steps[:4]]  # (the prompt, 3 steps)
        assert emulated.cpu_polls_not_ready() > polls  # (tasks did wait for ones under way)
        for step, (a, b) in enumerate(zip(plain_logits, side_by_side)):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"step {step}: {np.abs(a - b).max()}"


@pytest.mark.parametrize("concurrent", [False, True], ids=["plain", "concurrent"])
def test_a_persistent_step_that_waits_in_vain_is_an_error_not_a_hang(emulated, concurrent, tmp_path):
    """A task whose op before never completes (the table says the embedding has 2 tasks, the
    queue hands out 1) gives up waiting (one block at a time, or the step's blocks side by side,
    all waiting), the step ends, and the host gets a one-line error; the queue is left ready, so
    the table mended, the same tokens give the same logits again. And an engine the step cannot
    run is refused with one line."""
    from awq_edge.errors import UserError

    cuda, driver, info, ids = emulated_backend(emulated, "qwen3-d128-persistent-step", tmp_path,
                                               concurrent=concurrent)
    prompt = ids[:20]
    cuda.forward(prompt)
    first = np.asarray(cuda.forward(ids[20:21])).copy()  # (captures the decode graph: the table)
    table = np.empty((cuda.step_count, 32), np.int64)
    driver.download(table, cuda.step_table)
    assert table[0, :3].tolist() == [0, 1, 0]  # the embedding: kind, tasks, first task
    table[0, 1] = 2
    driver.upload(cuda.step_table, table)
    with pytest.raises(UserError, match="persistent decode step stalled"):
        np.asarray(cuda.forward(ids[21:22]))
    table[0, 1] = 1
    driver.upload(cuda.step_table, table)
    assert cuda.position == 0  # (the conversation was reset)
    cuda.forward(prompt)
    assert np.array_equal(np.asarray(cuda.forward(ids[20:21])), first)
    # an engine with a linear of K % 32 != 0 (its GEMV bodies take 16-byte loads only): refused
    ragged, _, _, _ = emulated_backend(emulated, "qwen2-ragged", tmp_path / "ragged")
    with pytest.raises(UserError, match="needs each linear's input width to be a multiple of 32, and "
                                        r"model.layers.0.self_attn.qkv_proj's is 136; choose another decode"):
        ragged.set_decode_gemv("persistent_step")


def test_the_persistent_steps_gemv_gives_the_same_logits_however_many_row_blocks_it_runs_at_once(emulated,
                                                                                                 tmp_path):
    """decode_step.cu's GEMV tasks run 1, 2 or 4 of their 4-row blocks at once (step_gemv_rows:
    a group of the block's threads each; cuda_backend.step_row_blocks_at_once chooses by K: 4 for
    every linear here, K 128 and 256). Forced to each, the table says so (its slot 23, the tasks cut
    to match), and the prompt and 3 decode steps give the same logits bit for bit, 2 at once also
    with the step's blocks side by side (the concurrent schedule)."""
    from awq_edge.cuda_backend import STEP_KINDS, step_row_blocks_at_once

    assert [step_row_blocks_at_once(k) for k in (576, 1024, 1056, 2048, 2080, 4096)] == [4, 4, 2, 2, 1, 1]
    runs = []
    for at_once, concurrent in ((1, False), (2, False), (4, False), (2, True)):
        cuda, driver, info, ids = emulated_backend(emulated, "qwen3-d128-persistent-step", tmp_path,
                                                   concurrent=concurrent)
        cuda.step_rows_at_once = at_once
        steps = [ids[:20], *[[t] for t in ids[20:23]]]
        runs.append([np.asarray(cuda.forward(step)).copy() for step in steps])
        table = np.empty((cuda.step_count, 32), np.int64)
        driver.download(table, cuda.step_table)
        linears = table[table[:, 0] == STEP_KINDS["linear"]]
        assert len(linears) and (linears[:, 4 + 23] == at_once).all(), linears[:, 4 + 23]
        assert (linears[:, 1] == np.minimum(-(-linears[:, 4 + 5] // 4 // at_once), cuda.step_blocks())).all()
    for run_ in runs[1:]:
        for step, (a, b) in enumerate(zip(runs[0], run_)):
            assert np.array_equal(a.view(np.uint32), b.view(np.uint32)), f"step {step}: {np.abs(a - b).max()}"


def test_decode_gemvs_timed_at_load_leave_nothing_a_step_reads(emulated, tmp_path):
    """tune_decode_gemv runs the real kernels (here emulated, its clock a cost per launch that
    makes q/k/v cheapest on CUDA cores and the rest on the persistent tensor-core grid, the int4
    head included): a prompt and decode steps afterwards give the logits, bit for bit, of a
    backend never timed that runs the same choices (the timed graphs wrote nothing a step reads:
    the cache, the position), within fp16 rounding of the reference. On a clock where the
    persistent step is cheapest, its output agrees with the per-op step's (the real kernels, the
    step's blocks side by side in the concurrent schedule: here the int4 head's input, at
    STEP_CHECK_POSITION of a 512-token cache: 4 splits of keys a head, merged across tasks) and
    auto decodes on it, within fp16 rounding of the reference."""
    from awq_edge.build import build_engine
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.model import resolve_source
    from awq_edge.reference_backend import ReferenceBackend
    from native_helpers import read_native_engine
    from test_export_helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "llama", resolve_source("smollm2"), num_hidden_layers=2, hidden_size=128,
                           intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                           max_position_embeddings=1024)  # (the step checked at STEP_CHECK_POSITION)
    build_engine(str(ckpt), "h200", tmp_path / "engine", backend="cuda", progress=False, lm_head_bits=4)
    manifest, info = read_native_engine(tmp_path / "engine")
    timed = EmulatedDriver(emulated)
    timed.costs = {"awq_gemv_norm_rope": 1e-11}
    tuned = CudaBackend(tmp_path / "engine", manifest, info, 32, driver=timed, tune=True)
    assert set(tuned.gemv_tuning["gemv"].values()) == {"cuda_cores", "tensor_cores_persistent"}
    assert tuned.tuned_gemv["lm_head.q4 logits"] == "tensor_cores_persistent"  # (auto's default: CUDA cores)
    assert timed.released == timed.captures > 0 and not timed.pending
    plain = CudaBackend(tmp_path / "engine", manifest, info, 32, driver=EmulatedDriver(emulated))
    plain.tuned_gemv = dict(tuned.tuned_gemv)
    step_timed = EmulatedDriver(emulated, concurrent=True)  # (the step's blocks side by side)
    step_timed.costs = {**timed.costs, "awq_decode_step": 1e-12}
    stepped = CudaBackend(tmp_path / "engine", manifest, info, 512, driver=step_timed, tune=True)
    assert stepped.gemv_tuning["persistent_step"] and stepped.decodes_on_step(), stepped.gemv_tuning
    reference = ReferenceBackend(tmp_path / "engine", 32, info)
    ids = np.random.default_rng(2).integers(0, 256, 12).tolist()
    for step in ([ids[:9]] + [[i] for i in ids[9:]]):
        got, same, on_step, want = (np.asarray(b.forward(step)) for b in (tuned, plain, stepped, reference))
        assert np.array_equal(got, same)
        for logits in (got, on_step):
            assert np.linalg.norm(logits - want) / np.linalg.norm(want) < 1e-2 and logits.argmax() == want.argmax()
    launched = {work[0] for work in tuned._graphs[1]}  # (the decode step's graph)
    assert {"awq_gemv_norm_rope_g32_w4", "awq_gemv_tc_residual_g32", "awq_gemv_tc_logits_g32"} <= launched
    assert stepped._graphs[1][0][0] == "awq_decode_step_g32"


def test_a_delta_nets_states_rewind_and_outlast_the_tuning_on_the_emulated_kernels(emulated, tmp_path):
    """Qwen3.5's states on the cuda backend: a rewind past the last prefill's end goes back to it, one
    before it to 0, and what is fed again gives the first run's logits bit for bit; the decode tuning in
    a conversation's middle (the steps it times run the delta nets) leaves them as they were. The
    persistent step says it has no delta net."""
    cuda, _, _, ids = emulated_backend(emulated, "qwen3_5-delta-net", tmp_path)
    assert cuda.step_refusal().startswith("the persistent decode step has no gated delta net nor Mamba-2 mixer")
    first = [np.asarray(cuda.forward(ids[:9])).copy()] + [np.asarray(cuda.forward([t])).copy() for t in ids[9:12]]
    cuda.rewind(11)
    assert cuda.position == 9
    for token, want in zip(ids[9:12], first[1:]):
        assert np.array_equal(np.asarray(cuda.forward([token])), want)
    cuda.rewind(4)
    assert cuda.position == 0
    assert np.array_equal(np.asarray(cuda.forward(ids[:9])), first[0])
    cuda.tune_decode_gemv()
    assert np.array_equal(np.asarray(cuda.forward([ids[9]])), first[1])


def test_an_act_order_engine_gathers_each_linears_input_on_the_emulated_kernels(emulated, smollm2_dir, tmp_path):
    """A GPTQ act-order checkpoint's cuda engine (tests/test_gptq_checkpoint.py's): the gather
    kernel before each linear, in the plain and adversarial schedules, against the reference
    executor: a 20-token prompt, 3 decode steps (graph replays) and a 40-token chunk (the GEMM).
    The persistent step says it does not gather."""
    from awq_edge.build import build_engine
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.errors import UserError
    from awq_edge.reference_backend import ReferenceBackend
    from native_helpers import read_native_engine, teacher_forced
    from test_export_helpers import tiny_checkpoint
    from test_gptq_checkpoint import ACT_ORDER_SHAPE, act_order_gptq

    folder, _ = act_order_gptq(tiny_checkpoint(tmp_path, "qwen2", smollm2_dir, **ACT_ORDER_SHAPE), tmp_path / "gptq")
    build_engine(str(folder), "h200", tmp_path / "engine", backend="cuda", progress=False)
    manifest, info = read_native_engine(tmp_path / "engine")
    ids = np.random.default_rng(7).integers(0, 256, 20 + 3 + 40).tolist()
    logits = {}
    for adversarial in (False, True):
        driver = EmulatedDriver(emulated, adversarial)
        cuda = CudaBackend(tmp_path / "engine", manifest, info, 72, driver=driver)
        reference = ReferenceBackend(tmp_path / "engine", 72, info)
        got = logits[adversarial] = []
        errors, disagreements = teacher_forced(cuda, reference, ids[:23], 20, logits=got)
        got.append(np.asarray(cuda.forward(ids[23:])).copy())
        want = reference.forward(ids[23:])
        errors.append(float(np.linalg.norm(got[-1] - want) / np.linalg.norm(want)))
        assert max(errors) < 1e-2 and disagreements == [], (errors, disagreements)
        assert "awq_gather_columns" in {fn for fn, *_ in driver.launches}
    for a, b in zip(logits[False], logits[True]):
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    with pytest.raises(UserError, match="the persistent decode step does not gather GPTQ act-order inputs"):
        cuda.set_decode_gemv("persistent_step")


@pytest.mark.parametrize("faster", ["cublas_l2", "ours"])
def test_a_prefill_chunk_timed_on_every_path_keeps_the_fastest_and_what_it_computes(emulated, faster, tmp_path):
    """A chunk size's first use on a timed backend with cuBLAS (here a stand-in computing on the
    host, RecordingCublas; an L2 of 64 KiB, so slabs of half of it are 64 weight rows; and a
    clock that makes our GEMM and slabs of more rows slow, or the dequantize kernel): every
    path's graph is captured and replayed, the fastest kept for that size, the others freed;
    the prompt's logits and the decode step after are bit for bit those of an untimed backend
    set to that path, within fp16 rounding of the reference. The choice is kept (a tuning
    cache folder): the next load runs that path for that size without timing."""
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.devices import resolve
    from awq_edge.reference_backend import ReferenceBackend
    from awq_edge.synthetic import SHAPES
    from awq_edge.synthetic import write_random_engine
    from native_helpers import RecordingCublas, read_native_engine

    class SmallL2(EmulatedDriver):
        def l2_cache_bytes(self):
            return 1 << 16

        def cost(self, name, grid, args=()):  # (awq_dequantize's 5th argument: the slab's rows)
            big_slab = faster == "cublas_l2" and name.startswith("awq_dequantize") and args[4].value > 64
            return super().cost(name, grid, args) + (1e-3 if big_slab else 0.0)

    shape = {**SHAPES["smollm2-135m"], "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4,
             "num_key_value_heads": 1, "head_dim": 64, "num_hidden_layers": 1, "vocab_size": 512}
    write_random_engine(tmp_path / "engine", shape, resolve("h200"), group_size=128)
    manifest, info = read_native_engine(tmp_path / "engine")
    timed = SmallL2(emulated)
    timed.costs = {"awq_gemm" if faster == "cublas_l2" else "awq_dequantize": 1e-3}
    tuned = CudaBackend(tmp_path / "engine", manifest, info, 128, driver=timed, cublas=RecordingCublas(timed),
                        tune=True, tuning_cache=tmp_path / "tuning")
    plain_driver = EmulatedDriver(emulated)
    plain = CudaBackend(tmp_path / "engine", manifest, info, 128, driver=plain_driver)
    plain.set_prefill_path(RecordingCublas(plain_driver), *((96, 1 << 15) if faster == "cublas_l2" else (256,)))
    plain.tuned_gemv = dict(tuned.tuned_gemv)
    reference = ReferenceBackend(tmp_path / "engine", 128, info)
    ids = np.random.default_rng(6).integers(0, 256, 72).tolist()
    captures = timed.captures
    logits = []
    for step in (ids[:70], ids[70:71], ids[71:]):  # 70 rows: padded to 96, timed every way
        got, same, want = (np.asarray(b.forward(step)) for b in (tuned, plain, reference))
        logits.append(got)
        assert np.array_equal(got, same)
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-2 and got.argmax() == want.argmax()
    assert tuned.prefill_timed == {96: faster} and set(tuned.prefill_tuning[96]) == {"cublas", "cublas_l2", "ours"}
    assert timed.captures - captures == 4 and len(tuned._graphs) == 2  # every path, decode; one path kept
    assert f"96 rows {faster}" in tuned.prefill_path
    slabs = [work[3][4].value for work in tuned._graphs[96] if not callable(work) and work[0].startswith("awq_dequantize")]
    assert (max(slabs) == 64 if faster == "cublas_l2" else not slabs), slabs  # (the kept graph's)
    again_driver = SmallL2(emulated)
    again = CudaBackend(tmp_path / "engine", manifest, info, 128, driver=again_driver,
                        cublas=RecordingCublas(again_driver), tune=True, tuning_cache=tmp_path / "tuning")
    assert again.prefill_timed == {96: faster} and again.tuned_gemv == tuned.auto_choices()
    assert np.array_equal(np.asarray(again.forward(ids[:70])), logits[0])
    assert again_driver.captures == 1 and again_driver.replays == 1  # that path's graph only, nothing timed


def test_decode_run_ahead_gives_step_by_steps_tokens_and_leaves_the_same_cache(emulated, tmp_path):
    """The Engine over the cuda backend on emulated kernels (a stream that runs only when the host
    waits, as on the GPU): with decode run ahead (the step feeding a token queued before the host
    reads it, the token chosen on the device) every way a reply ends gives the tokens of one step
    at a time with each token chosen on the host, and leaves the same cache: the same cached ids,
    the same position on the device (the next step's logits agree), the step fed past a stop taken
    back."""
    from awq_edge.build import build_engine
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.engine import Engine, engine_plan
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest
    from awq_edge.model import resolve_source
    from awq_edge.sampling import Sampler
    from awq_edge.tokenizer import Tokenizer
    from test_export_helpers import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "llama", resolve_source("smollm2"), num_hidden_layers=1, hidden_size=128,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    build_engine(str(ckpt), "h200", tmp_path / "engine", backend="cuda", progress=False)
    path = tmp_path / "engine"
    manifest = read_manifest(path)
    files = check_files(path, manifest["files"])
    info = read_decoder_info(path, files)
    context = 24
    backend = CudaBackend(path, manifest, info, context, driver=EmulatedDriver(emulated))
    engine = Engine(path, manifest, info, Tokenizer(path, info.config, files), backend,
                    engine_plan(manifest, info, max_context=context))
    prompt = [60, 71, 68, 0, 66, 64, 83]  # (the tiny model's 256 ids are the tokenizer's first)
    greedy, sampled = SamplingSettings(0.0), SamplingSettings(0.8, 20, 0.9, 1.3, seed=3)

    class HostSampler(Sampler):  # one step at a time, each token chosen on the host from the logits
        def __call__(self, logits, seen_ids=()):
            return super().__call__(np.asarray(logits), seen_ids)

    def reply(run_ahead: bool, settings, new_tokens: int, stop=None, eos=None, cancel_after=None):
        backend.run_ahead, calls, replays = run_ahead, [], backend.drv.replays
        cancel = None if cancel_after is None else lambda: calls.append(1) or len(calls) > cancel_after
        engine.reset()
        eos_ids = engine.tokenizer.eos_ids if eos is None else {eos}
        sampler = Sampler(settings) if run_ahead else HostSampler(settings)
        text = "".join(engine._run(list(prompt), sampler, new_tokens, [stop] if stop else [], eos_ids, cancel))
        steps, cached = backend.drv.replays - replays, list(engine.cached_ids)
        engine.rewind(min(engine.position, context - 1))  # (a full cache: room for the step below)
        after = np.asarray(engine.backend.forward([7])).copy()  # the cache's K/V and the device's position
        stats = engine.last_stats
        return text, stats.finish_reason, stats.new_tokens, cached, steps, after

    for reason, case in [("length", dict(settings=greedy, new_tokens=6)),
                         ("length", dict(settings=sampled, new_tokens=6)),
                         ("context_full", dict(settings=greedy, new_tokens=40)),
                         ("cancelled", dict(settings=sampled, new_tokens=8, cancel_after=3))]:
        step_by_step = reply(False, **case)
        ahead = reply(True, **case)
        assert step_by_step[1] == reason, (step_by_step[:4], case)
        # (the same graph replays: the prompt's, then one a token fed; none run ahead past the end)
        assert ahead[:5] == step_by_step[:5] and np.array_equal(ahead[5], step_by_step[5]), case
    # a stop string and an end-of-sequence id in the middle of the greedy reply: the fed step is undone
    tokens = reply(False, greedy, 6)[3][len(prompt):]
    for case in [dict(eos=tokens[2]), dict(stop=engine.tokenizer.decode(tokens[2:4]))]:
        step_by_step = reply(False, greedy, 6, **case)
        ahead = reply(True, greedy, 6, **case)
        assert step_by_step[1] in ("eos", "stop") and len(step_by_step[3]) < len(prompt) + 6, step_by_step[:4]
        # (the stop's token was fed ahead, one replay more)
        assert ahead[:4] == step_by_step[:4] and np.array_equal(ahead[5], step_by_step[5]), case
        assert ahead[4] == step_by_step[4] + 1

    # a second turn on the first's cache, as Chat sends it (the reply, its end-of-turn id, the new
    # text): the device's history then lacks only the new ids, and the penalty must see them
    end = reply(False, sampled, 6)[3][len(prompt) + 2]

    def two_turns(run_ahead: bool):
        backend.run_ahead, make = run_ahead, (Sampler if run_ahead else HostSampler)
        engine.reset()
        first = "".join(engine._run(list(prompt), make(sampled), 6, [], {end}))
        ids = list(engine.cached_ids) + [end, 65, 66, 67]
        return first, "".join(engine.stream_ids(ids, make(sampled), 6, reuse_cache=True)), list(engine.cached_ids)

    assert two_turns(False) == two_turns(True)

    # Ctrl-C while the host waits for a token (the step feeding it queued): the step is taken
    # back, so the cache still matches the engine's ids and the next reply reuses them
    engine.reset()
    wait, calls = backend.drv.wait, []

    def interrupted_wait(event):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        wait(event)

    backend.drv.wait = interrupted_wait
    with pytest.raises(KeyboardInterrupt):
        "".join(engine.stream_ids(list(prompt), Sampler(greedy), 8))
    backend.drv.wait = wait
    assert engine.position == len(engine.cached_ids) == len(prompt) + 2
    ids = engine.cached_ids + [65]
    reused = "".join(engine.stream_ids(ids, Sampler(greedy), 4, reuse_cache=True))
    assert engine.last_stats.reused_tokens == len(prompt) + 2
    assert reused == "".join(engine.stream_ids(ids, Sampler(greedy), 4))  # (from an empty cache)

    # a caller's own history list that grew by another id than the one sampled is uploaded, not
    # trusted (the O(1) check is for the engine's list, grown by the sampled token)
    engine.reset()
    logits = backend.forward(prompt)
    host, settings, history = np.asarray(logits).copy(), SamplingSettings(0.0, repetition_penalty=5.0), list(prompt)
    first = backend.sample_token(logits.ptr, settings, history, 0.0)
    other = int(np.argmax(np.where(np.isin(np.arange(host.size), history + [first]), -np.inf, host)))
    history.append(other)  # (penalized now: the best is `first` again, where trusting the device picks `other`)
    want = choose_token(host, settings, history, 0.0)
    assert backend.sample_token(logits.ptr, settings, history, 0.0) == want == first
    drv = backend.drv
    drv.synchronize()
    history = drv.array_at(backend.seen, np.int32, (int(drv.array_at(backend.n_seen, np.int32, (1,))[0]),))
    assert history.tolist() == backend.seen_mirror and history.tolist()[:len(engine.cached_ids)] == engine.cached_ids

    # JSON mode with run ahead on: each token chosen on the host from the logits copied back,
    # none fed ahead, so the cache holds the reply's ids and nothing past them
    from awq_edge.json_reply import JsonPrefix

    backend.run_ahead = True
    for settings in (greedy, sampled):
        text = "".join(engine.stream_ids(list(prompt), Sampler(settings), 10, json_object=True))
        prefix, stats = JsonPrefix(), engine.last_stats
        assert prefix.feed_all(text.encode()) and prefix.done == (stats.finish_reason == "stop"), text
        assert engine.position == len(engine.cached_ids) == len(prompt) + stats.new_tokens - 1
    # logprobs: the same, from the logits on the device; greedy's token is each step's best
    "".join(engine.stream_ids(list(prompt), Sampler(greedy), 6, logprobs=2))
    chosen = [token for token, _, _ in engine.last_logprobs]
    assert chosen == engine.cached_ids[len(prompt):] + chosen[-1:] and engine.position == len(engine.cached_ids)
    assert all(top[0] == (token, logprob) for token, logprob, top in engine.last_logprobs)
    # OpenAI's logit_bias and penalties: chosen on the host from the adjusted logits (the device's
    # sampler has none of them), none fed ahead; greedy's first token, banned, is never chosen
    adjusted = SamplingSettings(0.0, logit_bias={chosen[0]: -100.0}, presence_penalty=2.0)
    "".join(engine.stream_ids(list(prompt), Sampler(adjusted), 6, ignore_eos=True, logprobs=0))
    steered = [token for token, _, _ in engine.last_logprobs]
    assert len(steered) == 6 and chosen[0] not in steered and engine.position == len(engine.cached_ids)


@pytest.mark.parametrize("schedule", ["plain", "adversarial", "concurrent"])
def test_the_persistent_step_skeleton_matches_its_twin_and_stalls_rather_than_hangs(emulated, schedule):
    """awq_step_skeleton (benchmarks/persistent_step.py's floor of a persistent decode step) on
    two layers of a small shape against skeleton_twin: in one launch (one block: its grid barriers
    pass at once) and a launch per phase. A grid that cannot all be resident (in the plain and
    adversarial schedules any of 2 blocks: they run one after another; in the concurrent one, 9
    blocks, one more than it runs side by side) sets the barrier's stalled flag instead of
    hanging; in the concurrent schedule grids of 2 to 8 blocks pass the barriers, each block's
    sums its twin's. The same step as a queue of tasks (awq_step_skeleton_queue) on grids of 1 to
    5 blocks, launch after launch (concurrent: a task waits while the ones before it run)."""
    adversarial, concurrent = schedule == "adversarial", schedule == "concurrent"
    bench = load_benchmark("persistent_step")
    layer_phases, skeleton_twin, step_layout = bench.layer_phases, bench.skeleton_twin, bench.step_layout
    shape = dict(hidden_size=128, intermediate_size=256, head_dim=64, num_attention_heads=2, num_key_value_heads=1)
    start, words = step_layout(layer_phases(shape, 40), 2, 128)
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1 << 32, (int(start[-1]), 4), dtype=np.uint64).astype(np.uint32)
    initial = rng.integers(0, 1 << 32, int(words[0]), dtype=np.uint64).astype(np.uint32)
    stride, phases = int(words.max()), len(start) - 1
    want = skeleton_twin(data, start, words, initial, 1)

    def step(first_phases: list, blocks: int = 1):
        vectors, barrier, sums = np.zeros(2 * stride, np.uint32), np.zeros(4, np.uint32), np.zeros(9, np.uint32)
        vectors[:initial.size] = initial
        for first, count in first_phases:
            run(emulated, "awq_step_skeleton", (blocks,), 256,
                [data, start, words, first, count, vectors, stride, barrier, sums], adversarial, concurrent)
        return sums[:blocks], barrier

    for plan in ([(0, phases)], [(p, 1) for p in range(phases)]):
        sums, barrier = step(plan)
        assert sums.tolist() == want.tolist() and barrier[2] == 0, plan
    other = initial.copy()
    other[3] += 5
    assert want.tolist() != skeleton_twin(data, start, words, other, 1).tolist()  # (the vectors count)
    for blocks in (2, 8) if concurrent else ():
        sums, barrier = step([(0, phases)], blocks)
        assert sums.tolist() == skeleton_twin(data, start, words, initial, blocks).tolist() and barrier[2] == 0
    _, barrier = step([(0, 3)], blocks=9 if concurrent else 2)
    assert barrier[2] == 1

    # the queue of tasks: any grid (one block after another takes the tasks, or side by side), launch after
    # launch on the same counters (each from where the last left them), tiles and grids changing
    queue, done, handed_out = np.zeros(3, np.uint64), np.zeros(phases, np.uint32), 0
    for blocks, tiles in ((1, 3), (2, 3), (3, 2), (5, 4)):
        vectors, sums = np.zeros(2 * stride, np.uint32), np.zeros(8, np.uint32)
        vectors[:initial.size] = initial
        run(emulated, "awq_step_skeleton_queue", (blocks,), 256,
            [data, start, words, phases, tiles, vectors, stride, queue, done, sums], adversarial, concurrent)
        assert sums[:tiles].tolist() == skeleton_twin(data, start, words, initial, tiles).tolist(), (blocks, tiles)
        handed_out += phases * tiles + blocks
        assert queue.tolist() == [handed_out, handed_out, 0] and not done.any(), queue  # (and not stalled)

    # the benchmark's harness itself (its buffers, arguments and check) on the emulation, the ways
    # that need no cooperative launch
    names = {name: name for name in ("awq_step_skeleton", "awq_step_skeleton_queue")}
    skeleton = bench.Skeleton(EmulatedDriver(emulated, adversarial, concurrent), names, False, start, words, rng)
    for way, blocks in (("per_op", 1), ("per_op", 3), ("queue", 2), ("queue", 3)):
        assert skeleton.check(way, blocks) is None, (way, blocks)
    skeleton.words = skeleton.words.copy()
    skeleton.words[0, 0] ^= 1  # (the device keeps the old words: the check must see it)
    assert "disagrees" in skeleton.check("queue", 2)


def test_every_kernel_ran_in_the_emulation(request):
    """Last in this file: every kernel the backend can load (cuda_backend.KERNELS_OF) and the
    benchmarks' own ran in one of the tests above, so a kernel added without an emulated test
    fails here. Skipped when only some of the tests ran (-k, -m, a test named, or pytest-xdist's
    workers: each runs a share of them)."""
    import os
    import sys

    from awq_edge.cuda_backend import KERNELS_OF
    from native_helpers import BENCHMARK_KERNELS

    module, config = sys.modules[__name__], request.config
    tests = {name for name in dir(module) if name.startswith("test_")} - {request.function.__name__}
    collected = {item.originalname for item in request.session.items if item.module is module}
    if tests - collected or config.getoption("keyword") or config.getoption("markexpr") \
            or os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.skip("only some of this file's tests ran")
    kernels = {name for names in (*KERNELS_OF.values(), *BENCHMARK_KERNELS.values()) for name in names}
    assert not kernels - EmulatedDriver.launched, f"never emulated: {sorted(kernels - EmulatedDriver.launched)}"
