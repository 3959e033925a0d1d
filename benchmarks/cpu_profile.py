"""Where a CPU decode token goes: ONNX Runtime's ops, Python between tokens, the lm_head and its
re-scoring, threads, against the weight-bytes roofline of this machine, all in one run.

    python benchmarks/cpu_profile.py ENGINE [--tokens 128] [--threads 2] [--runs 3]

1. Memory bandwidth of this machine, measured here: every thread (1 and --threads) reads its
   own 256 MiB float32 array with numpy (np.add.reduce releases the GIL), best of 3.
2. The bytes a decode token must read: every initializer a MatMulNBits node reads (the body's
   4-bit linears and the quantized lm_head), plus one embedding row and the top-k rows of the
   exact table that the graph re-scores. roofline tok/s = bandwidth / bytes.
3. One greedy decode of --tokens tokens through the real Engine.stream_ids, with the time of
   each part taken where it runs: the ORT session (run_with_iobinding, the in-graph re-scoring
   included), putting the re-scored logits in place, the sampler, the streaming detokenizer,
   and the rest of the Python loop.
4. The same decode with ORT's profiler on (a separate session: profiling slows it), summed per
   op type per token, with the node count of a decode step.
5. Decode tok/s with 1 and --threads threads, spinning off and on (the engine's default).
6. Attention against the context (--contexts): the ORT session alone, ms per decode step with
   P tokens already cached, for the engine's graph, the same graph with every
   GroupQueryAttention replaced by a Slice of its query (no attention), and its MatMulNBits
   alone (the weights). Each graph is timed in its own child process, median of 5 x 20 steps.
Prints a table and writes benchmarks/results/cpu_profile-<time>.json.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT = "Write a long story about a robot arm that learns to paint."


def read_bandwidth(threads: int, mib: int = 256, repeats: int = 3) -> float:
    """GB/s read by `threads` threads, each summing its own array (best of `repeats`)."""
    arrays = [np.ones(mib * 2**20 // 4, np.float32) for _ in range(threads)]
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.add.reduce, args=(a,)) for a in arrays]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * mib * 2**20 / (time.perf_counter() - start) / 1e9)
    return best


def session_graphs(engine_dir: Path, into: Path) -> dict:
    """The engine's model.onnx and two cut-down copies of it (sharing its weights file): every
    GroupQueryAttention replaced by a Slice of its query's first heads * head_dim columns (the
    shape attention returns), and the MatMulNBits nodes alone, each fed by a graph input."""
    import onnx
    from onnx import helper

    source = engine_dir / "model.onnx"
    try:  # ORT refuses a weights file that resolves outside the model's folder: no symlink
        os.link(engine_dir / "model.onnx.data", into / "model.onnx.data")
    except OSError:  # another filesystem
        shutil.copyfile(engine_dir / "model.onnx.data", into / "model.onnx.data")
    info = json.loads((engine_dir / "export.json").read_text())
    width = info["num_heads"] * info["head_dim"]
    graphs = {"engine": source}

    def save(model, name: str) -> None:
        produced = {o for n in model.graph.node for o in n.output}
        outputs = [o for o in model.graph.output if o.name in produced]
        del model.graph.output[:]
        model.graph.output.extend(outputs)
        graphs[name] = into / f"{name}.onnx"
        onnx.save(model, str(graphs[name]))

    model = onnx.load(str(source), load_external_data=False)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(np.array([v], np.int64), f"cut/{v}")
                                   for v in (0, width, -1))
    nodes = [helper.make_node("Slice", [n.input[0], "cut/0", f"cut/{width}", "cut/-1"], [n.output[0]])
             if n.op_type == "GroupQueryAttention" else n for n in model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    save(model, "no_attention")

    model = onnx.load(str(source), load_external_data=False)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    del model.graph.node[:], model.graph.input[:], model.graph.output[:]
    for k in sorted({helper.get_attribute_value(a) for n in matmuls for a in n.attribute if a.name == "K"}):
        model.graph.input.append(helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, [1, 1, k]))
    for i, n in enumerate(matmuls):
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        model.graph.node.append(helper.make_node("MatMulNBits", [f"x{attrs['K']}", *n.input[1:]], [f"y{i}"],
                                                 domain=n.domain, **attrs))
        model.graph.output.append(helper.make_tensor_value_info(f"y{i}", onnx.TensorProto.FLOAT, [1, 1, attrs["N"]]))
    save(model, "weights_only")
    return graphs


def time_session(model_path: Path, past: int, threads: int, accuracy_level: int, repeats: int = 5,
                 steps: int = 20) -> float:
    """Median ms of one decode step (1 new token, `past` cached) of the ORT session alone, with
    the session options Engine.load gives it (accuracy_level: export.json's matmul_accuracy_level)."""
    import onnxruntime as ort

    from awq_edge.backend_ort import session_options

    session = ort.InferenceSession(str(model_path), session_options(threads, accuracy_level), providers=["CPUExecutionProvider"])
    binding = session.io_binding()
    kept = []
    outputs = {o.name for o in session.get_outputs()}
    for i in session.get_inputs():
        if i.name == "input_ids":
            binding.bind_cpu_input(i.name, np.array([[42]], np.int64))
        elif i.name == "past_length":
            binding.bind_cpu_input(i.name, np.array([past], np.int64))
        elif i.name.startswith("past_"):
            kept.append(ort.OrtValue.ortvalue_from_numpy(np.zeros((1, i.shape[1], past + 1, i.shape[3]), np.float32)))
            binding.bind_ortvalue_input(i.name, kept[-1])
            if i.name.replace("past_", "present_") in outputs:  # (not in no_attention)
                binding.bind_ortvalue_output(i.name.replace("past_", "present_"), kept[-1])
        else:  # weights_only's inputs
            binding.bind_cpu_input(i.name, np.random.default_rng(0).standard_normal(i.shape).astype(np.float32))
    for name in outputs:
        if not name.startswith("present_"):
            binding.bind_output(name, "cpu")
    for _ in range(steps):
        session.run_with_iobinding(binding)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            session.run_with_iobinding(binding)
        times.append((time.perf_counter() - start) / steps * 1e3)
    return statistics.median(times)


def attention_by_context(engine_dir: Path, contexts: list[int], threads: int) -> dict:
    """ms per decode step of the session at each cached length: engine, no_attention, weights_only."""
    out = {}
    accuracy_level = json.loads((engine_dir / "export.json").read_text())["matmul_accuracy_level"]
    with tempfile.TemporaryDirectory(prefix="awq-cut-") as tmp:
        graphs = session_graphs(engine_dir, Path(tmp))
        for past in contexts:
            row = {}
            for name, path in graphs.items():
                if name == "weights_only" and past != contexts[0]:
                    row[name] = out[contexts[0]][name]  # no KV input: the same at every length
                    continue
                child = subprocess.run([sys.executable, __file__, "--time-session", str(path), str(past), str(threads),
                                        str(accuracy_level)],
                                       capture_output=True, text=True, check=True)
                row[name] = float(child.stdout.strip().splitlines()[-1])
            row["attention"] = row["engine"] - row["no_attention"]
            out[past] = row
    return out


def bytes_per_token(engine) -> dict:
    """What one decode step reads: the MatMulNBits weights, one embedding row, the re-scored rows."""
    import onnx

    model = onnx.load(str(engine.path / "model.onnx"), load_external_data=False)
    sizes = {}
    for t in model.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    linear = sum(sizes.get(i, 0) for n in model.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:])
    head = sum(sizes.get(i, 0) for n in model.graph.node if n.name == "lm_head" for i in n.input[1:])
    info = json.loads((engine.path / "export.json").read_text())  # plain JSON: older checkouts too
    embed_row = info["hidden_size"] * 2
    rescore = (info.get("lm_head_exact") or {}).get("top_k", 0) * info["hidden_size"] * 2
    return {"linears_incl_lm_head": linear, "lm_head": head, "embedding_row": embed_row, "rescored_rows": rescore,
            "total": linear + embed_row + rescore, "nodes": len(model.graph.node)}


