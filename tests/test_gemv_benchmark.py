"""The GPU benchmarks' host side: without a GPU, one line on stderr and a non-zero exit, no
results file; the launch-cost fit and the layer's op list and bytes, on made-up numbers and a
random engine."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from awq_edge.cuda_runtime import find_gpus
from native_helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gemv.py"


@pytest.mark.skipif(bool(find_gpus()), reason="this machine has a GPU: run the benchmark itself")
def test_gemv_benchmark_without_gpu_exits_with_one_line(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output", str(out)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no NVIDIA GPU found" in proc.stderr
    assert not out.exists()


def test_the_launch_cost_fit_recovers_intercept_and_bandwidth():
    gemv = load_benchmark("gemv")
    nbytes = np.array([0.2e6, 1.2e6, 8.4e6, 22.6e6, 29.4e6])
    us = 2.37 + nbytes / 2770e3 + np.array([0.01, -0.02, 0.015, -0.01, 0.005])  # 2.37 us + bytes / 2.77 TB/s
    fit = gemv.fit_launch_cost(nbytes, us)
    assert abs(fit["intercept_us"] - 2.37) < 0.05 and abs(fit["slope_gbs"] - 2770) / 2770 < 0.01


def test_the_summary_fits_both_kernels_and_compares_m8_with_m1():
    gemv = load_benchmark("gemv")
    copy = 3000.0
    rows = []
    for k, n in [(576, 576), (2048, 2048), (4096, 4096), (4096, 14336)]:
        b = k * n // 2 + 4 * n * (k // 128)
        rows.append({"K": k, "N": n, "M": 1, "bytes": b, "us": 3.0 + b / 2800e3,
                     "read_only_bytes": b, "read_only_us": 2.0 + b / 2900e3})
        rows.append({"K": k, "N": n, "M": 8, "bytes": b, "us": 1.5 * (3.0 + b / 2800e3),
                     **({"mma32_us": 1.25 * (3.0 + b / 2800e3)} if k == 4096 else {})})
    results = {"copy_gbs": copy, "decode": rows}
    gemv.summarize(results)
    fits = results["fit_m1"]
    assert abs(fits["gemv"]["intercept_us"] - 3.0) < 1e-6 and abs(fits["read_only"]["intercept_us"] - 2.0) < 1e-6
    assert abs(fits["gemv"]["slope_pct_of_copy"] - 100 * 2800 / copy) < 1e-6
    assert set(results["m8_over_m1"]) == {"576x576", "2048x2048", "4096x4096", "4096x14336"}
    assert all(abs(v - 1.5) < 1e-9 for v in results["m8_over_m1"].values())
    assert results["m8_cuda_cores_over_m1"] == {}  # (made-up rows without the CUDA-core column)
    assert {k: round(v, 9) for k, v in results["m8_mma32_over_m1"].items()} == {"4096x4096": 1.25, "4096x14336": 1.25}


@pytest.mark.skipif(bool(find_gpus()), reason="this machine has a GPU: run the benchmark itself")
@pytest.mark.parametrize("script", ["cuda_layer.py", "cuda_attention.py", "cuda_decode.py", "cuda_head.py",
                                    "persistent_step.py"])
def test_cuda_kernel_benchmarks_without_gpu_exit_with_one_line(tmp_path, script):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT.parent / script), "--output", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no NVIDIA GPU found" in proc.stderr
    assert not out.exists()


def test_a_layer_is_the_op_list_between_embedding_and_head_and_its_bytes_are_its_tensors(tmp_path):
    from awq_edge.decoder import decode_ops
    from awq_edge.devices import resolve
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest
    from awq_edge.synthetic import SHAPES, write_random_engine

    layer = load_benchmark("cuda_layer")
    shape = dict(SHAPES["smollm2-135m"], num_hidden_layers=3, vocab_size=512)
    write_random_engine(tmp_path / "e", shape, resolve("h200"), max_context=64)
    info = read_decoder_info(tmp_path / "e", check_files(tmp_path / "e", read_manifest(tmp_path / "e")["files"]))
    ops = layer.layer_ops(decode_ops(info.spec))
    assert {op.kind for op in ops} >= {"linear", "attention"} and not {"embed", "lm_head"} & {op.kind for op in ops}
    per_layer = len(ops) // 3
    assert len(ops) == 3 * per_layer
    assert [op.kind for op in ops[1:per_layer]] == [op.kind for op in ops[per_layer + 1:2 * per_layer]]
    h, i, d = 576, 1536, 64
    weights = h * (9 + 6) * d // 2 + h * h // 2 + h * 2 * i // 2 + i * h // 2  # int4 words
    groups = (15 * d + h + 2 * i) * -(-h // 128) + h * (i // 128)  # scale + zero pairs, fp16 each (576: 5 groups)
    norms = 2 * h * 4
    kv = 2 * 3 * 33 * d * 2
    assert layer.layer_bytes(info, 32) == weights + 4 * groups + norms + kv
    # the timing harness on the cuda backend, its launches recorded instead of run: one pass over
    # the layers is 5 launches a layer fused (4 GEMVs, attention), 9 unfused, one in all on the
    # persistent step (its table: the 3 layers' 5 ops)
    from awq_edge.cuda_backend import CudaBackend
    from native_helpers import RecordingDriver

    manifest = read_manifest(tmp_path / "e")
    backend = CudaBackend(tmp_path / "e", manifest, info, 64, driver=RecordingDriver())
    backend.forward(list(range(40)))
    for fused, per_layer in ((True, 5), (False, 9)):
        seconds, launches = layer.time_layers(backend, layer.layer_ops(decode_ops(info.spec, fused=fused)), 2)
        assert launches == 3 * per_layer and seconds >= 0
    assert layer.time_layers(backend, layer.layer_ops(decode_ops(info.spec)), 2, step=True)[1] == 1
    assert backend.step_count == 3 * 5
    assert [name for name, *_ in backend.drv.launches[-2:]] == ["awq_decode_step_g128"] * 2
    # (sm_90 engine: overlapped launches, so no GEMV prefetches; without them each GEMV but the
    # last prefetches the next linear's weights, up to half the L2)
    gemvs = [args for name, _, _, args in backend.drv.launches if name.startswith("awq_gemv_")]
    assert gemvs and all(args[-1].value == 0 for args in gemvs)
    backend.programmatic, backend.prefetch_bytes = False, 2 << 20
    backend.drv.launches.clear()
    layer.time_layers(backend, layer.layer_ops(decode_ops(info.spec)), 1)
    sizes = [args[-1].value for name, _, _, args in backend.drv.launches if name.startswith("awq_gemv_")]
    assert len(sizes) == 12 and sizes[-1] == 0 and 0 < min(sizes[:-1]) and max(sizes) <= 2 << 20


def test_cuda_decode_prefill_times_on_a_recording_driver_cover_both_paths_and_put_the_backend_back(tmp_path):
    """benchmarks/cuda_decode.py's prefill_times on a recorded backend: each chunk size through
    our kernels and through dequantize + cuBLAS (even below the backend's switch; each size's
    graph captured again for each path), the backend's switch and cuBLAS left as they were;
    without cuBLAS, our kernels only."""
    from awq_edge.cuda_backend import CUBLAS_FROM_ROWS, DEQUANT_SLAB_BYTES, CudaBackend, slab_rows
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine
    from native_helpers import RecordingCublas, RecordingDriver, read_native_engine

    bench = load_benchmark("cuda_decode")
    write_random_engine(tmp_path / "e", dict(SHAPES["smollm2-135m"], num_hidden_layers=2, vocab_size=512),
                        resolve("orin-nano-8gb"), max_context=300)
    manifest, info = read_native_engine(tmp_path / "e")
    blas = RecordingCublas()
    backend = CudaBackend(tmp_path / "e", manifest, info, 300, driver=RecordingDriver(), cublas=blas, tune=True)
    times = bench.prefill_times(backend, 2)
    paths = ("ours", "cublas", "cublas_l2")  # (the recording driver's L2 is an Orin's 4 MiB: 2 MiB slabs too)
    assert set(times) == {f"prefill_{n}_{path}_ms" for n in bench.PREFILL_ROWS for path in paths}
    linears = [op.args for op in backend.ops if op.kind == "linear"]
    slabs = len(linears) + sum(-(-a["N"] // slab_rows(a["N"], a["K"], 2 << 20)) for a in linears)  # 16 MiB, 2 MiB
    calls = {rows: sum(c["rows"] == rows for c in blas.calls) for rows in bench.PREFILL_ROWS}
    # both rounds: a warm-up and 2 runs, each chunk size's graph captured once a round (the new
    # path drops the graphs), and replayed (which a recording driver does not run)
    assert calls == {rows: 2 * slabs for rows in bench.PREFILL_ROWS}
    assert backend.slab_bytes == DEQUANT_SLAB_BYTES
    assert backend.cublas is blas and backend.cublas_from_rows == CUBLAS_FROM_ROWS and backend.time_prefill
    backend.cublas = None
    assert set(bench.prefill_times(backend, 1)) == {f"prefill_{n}_ours_ms" for n in bench.PREFILL_ROWS}


@pytest.mark.parametrize("kind", ["int8", "int4", "fp16"])
def test_the_head_benchmark_reads_a_fresh_copy_of_the_head_each_launch(tmp_path, kind):
    """cuda_head.py's graph, on a recording driver: the head op's launches once per copy of the
    tensors it reads whole (whose bytes it counts), each copy at its own addresses, the engine's
    pointers put back after the capture."""
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.devices import resolve
    from awq_edge.synthetic import SHAPES, write_random_engine
    from native_helpers import RecordingDriver, read_native_engine

    head = load_benchmark("cuda_head")
    write_random_engine(tmp_path / "e", dict(SHAPES["smollm2-135m"], num_hidden_layers=1, vocab_size=1000),
                        resolve("h200"), max_context=16, lm_head=kind)
    manifest, info = read_native_engine(tmp_path / "e")
    driver = RecordingDriver()
    backend = CudaBackend(tmp_path / "e", manifest, info, 16, driver=driver)
    op = next(op for op in backend.ops if op.kind == "lm_head")
    names = head.head_tensors(op)
    assert sum(head.tensor_bytes(info, n) for n in names) == {"int8": 1000 * 576 + 2 * 1000 * 18,
                                                              "int4": 1000 * 288 + 4 * 1000 * 18, "fp16": 2 * 1000 * 576}[kind]
    before = dict(backend.weights)
    graph, extra = head.rotating_graph(backend, info, names, lambda: backend.launch_op(op, 1), 3)
    assert backend.weights == before and len(extra) == 2 * len(names) and graph
    per_copy = {"int4": 3}.get(kind, 1)
    assert len(driver.launches) == 3 * per_copy
    first_pointer = [args[1].value for fn, _, _, args in driver.launches[::per_copy]]
    assert first_pointer[0] == before[names[0]] and len(set(first_pointer)) == 3
    from awq_edge.cuda_runtime import seconds_per_call
    calls = []
    assert seconds_per_call(driver, lambda: calls.append(1), 4, 3) >= 0 and len(calls) == 1 + 4 * 3  # a warm-up
