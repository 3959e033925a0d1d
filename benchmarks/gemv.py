#!/usr/bin/env python3
"""W4A16 kernel benchmark: decode GEMV bandwidth vs a device-to-device copy, vs torch fp16, and prefill GEMM.

    python benchmarks/gemv.py [--iters 200] [--output benchmarks/results/NAME.json]

Needs an NVIDIA GPU and nvcc (the kernels are built for the GPU's arch and loaded via
ctypes). Torch with CUDA is optional: without it the torch column reads "not measured".
Without a GPU it prints one line and exits with code 2.

Method: --iters launches of one shape are captured in one CUDA graph and replayed back to
back, as a decode step replays its graph; time per launch = replay time / --iters (median of
5 replays, CUDA events). Timing single launches from Python would measure the host's launch
latency instead (a 4096x4096 GEMV takes ~3 us on an H100, a ctypes launch about as long).
The weights rotate over enough copies (>= 4x the L2 size) that each launch reads them from
DRAM. Torch fp16 (the peer) is timed the same way, in its own CUDA graph. Achieved
bandwidth = bytes moved (packed weights + scales + zeros + activations + output) / time;
the ceiling is a large cudaMemcpy device-to-device (read + write bytes / time) measured in
the same run.

What bounds the GEMV, per M = 1 shape: a read-only kernel of the same grid and the same bytes
(awq_w4a16_read_only: the GEMV's loads, no arithmetic) is timed beside it, and a straight line
time = intercept + bytes / bandwidth is fitted over the shapes, for both: the intercept is the
fixed cost of a launch (in a graph), the slope the bandwidth once a launch is running.
Prefill rows also time the other way to prefill: dequantize the weights to fp16
(awq_w4a16_dequantize), then torch's fp16 matmul (cuBLAS), captured together; at M = 16 and 32,
which the op runs on the tensor-core GEMV in one pass, also the same rows as 8-row GEMVs
(chunks_of_8_us: the weights read 2 or 4 times, as before 2026-12-04's run 3); above 32 rows, where
the op runs the GEMM on one split of K, also the GEMM with K split as the cuda backend splits it
for few output tiles (split_k ways: split_k_us; awq_w4a16_gemm_split_k). At M = 8 the op
(awq_w4a16_matmul) runs the tensor-core GEMV with 16 rows a block; the CUDA-core one
(awq_w4a16_gemv: cuda_cores_us, m8_cuda_cores_over_m1) and the tensor-core one with 32 rows a block
(awq_w4a16_gemv_mma32: mma32_us, m8_mma32_over_m1) are timed beside it. At M = 1 the tensor-core
decode GEMV (awq_w4a16_gemv_tc, the cuda backend's awq_gemv_tc_*: tensor_cores_us,
tensor_cores_pct_of_copy, and its own fit) and the same on a persistent grid
(awq_w4a16_gemv_tc_persistent: tensor_cores_persistent_us, ..._pct_of_copy, its fit) are timed
beside the CUDA-core one.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from awq_edge import packing, plugins  # noqa: E402
from awq_edge.cuda_runtime import CudaRuntime, find_gpus  # noqa: E402
from awq_edge.cuda_backend import GEMM_SPLIT_MAX_TILES, GEMM_SPLIT_WORKSPACE_BYTES, gemm_split_count  # noqa: E402

# (K, N): SmolLM2-135M's, 2048-wide (Llama-3.2-1B), 7B's. The small ones give the fit its intercept.
DECODE_SHAPES = [(576, 576), (576, 1536), (1536, 576), (2048, 2048), (2048, 8192), (8192, 2048),
                 (4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]
PREFILL_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (4096, 14336)]
DECODE_ROWS = [1, 8]  # batch-1 decode; 8 is the GEMV's largest M
PREFILL_ROWS = [16, 32, 128, 512, 2048]  # 16 and 32: the tensor-core GEMV in one pass (awq_w4a16_matmul)
GROUP_SIZE = 128
REPLAYS = 5


def check(lib, status: int) -> None:
    """A kernel launcher's return value: 0, or the error it names, raised."""
    if status:
        raise RuntimeError(lib.awq_w4a16_status_string(status).decode())