def load_engine(engine_dir: Path, context: int, threads: int, spin: bool):
    """Engine.load with ORT's spinning on or off. An awq-edge from before the `spin` option (to
    profile an older checkout, "before" a change) gets it through its session options."""
    from awq_edge import backend_ort
    from awq_edge.engine import Engine

    if "spin" in inspect.signature(Engine.load).parameters:
        return Engine.load(engine_dir, max_context=context, threads=threads, spin=spin)
    original = backend_ort.session_options

    def with_spin(*args):
        so = original(*args)
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        return so
    backend_ort.session_options = with_spin
    try:
        return Engine.load(engine_dir, max_context=context, threads=threads)
    finally:
        backend_ort.session_options = original


class Timers:
    """Seconds spent in each wrapped callable, summed; restore() puts the originals back."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.originals = []

    def wrap(self, owner, name: str, label: str):
        fn = getattr(owner, name)
        seconds = self.seconds
        self.originals.append((owner, name, owner.__dict__.get(name, fn) if isinstance(owner, type) else fn))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[label] += time.perf_counter() - start
        setattr(owner, name, timed)

    def restore(self):
        for owner, name, original in reversed(self.originals):
            setattr(owner, name, original)


def timed_decode(engine_dir: Path, tokens: int, threads: int, spin: bool) -> dict:
    """One greedy decode with each part of a token timed where it runs."""
    from awq_edge import engine as engine_module
    from awq_edge.sampling import Sampler, SamplingSettings
    from awq_edge.tokenizer import StreamDecoder

    engine = load_engine(engine_dir, tokens + 64, threads, spin)
    ids = engine.prompt_ids(PROMPT)
    greedy = SamplingSettings(temperature=0)
    for _ in engine.stream_ids(ids, Sampler(greedy), 8, ignore_eos=True):  # warm-up
        pass
    timers = Timers()
    backend = engine.backend
    timers.wrap(backend.session, "run_with_iobinding", "ort_session")
    if getattr(backend, "rescore_k", 0) or getattr(backend, "exact_head", None) is not None:  # (older: numpy)
        timers.wrap(backend, "rescore", "rescore")
    timers.wrap(engine_module.Sampler, "__call__", "sampler")
    timers.wrap(StreamDecoder, "push", "detokenizer")
    try:
        start = time.perf_counter()
        for _ in engine.stream_ids(ids, Sampler(greedy), tokens, ignore_eos=True):
            pass
        total = time.perf_counter() - start
    finally:
        timers.restore()
    stats = engine.last_stats
    prefill = stats.prefill_s
    steps = stats.new_tokens - 1
    decode = stats.decode_s
    # Per decode token: the prefill (one session run, plus a little Python) is taken out of the
    # session's time; the first token's sampling and re-scoring stay in (1 of --tokens).
    parts = dict(timers.seconds)
    parts["ort_session"] -= prefill
    per_token = {k: v / steps * 1e3 for k, v in parts.items()}
    per_token["decode_total"] = decode / steps * 1e3
    per_token["python_other"] = per_token["decode_total"] - sum(v for k, v in per_token.items()
                                                                 if k != "decode_total")
    return {"decode_tok_s": stats.decode_tok_s, "ms_per_token": per_token, "wall_s": total,
            "prompt_tokens": stats.prompt_tokens, "new_tokens": stats.new_tokens, "engine": engine}


def op_profile(engine_dir: Path, tokens: int, threads: int, spin: bool) -> dict:
    """ORT's own profile of a decode: microseconds per token by op type, and nodes per step."""
    import onnxruntime as ort

    from awq_edge import backend_ort
    from awq_edge.sampling import Sampler, SamplingSettings

    original = backend_ort.session_options
    prefix = Path(tempfile.mkdtemp(prefix="awq-profile-")) / "ort"

    def profiled(*args):
        so = original(*args)
        so.enable_profiling = True
        so.profile_file_prefix = str(prefix)
        return so
    backend_ort.session_options = profiled
    try:
        engine = load_engine(engine_dir, tokens + 64, threads, spin)
    finally:
        backend_ort.session_options = original
    ids = engine.prompt_ids(PROMPT)
    for _ in engine.stream_ids(ids, Sampler(SamplingSettings(temperature=0)), tokens, ignore_eos=True):
        pass
    path = Path(engine.backend.session.end_profiling())
    events = json.loads(path.read_text())
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    decode_runs = runs[1:]  # the first is the prefill
    start = decode_runs[0]["ts"] if decode_runs else 0
    by_op = defaultdict(float)
    nodes = defaultdict(int)
    for e in events:
        if e.get("cat") == "Node" and e.get("ts", 0) >= start and e["name"].endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            by_op[op] += e["dur"]
            nodes[op] += 1
    steps = max(len(decode_runs), 1)
    run_us = statistics.mean(r["dur"] for r in decode_runs) if decode_runs else 0
    for f in path.parent.iterdir():
        f.unlink()
    path.parent.rmdir()
    del ort
    return {"model_run_us_per_token": run_us,
            "kernel_us_per_token": {op: us / steps for op, us in sorted(by_op.items(), key=lambda x: -x[1])},
            "nodes_per_token": {op: n / steps for op, n in nodes.items()},
            "kernel_sum_us_per_token": sum(by_op.values()) / steps}


