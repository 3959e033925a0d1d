"""Where the native CPU decode step's time goes, op by op, against the roofline of its bytes.

    python benchmarks/cpu_native_profile.py ENGINE [--positions 16,192,1024] [--threads 2] [--rounds 5]

The engine is loaded with native decode (awq_edge/cpu_native.py), a prompt of P tokens is
prefilled by ONNX Runtime, then decode_step runs the token at position P with its per-op clock
on (thread 0's wall time between the barriers that end every op: the real sequence, caches as
in a real token). Times are summed by kind (linears, attention, lm_head, norms, act, embed) and
the lm_head is split into its GEMV and its top-k selection + exact re-scoring (a second program
with top_k = 0, alternating). Medians over `--rounds`, `--steps` steps each.

The roofline: the bytes a step must read (the 4-bit weights, lm_head included, the re-scored
rows, and rows 0..P of the bf16 KV copy the step reads) over this machine's read bandwidth,
measured in the same run (cpu_profile.read_bandwidth); `roofline_fraction` = roofline time /
the whole step's time.
Prints a table and writes results/cpu_native_profile-<time>.json.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

KIND_GROUPS = {"linear": "linears", "attention": "attention", "lm_head": "lm_head", "norm": "norms",
               "add_norm": "norms", "head_norm": "norms", "act": "act", "embed": "embed"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--positions", default="16,192,1024")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per round")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    from awq_edge.backend_ort import physical_cores
    from awq_edge.cpu_native import OP_KINDS
    from awq_edge.engine import Engine
    from cpu_profile import bytes_per_token, read_bandwidth

    threads = args.threads or physical_cores()
    positions = [int(p) for p in args.positions.split(",")]
    engine = Engine.load(args.engine, threads=threads, native_decode=True, max_context=max(positions) + 1)
    native = engine.backend.native
    if native is None:
        raise SystemExit(f"no native decode for this engine: {engine.backend.decode_path}")
    kind_names = {v: k for k, v in OP_KINDS.items()}
    groups = [KIND_GROUPS[kind_names[op.kind]] for op in native.ops]
    top_k = native.model.top_k
    bandwidth = read_bandwidth(threads)
    weights = bytes_per_token(engine)
    spec = native.spec
    kv_row = spec.layers * 2 * spec.kv_heads * spec.head_dim * 2  # K and V of every layer: the bf16 copy it reads
    result = {"command": "python " + " ".join(["benchmarks/cpu_native_profile.py", *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": str(args.engine), "threads": threads,
              "decode_path": engine.backend.decode_path, "load_average": os.getloadavg(),
              "read_bandwidth_gbs": bandwidth, "bytes_per_token": weights, "kv_bytes_per_cached_token": kv_row,
              "ms_per_step": {}, "roofline": {}}
    print(f"read bandwidth {bandwidth:.1f} GB/s ({threads} threads); weights {weights['total'] / 2**20:.1f} MiB "
          f"per token, KV {kv_row / 1024:.1f} KiB per cached token")

    def timed(position: int, k: int) -> dict:
        """ms per step by group (and "step": the whole call) over args.steps steps."""
        native.model.top_k = k
        op_seconds = np.zeros(len(native.ops), np.float64)
        for _ in range(3):
            native.lib.decode_step(ctypes.byref(native.model), native.program, len(native.ops), 42, position, None)
        start = time.perf_counter()
        for _ in range(args.steps):
            native.lib.decode_step(ctypes.byref(native.model), native.program, len(native.ops), 42, position,
                                   op_seconds.ctypes.data)
        out = {"step": (time.perf_counter() - start) / args.steps * 1e3}
        for group, seconds in zip(groups, op_seconds):
            out[group] = out.get(group, 0.0) + seconds / args.steps * 1e3
        return out

    for position in positions:
        engine.backend.rewind(0)
        engine.backend.forward(list(range(1, position + 1)))  # prefill by ONNX Runtime, cache rows 0..P-1
        rounds = []
        for _ in range(args.rounds):
            full, no_top_k = timed(position, top_k), timed(position, 0)
            full["lm_head top-k + re-scoring"] = full["lm_head"] - no_top_k["lm_head"]
            rounds.append(full)
        native.model.top_k = top_k
        medians = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
        need = weights["total"] + kv_row * (position + 1)
        roofline_ms = need / (bandwidth * 1e9) * 1e3
        result["ms_per_step"][position] = {"median": medians, "rounds": rounds}
        result["roofline"][position] = {"bytes": need, "ms": roofline_ms, "fraction": roofline_ms / medians["step"]}
        print(f"position {position}: step {medians['step']:.3f} ms (" +
              ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items() if name != "step") +
              f"); roofline {roofline_ms:.3f} ms = {roofline_ms / medians['step']:.0%} of the step")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu_native_profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