def median_ms(cuda: CudaRuntime, launch, iters: int) -> float:
    """Median time of single launches (for long operations, where launch latency does not matter)."""
    start, end = cuda.event(), cuda.event()
    for i in range(5):  # warm-up
        launch(i)
    times = []
    for i in range(iters):
        cuda.record(start)
        launch(i)
        cuda.record(end)
        times.append(cuda.elapsed_ms(start, end))
    return float(np.median(times))


def graph_ms(cuda: CudaRuntime, stream: int, launch, iters: int) -> float:
    """Time per launch: launch(0..iters-1, stream) captured in one CUDA graph, replayed back to back."""
    exec_graph = cuda.capture_graph(stream, lambda: [launch(i, stream) for i in range(iters)])
    start, end = cuda.event(), cuda.event()
    try:
        cuda.launch_graph(exec_graph, stream)  # warm-up
        times = []
        for _ in range(REPLAYS):
            cuda.record(start, stream)
            cuda.launch_graph(exec_graph, stream)
            cuda.record(end, stream)
            times.append(cuda.elapsed_ms(start, end) / iters)
    finally:
        cuda.stream_synchronize(stream)
        cuda.destroy_graph(exec_graph)
    return float(np.median(times))


def copy_bandwidth_gbs(cuda: CudaRuntime, iters: int) -> float:
    nbytes = 512 << 20
    src, dst = cuda.malloc(nbytes), cuda.malloc(nbytes)
    try:
        ms = median_ms(cuda, lambda i: cuda.copy_device(dst, src, nbytes), max(20, iters // 5))
    finally:
        cuda.free(src)
        cuda.free(dst)
    return 2 * nbytes / ms / 1e6  # read + write


def fit_launch_cost(nbytes, us) -> dict:
    """Least-squares line us = intercept + bytes / bandwidth over the shapes: the intercept (us)
    is the fixed cost of one launch, the slope the bandwidth (GB/s) once a launch runs."""
    slope, intercept = np.polyfit(np.asarray(nbytes, float), np.asarray(us, float), 1)
    return {"intercept_us": float(intercept), "slope_gbs": float(1e-3 / slope) if slope > 0 else float("inf")}


class Weights:
    """`copies` independent packed weight sets on the device, so rotation defeats the L2 cache."""

    def __init__(self, cuda: CudaRuntime, k: int, n: int, copies: int, rng):
        groups = packing.num_groups(k, GROUP_SIZE)
        q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
        zeros = rng.integers(0, 16, size=(n, groups), dtype=np.uint8)
        scales = rng.uniform(0.002, 0.02, size=(n, groups)).astype(np.float16)
        packed = packing.pack_for_plugin(q, scales, zeros, GROUP_SIZE)
        self.nbytes = sum(a.nbytes for a in packed.values())
        self.sets = [tuple(cuda.to_device(packed[name]) for name in ("qweight", "scales", "zeros"))
                     for _ in range(copies)]
        self.cuda = cuda

    def free(self):
        for s in self.sets:
            for p in s:
                self.cuda.free(p)


def torch_graph_ms(launch, iters: int) -> float:
    """Time per call of launch(i) (torch work, or ours on torch's current stream), timed like ours:
    a warm-up off the default stream (as torch's graph capture asks), `iters` calls in one CUDA
    graph, the median of REPLAYS replays."""
    import torch

    with torch.cuda.stream(torch.cuda.Stream()):
        for i in range(3):
            launch(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(iters):
            launch(i)
    graph.replay()  # warm-up
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    del graph
    torch.cuda.empty_cache()
    return float(np.median(times))


def torch_cuda():
    """torch, if it is installed with CUDA; else None (the peer columns read "not measured")."""
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def torch_ms(k: int, n: int, m: int, copies: int, iters: int):
    """Torch fp16 X @ W per launch (cuBLAS); None without torch with CUDA."""
    torch = torch_cuda()
    if torch is None:
        return None
    ws = [torch.randn(k, n, device="cuda", dtype=torch.float16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)
    return torch_graph_ms(lambda i: torch.matmul(x, ws[i % copies]), iters)


def dequant_torch_ms(lib, weights: "Weights", k: int, n: int, m: int, iters: int):
    """Prefill as "dequantize to fp16 (awq_w4a16_dequantize), then torch fp16 matmul (cuBLAS)", per
    pair, our kernel launched on torch's (capture) stream; None without torch with CUDA."""
    torch = torch_cuda()
    if torch is None:
        return None
    w = torch.empty(n, k, device="cuda", dtype=torch.float16)
    x = torch.randn(m, k, device="cuda", dtype=torch.float16)

    def pair(i):
        q, s, z = weights.sets[i % len(weights.sets)]
        check(lib, lib.awq_w4a16_dequantize(q, s, z, w.data_ptr(), n, k, GROUP_SIZE,
                                            torch.cuda.current_stream().cuda_stream))
        return torch.matmul(x, w.t())

    return torch_graph_ms(pair, iters)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    gpus = find_gpus()
    if not gpus:
        print("error: no NVIDIA GPU found; benchmarks/gemv.py measures the CUDA kernels and needs one", file=sys.stderr)
        return 2
    gpu = gpus[0]
    cuda = CudaRuntime()
    lib = plugins.load_kernels(gpu.arch)
    l2 = cuda.l2_cache_bytes()
    stream = cuda.stream()
    rng = np.random.default_rng(0)

    sms = cuda.multiprocessor_count()
    partials = cuda.malloc(GEMM_SPLIT_WORKSPACE_BYTES)  # the split-K GEMM's workspace, as the cuda backend's
    counters = cuda.malloc(4 * GEMM_SPLIT_MAX_TILES)
    cuda.memset(counters, 0, 4 * GEMM_SPLIT_MAX_TILES)
    copy_gbs = copy_bandwidth_gbs(cuda, args.iters)
    print(f"{gpu.name} ({gpu.arch}), L2 {l2 >> 20} MiB, device-to-device copy {copy_gbs:.1f} GB/s")
    results = {"gpu": gpu.name, "arch": gpu.arch, "date": dt.datetime.now().isoformat(timespec="seconds"),
               "l2_bytes": l2, "copy_gbs": copy_gbs, "group_size": GROUP_SIZE, "iters": args.iters,
               "timing": "CUDA graph of --iters launches, time per launch, median of 5 replays",
               "decode": [], "prefill": []}
    read_only_us = {}

    header = f"{'K x N':>13} {'M':>5} {'us':>9} {'GB/s':>8} {'% copy':>7} {'torch fp16 us':>14} {'speedup':>8} {'TFLOP/s':>8}"
    print(header)
    for k, n in DECODE_SHAPES:
        probe = Weights(cuda, k, n, 1, rng)
        copies = max(2, min(4096, -(-4 * max(l2, 1 << 20) // probe.nbytes)))
        decode_iters = max(args.iters, copies)  # a graph that visits every copy: small shapes too read DRAM
        probe.free()
        weights = Weights(cuda, k, n, copies, rng)
        max_m = max(PREFILL_ROWS)
        x = cuda.to_device(rng.standard_normal((max_m, k)).astype(np.float16))
        y = cuda.malloc(max_m * n * 2)
        try:
            def read_only(i, stream):
                check(lib, lib.awq_w4a16_read_only(*weights.sets[i % copies], y, n, k, GROUP_SIZE, stream))

            def entry_point(name, m):  # launch(i, stream) of lib.name over the rotating weight copies
                fn = getattr(lib, name)
                return lambda i, stream: check(lib, fn(x, *weights.sets[i % copies], y, m, n, k, GROUP_SIZE, stream))

            def split_k(m, splits):  # the GEMM as the cuda backend launches it for few output tiles
                return lambda i, stream: check(lib, lib.awq_w4a16_gemm_split_k(
                    x, *weights.sets[i % copies], y, m, n, k, GROUP_SIZE, splits, partials, counters, stream))

            def chunks_of_8(m):  # M rows as tensor-core GEMVs of 8 rows each (the weights read M / 8 times)
                def launch(i, stream):
                    for m0 in range(0, m, 8):
                        check(lib, lib.awq_w4a16_gemv_mma(x + 2 * m0 * k, *weights.sets[i % copies], y + 2 * m0 * n,
                                                          min(8, m - m0), n, k, GROUP_SIZE, stream))
                return launch

            read_only_us[(k, n)] = graph_ms(cuda, stream, read_only, decode_iters) * 1e3
            for m in DECODE_ROWS + (PREFILL_ROWS if (k, n) in PREFILL_SHAPES else []):
                launch = entry_point("awq_w4a16_matmul", m)
                iters = decode_iters if m in DECODE_ROWS else max(20, args.iters // 5)
                ms = graph_ms(cuda, stream, launch, iters)
                moved = weights.nbytes + 2 * m * (k + n)
                gbs = moved / ms / 1e6
                tflops = 2 * m * k * n / ms / 1e9
                t_ms = torch_ms(k, n, m, copies, iters)
                row = {"K": k, "N": n, "M": m, "bytes": moved, "us": ms * 1e3, "gbs": gbs, "pct_of_copy": 100 * gbs / copy_gbs,
                       "tflops": tflops, "torch_fp16_us": t_ms * 1e3 if t_ms else None,
                       "speedup_vs_torch": (t_ms / ms) if t_ms else None}
                if m in PREFILL_ROWS:  # the other way to prefill: dequantize, then cuBLAS fp16
                    d_ms = dequant_torch_ms(lib, weights, k, n, m, iters)
                    row["dequant_cublas_us"] = d_ms * 1e3 if d_ms else None
                    row["ours_vs_dequant_cublas"] = d_ms / ms if d_ms else None
                if m in PREFILL_ROWS and m <= 32 and k % 32 == 0:  # the same rows 8 at a time, as before run 3
                    row["chunks_of_8_us"] = graph_ms(cuda, stream, chunks_of_8(m), iters) * 1e3
                splits = gemm_split_count(m, n, k, sms) if m in PREFILL_ROWS and m > 32 else 1
                if splits > 1:  # the cuda backend's GEMM: K split over blocks
                    row["split_k"] = splits
                    row["split_k_us"] = graph_ms(cuda, stream, split_k(m, splits), iters) * 1e3
                if m == max(DECODE_ROWS):  # the op runs it on tensor cores; the CUDA-core GEMV and 32-row blocks beside it
                    row["cuda_cores_us"] = graph_ms(cuda, stream, entry_point("awq_w4a16_gemv", m), iters) * 1e3
                    if k % 32 == 0:
                        row["mma32_us"] = graph_ms(cuda, stream, entry_point("awq_w4a16_gemv_mma32", m), iters) * 1e3
                if m == 1 and k % 32 == 0 and k <= 16384:  # the tensor-core decode GEMVs beside it
                    for key, entry in (("tensor_cores", "awq_w4a16_gemv_tc"),
                                       ("tensor_cores_persistent", "awq_w4a16_gemv_tc_persistent")):
                        row[f"{key}_us"] = graph_ms(cuda, stream, entry_point(entry, 1), iters) * 1e3
                        row[f"{key}_pct_of_copy"] = 100 * moved / row[f"{key}_us"] / 1e3 / copy_gbs
                if m == 1:
                    row["read_only_bytes"] = weights.nbytes + 2 * n
                    row["read_only_us"] = read_only_us[(k, n)]
                    row["read_only_pct_of_copy"] = 100 * row["read_only_bytes"] / row["read_only_us"] / 1e3 / copy_gbs
                results["decode" if m in DECODE_ROWS else "prefill"].append(row)
                torch_col = f"{t_ms * 1e3:14.1f} {t_ms / ms:7.2f}x" if t_ms else f"{'not measured':>14} {'-':>8}"
                dequant_col = (f"  dequant+cuBLAS {row['dequant_cublas_us']:.1f} us, ours {row['ours_vs_dequant_cublas']:.2f}x"
                               if row.get("dequant_cublas_us") else "")
                if row.get("tensor_cores_us"):
                    dequant_col += (f"  tensor cores {row['tensor_cores_us']:.1f} us "
                                    f"({row['tensor_cores_pct_of_copy']:.1f}% of copy), persistent "
                                    f"{row['tensor_cores_persistent_us']:.1f} us")
                print(f"{k:>6}x{n:<6} {m:>5} {ms * 1e3:9.1f} {gbs:8.1f} {row['pct_of_copy']:6.1f}% {torch_col} "
                      f"{tflops:8.2f}{dequant_col}")
        finally:
            weights.free()
            cuda.free(x)
            cuda.free(y)

    summarize(results)
    out = args.output or Path(__file__).resolve().parent / "results" / \
        f"gemv-{gpu.arch}-{gpu.name.replace(' ', '_')}-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def summarize(results: dict) -> None:
    """Add and print the fits (ours and the read-only kernel, M = 1) and M = 8 over M = 1."""
    copy_gbs = results["copy_gbs"]
    m1 = [r for r in results["decode"] if r["M"] == 1]
    fits = {"gemv": fit_launch_cost([r["bytes"] for r in m1], [r["us"] for r in m1]),
            "read_only": fit_launch_cost([r["read_only_bytes"] for r in m1], [r["read_only_us"] for r in m1])}
    tc = [r for r in m1 if r.get("tensor_cores_us")]
    if len(tc) >= 2:
        for key in ("tensor_cores", "tensor_cores_persistent"):
            fits[f"gemv_{key}"] = fit_launch_cost([r["bytes"] for r in tc], [r[f"{key}_us"] for r in tc])
    for name, fit in fits.items():
        fit["slope_pct_of_copy"] = 100 * fit["slope_gbs"] / copy_gbs
        print(f"fit, {name:>9} M=1: {fit['intercept_us']:.2f} us per launch + bytes / {fit['slope_gbs']:.0f} GB/s "
              f"({fit['slope_pct_of_copy']:.0f}% of copy)")
    results["fit_m1"] = fits
    by_shape = {(r["K"], r["N"]): r["us"] for r in m1}
    results["m8_over_m1"] = {f"{r['K']}x{r['N']}": r["us"] / by_shape[(r["K"], r["N"])]
                             for r in results["decode"] if r["M"] == 8}
    print("M=8 time / M=1 time: " + ", ".join(f"{shape} {v:.2f}x" for shape, v in results["m8_over_m1"].items()))
    for column, key, what in (("cuda_cores_us", "m8_cuda_cores_over_m1", "on CUDA cores"),
                              ("mma32_us", "m8_mma32_over_m1", "on tensor cores, 32-row blocks")):  # the variants
        results[key] = {f"{r['K']}x{r['N']}": r[column] / by_shape[(r["K"], r["N"])]
                        for r in results["decode"] if r["M"] == 8 and r.get(column)}
        if results[key]:
            print(f"M=8 {what} / M=1: " + ", ".join(f"{shape} {v:.2f}x" for shape, v in results[key].items()))


if __name__ == "__main__":
    sys.exit(main())
