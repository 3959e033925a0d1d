"""Where the native CPU decode step's time goes: the step timed whole and with one kind of op left out.

    python benchmarks/cpu_native_profile.py ENGINE [--positions 16,192,1024] [--threads 2] [--rounds 5]

The engine is loaded with native decode (awq_edge/cpu_native.py), a prompt of P tokens is
prefilled by ONNX Runtime, then decode_step runs the token at position P: all ops, and each
variant with the ops of one kind made no-ops (attention, lm_head, norms, act), the lm_head's
top-k selection and re-scoring left out, and the linears alone. A variant's saving is what that
kind of op costs, to this machine's noise (the variants alternate, `--rounds` times; medians).
Outputs of a variant are garbage (later ops read stale buffers) but its work is the same.

The roofline: the bytes a step must read (the 4-bit weights, lm_head included, the re-scored
rows, and the KV cache rows 0..P) over this machine's read bandwidth measured in the same run
(cpu_profile.read_bandwidth); `roofline_fraction` = roofline time / the whole step's time.
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

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--positions", default="16,192,1024")
    ap.add_argument("--threads", type=int, default=None, help="default: physical cores")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="timed steps per variant and round")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    from awq_edge.backend_ort import physical_cores
    from awq_edge.cpu_native import OP_KINDS, CpuOp
    from awq_edge.engine import Engine
    from cpu_profile import bytes_per_token, read_bandwidth

    threads = args.threads or physical_cores()
    positions = [int(p) for p in args.positions.split(",")]
    engine = Engine.load(args.engine, threads=threads, native_decode=True, max_context=max(positions) + 1)
    native = engine.backend.native
    if native is None:
        raise SystemExit(f"no native decode for this engine: {engine.backend.decode_path}")
    left_out = {"all ops": (), "no attention": ("attention",), "no lm_head": ("lm_head",),
                "no top-k": ("top-k",), "no norms": ("norm", "add_norm", "head_norm"), "no act": ("act",),
                "linears only": tuple(k for k in OP_KINDS if k != "linear")}
    top_k = native.model.top_k
    bandwidth = read_bandwidth(threads)
    weights = bytes_per_token(engine)
    spec = native.spec
    kv_row = spec.layers * 2 * spec.kv_heads * spec.head_dim * 4  # float32 K and V, every layer

    def program(skip: tuple):
        ops = [CpuOp.from_buffer_copy(op) for op in native.ops]
        for op in ops:
            if op.kind in {OP_KINDS[k] for k in skip if k in OP_KINDS}:
                op.kind = 0  # decode_step's switch does nothing for it
        return (CpuOp * len(ops))(*ops)

    programs = {name: (program(skip), 0 if "top-k" in skip else top_k) for name, skip in left_out.items()}
    result = {"command": "python " + " ".join(["benchmarks/cpu_native_profile.py", *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "engine": str(args.engine), "threads": threads,
              "decode_path": engine.backend.decode_path, "load_average": os.getloadavg(),
              "read_bandwidth_gbs": bandwidth, "bytes_per_token": weights, "kv_bytes_per_cached_token": kv_row,
              "ms_per_step": {}, "roofline": {}}
    print(f"read bandwidth {bandwidth:.1f} GB/s ({threads} threads); weights {weights['total'] / 2**20:.1f} MiB "
          f"per token, KV {kv_row / 1024:.1f} KiB per cached token")
    for position in positions:
        engine.backend.rewind(0)
        engine.backend.forward(list(range(1, position + 1)))  # prefill by ONNX Runtime, cache rows 0..P-1
        times = {name: [] for name in programs}
        for _ in range(args.rounds):
            for name, (prog, k) in programs.items():
                native.model.top_k = k

                def step():
                    native.lib.decode_step(ctypes.byref(native.model), prog, len(native.ops), 42, position)
                for _ in range(3):
                    step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                times[name].append((time.perf_counter() - start) / args.steps * 1e3)
        native.model.top_k = top_k
        medians = {name: statistics.median(v) for name, v in times.items()}
        result["ms_per_step"][position] = {"median": medians, "rounds": times}
        need = weights["total"] + kv_row * (position + 1)
        roofline_ms = need / (bandwidth * 1e9) * 1e3
        result["roofline"][position] = {"bytes": need, "ms": roofline_ms, "fraction": roofline_ms / medians["all ops"]}
        print(f"position {position}: " + ", ".join(f"{name} {ms:.3f}" for name, ms in medians.items()) + " ms; "
              f"roofline {roofline_ms:.3f} ms = {roofline_ms / medians['all ops']:.0%} of the step")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu_native_profile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