def thread_matrix(engine_dir: Path, tokens: int, threads: int, runs: int) -> dict:
    """Decode tok/s (median of runs) for 1 and `threads` threads, with ORT's spinning off and on."""
    from awq_edge.sampling import Sampler, SamplingSettings

    out = {}
    for n in sorted({1, threads}):
        for spin in (False, True):
            engine = load_engine(engine_dir, tokens + 64, n, spin)
            ids = engine.prompt_ids(PROMPT)
            speeds = []
            for _ in range(runs + 1):
                for _ in engine.stream_ids(ids, Sampler(SamplingSettings(temperature=0)), tokens, ignore_eos=True):
                    pass
                speeds.append(engine.last_stats.decode_tok_s)
            out[f"threads={n} spinning={'on' if spin else 'off'}"] = statistics.median(speeds[1:])
            del engine
    return out


def main() -> None:
    if sys.argv[1:2] == ["--time-session"]:  # the child of attention_by_context
        print(time_session(Path(sys.argv[2]), *map(int, sys.argv[3:6])))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-spin", action="store_true", help="profile with spinning off (default: on, the engine's)")
    ap.add_argument("--contexts", default="128,512,2048", help="cached lengths for the attention-vs-context table")
    args = ap.parse_args()
    from awq_edge.backend_ort import physical_cores

    threads = args.threads or physical_cores()
    bandwidth = {"1_thread_gbs": read_bandwidth(1), f"{threads}_threads_gbs": read_bandwidth(threads)}
    decode = timed_decode(args.engine, args.tokens, threads, not args.no_spin)
    engine = decode.pop("engine")
    need = bytes_per_token(engine)
    del engine
    roofline = bandwidth[f"{threads}_threads_gbs"] * 1e9 / need["total"]
    profile = op_profile(args.engine, args.tokens, threads, not args.no_spin)
    matrix = thread_matrix(args.engine, args.tokens, threads, args.runs)
    by_context = attention_by_context(args.engine, [int(c) for c in args.contexts.split(",")], threads)

    print(f"memory read bandwidth: 1 thread {bandwidth['1_thread_gbs']:.1f} GB/s, {threads} threads "
          f"{bandwidth[f'{threads}_threads_gbs']:.1f} GB/s")
    print(f"bytes per decode token: {need['total'] / 2**20:.1f} MiB ({need['nodes']} graph nodes); roofline "
          f"{roofline:.0f} tok/s")
    print(f"decode: {decode['decode_tok_s']:.1f} tok/s = {decode['decode_tok_s'] / roofline:.0%} of the roofline")
    print("per token (ms): " + ", ".join(f"{k} {v:.3f}" for k, v in decode["ms_per_token"].items()))
    print(f"ORT profile: model_run {profile['model_run_us_per_token']:.0f} us/token, kernels "
          f"{profile['kernel_sum_us_per_token']:.0f} us/token")
    for op, us in profile["kernel_us_per_token"].items():
        print(f"  {op:36} {us:8.1f} us  ({profile['nodes_per_token'][op]:.0f} nodes)")
    for k, v in matrix.items():
        print(f"  {k:28} {v:6.1f} tok/s")
    print("session ms per decode step by cached tokens: engine / no attention / weights only / attention")
    for past, row in by_context.items():
        print(f"  {past:6d}  {row['engine']:.3f} / {row['no_attention']:.3f} / {row['weights_only']:.3f} / "
              f"{row['attention']:.3f}")
    result = {"command": "python benchmarks/cpu_profile.py " + " ".join(sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.platform(),
              "cpu": next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                           if ln.startswith("model name")), "?"), "logical_cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "engine": str(args.engine), "threads": threads,
              "spin": not args.no_spin,
              "bandwidth": bandwidth, "bytes_per_token": need, "roofline_tok_s": roofline,
              "decode": decode, "roofline_fraction": decode["decode_tok_s"] / roofline,
              "ort_profile": profile, "threads_and_spinning": matrix,
              "session_ms_by_context": by_context}
    path = HERE / "results" / f"cpu_profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
