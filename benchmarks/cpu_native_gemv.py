"""Our 4-bit GEMV (plugins/cpu/gemv_q4.c) against ONNX Runtime's MatMulNBits on one token's weights.

    python benchmarks/cpu_native_gemv.py ENGINE [--threads 2] [--runs 5] [--steps 30] [--march native]

Issue 22's question before a native CPU decode step: can our own kernel read the weights as
fast as MLAS does? Both sides get every MatMulNBits of the engine's graph (the fused q/k/v,
o, gate/up, down of every layer and the int4 lm_head), the very initializers, one activation
row each:
- ort:    a graph of those MatMulNBits nodes alone (as cpu_profile.py's "weights only"), the
          engine's session options (spinning threads, accuracy_level from export.json);
- native: gemv_q4_chain, the same products back to back in C (int8 activations per block),
          OpenMP threads busy-waiting between products (OMP_WAIT_POLICY=active).
Each side runs in its own child process (one side's spinning threads would slow the other),
alternating; each child reports the median of --repeats timings of --steps tokens. Prints ms per
token, GB/s of weight bytes, this machine's read bandwidth (numpy, as cpu_profile.py), and the
largest relative difference of the two sides' outputs; writes results/cpu_native_gemv-<time>.json.
--march builds our side for another target, to measure a fallback path on this machine
(x86-64-v3: the AVX2 path; x86-64: plain C).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_attention_split import median_ms  # noqa: E402  (one timer for the CPU benchmarks)


def matmul_nodes(engine: Path):
    """[(name, K, N, block, B, scales, zero_points)] of every 4-bit MatMulNBits in the engine's graph,
    in graph order (read as the native step reads them: onnx refuses a data file with a second link)."""
    from awq_edge.cpu_native import graph_weights

    arrays, matmuls = graph_weights(engine)
    return [(name, m["K"], m["N"], m["block_size"], *(np.ascontiguousarray(arrays[i]) for i in m["inputs"][1:4]))
            for name, m in matmuls.items() if m.get("bits", 4) == 4]


def ort_graph(engine: Path, into: Path) -> Path:
    from cpu_profile import session_graphs

    return session_graphs(engine, into)["weights_only"]


def native_flags(march: str) -> tuple:
    from awq_edge import cpu_native

    return tuple(f"-march={march}" if f == cpu_native.NATIVE_CPU else f for f in cpu_native.DEFAULT_FLAGS)


def time_native(engine: Path, steps: int, repeats: int, march: str) -> dict:
    import ctypes

    from awq_edge import cpu_native

    lib = cpu_native.load_library(native_flags(march))
    nodes = matmul_nodes(engine)
    count = len(nodes)
    ptr = ctypes.c_void_p
    keep = [n[4:] for n in nodes]
    b = (ptr * count)(*[k[0].ctypes.data for k in keep])
    s = (ptr * count)(*[k[1].ctypes.data for k in keep])
    z = (ptr * count)(*[k[2].ctypes.data for k in keep])
    ints = ctypes.c_int * count
    n_, k_, g_ = ints(*[n[2] for n in nodes]), ints(*[n[1] for n in nodes]), ints(*[n[3] for n in nodes])
    kmax = max(n[1] for n in nodes)
    gmin = min(n[3] for n in nodes)
    x = np.random.default_rng(0).standard_normal(kmax).astype(np.float32)
    y = np.empty(max(n[2] for n in nodes), np.float32)
    x8 = np.empty(kmax + max(n[3] for n in nodes), np.int8)
    xs, xsum = np.empty(kmax // gmin + 1, np.float32), np.empty(kmax // gmin + 1, np.int32)

    def step():
        lib.gemv_q4_chain(count, b, s, z, n_, k_, g_, x.ctypes.data, y.ctypes.data, x8.ctypes.data,
                          xs.ctypes.data, xsum.ctypes.data)
    return {"ms": median_ms(step, steps, repeats), "simd": cpu_native.simd_path(lib)}


def time_ort(graph: Path, accuracy_level: int, threads: int, steps: int, repeats: int) -> dict:
    import onnxruntime as ort

    from awq_edge.backend_ort import session_options

    session = ort.InferenceSession(str(graph), session_options(threads, accuracy_level), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    for i in session.get_inputs():
        binding.bind_cpu_input(i.name, np.random.default_rng(0).standard_normal(i.shape).astype(np.float32))
    for o in session.get_outputs():
        binding.bind_output(o.name, "cpu")
    return {"ms": median_ms(lambda: session.run_with_iobinding(binding), steps, repeats)}


def agreement(engine: Path) -> dict:
    """Largest |native - ort| / max|ort| over the products, on one random row each (in this process)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from awq_edge import cpu_native

    lib = cpu_native.load_library()
    rng = np.random.default_rng(1)
    worst = 0.0
    accuracy_level = json.loads((engine / "export.json").read_text())["matmul_accuracy_level"]
    for name, k, n, g, b, s, z in matmul_nodes(engine)[:8]:  # a layer's worth; the lm_head is last
        x = rng.standard_normal(k).astype(np.float32)
        node = helper.make_node("MatMulNBits", ["x", "B", "s", "z"], ["y"], domain="com.microsoft", K=k, N=n, bits=4,
                                block_size=g, accuracy_level=accuracy_level)
        graph = helper.make_graph([node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
                                  [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "s"),
                                   numpy_helper.from_array(z, "z")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x[None]})[0][0]
        got = cpu_native.gemv_q4(lib, b, s, z, x, k, g)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    return {"max_rel_diff_vs_ort": worst, "accuracy_level": accuracy_level}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--runs", type=int, default=5, help="child processes per side, alternating")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--march", default="native", help="our side's -march (x86-64-v3: AVX2, x86-64: plain C)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: SIDE GRAPH
    args = ap.parse_args()
    from awq_edge.backend_ort import physical_cores

    threads = args.threads or physical_cores()
    accuracy_level = json.loads((args.engine / "export.json").read_text())["matmul_accuracy_level"]
    if args.child:
        side, graph = args.child
        res = (time_native(args.engine, args.steps, args.repeats, args.march) if side == "native"
               else time_ort(Path(graph), accuracy_level, threads, args.steps, args.repeats))
        print("RESULT " + json.dumps(res))
        return

    import tempfile

    from cpu_profile import read_bandwidth

    nodes = matmul_nodes(args.engine)
    weight_bytes = sum(b.nbytes + s.nbytes + z.nbytes for *_, b, s, z in nodes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="active", OMP_PROC_BIND="true")
    runs = {"ort": [], "native": []}
    simd = None
    with tempfile.TemporaryDirectory(prefix="awq-gemv-") as tmp:
        graph = ort_graph(args.engine, Path(tmp))
        for r in range(args.runs):
            for side in (("ort", "native") if r % 2 == 0 else ("native", "ort")):
                cmd = [sys.executable, __file__, str(args.engine), "--threads", str(threads), "--steps", str(args.steps),
                       "--repeats", str(args.repeats), "--march", args.march, "--child", side, str(graph)]
                done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
                res = json.loads(next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))[7:])
                simd = res.get("simd", simd)
                runs[side].append(res["ms"])
                print(f"run {r + 1} {side:6} {res['ms']:.3f} ms", file=sys.stderr)
    medians = {side: statistics.median(v) for side, v in runs.items()}
    result = {
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "load_average": os.getloadavg(),
        "engine": str(args.engine), "threads": threads, "products": len(nodes), "weight_bytes": weight_bytes,
        "simd": simd, "march": args.march,
        "bandwidth_gbs": {"1_thread": read_bandwidth(1), f"{threads}_threads": read_bandwidth(threads)},
        "ms_per_token": medians, "runs": runs,
        "gbs": {side: weight_bytes / ms / 1e6 for side, ms in medians.items()},
        "native_vs_ort_time": medians["native"] / medians["ort"],
        **agreement(args.engine),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu_native_gemv-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(nodes)} products, {weight_bytes / 2**20:.1f} MiB, {threads} threads, native SIMD path {simd}")
    for side, ms in medians.items():
        print(f"{side:7} {ms:7.3f} ms per token  {result['gbs'][side]:6.1f} GB/s")
    print(f"native / ort time {result['native_vs_ort_time']:.2f}; read bandwidth {result['bandwidth_gbs']}; "
          f"max rel diff vs ORT {result['max_rel_diff_vs_ort']:.2e}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
