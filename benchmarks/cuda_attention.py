#!/usr/bin/env python3
"""Prefill attention on the GPU: a block per (head, token), per (head, 16 tokens), on tensor cores.

    python3 benchmarks/cuda_attention.py [--output FILE.json]

One 256-row prefill chunk after 0, 1024 and 3840 cached rows, for three head layouts (SmolLM2's
9/3 x 64, Llama-3-8B's 32/8 x 128, Gemma's 8/4 x 256), each kernel on the same random q and
cache: awq_attend_d{D} (the block per token: every token reads every visible K/V row),
awq_attend_block_d{D} (16 tokens share each K/V tile, CUDA cores: the backend's kernel at D = 256
until 2026-12-04's run 3) and awq_attend_mma_d{D} (64 tokens a block on tensor cores, 32-key
tiles at D = 256: the backend's choice for chunks of 16 rows or more), alternating; host-timed over 20 launches
after a synchronize, median of 5. The outputs are compared too (they must agree to fp16
rounding). JSON rows: heads, kv_heads, head_dim, past, rows, per_token_us, block_us, mma_us,
speedup (per token / block), mma_speedup. Needs an NVIDIA GPU and nvcc
(the kernels are compiled here); no torch. Without a GPU it prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: an installed (or gpu_check.sh's linked) awq_edge wins

LAYOUTS = [(9, 3, 64), (32, 8, 128), (8, 4, 256)]   # (heads, kv_heads, head_dim)
DEPTHS, ROWS = (0, 1024, 3840), 256


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from awq_edge import plugins
    from awq_edge.cuda_backend import ATTEND_BLOCK_QUERIES, ATTEND_MMA_QUERIES, ATTEND_THREADS
    from awq_edge.cuda_driver import Driver, f32, i32, ptr
    from awq_edge.cuda_runtime import benchmark_gpu, seconds_per_call

    gpu = benchmark_gpu("benchmarks/cuda_attention.py")
    if gpu is None:
        return 2
    drv = Driver(gpu.index)
    module = drv.load_module(plugins.build_cubins(gpu.arch)["attention"].read_bytes())
    rng, rows_out = np.random.default_rng(0), []
    for H, Hkv, D in LAYOUTS:
        per_token, block = drv.function(module, f"awq_attend_d{D}"), drv.function(module, f"awq_attend_block_d{D}")
        mma = drv.function(module, f"awq_attend_mma_d{D}")
        for past in DEPTHS:
            capacity = past + ROWS
            host = {"q": rng.standard_normal((ROWS, H, D)), "k": rng.standard_normal((Hkv, capacity, D)),
                    "v": rng.standard_normal((Hkv, capacity, D))}
            dev = {name: drv.alloc(a.size * 2) for name, a in host.items()}
            for name, a in host.items():
                drv.upload(dev[name], a.astype(np.float16))
            dev["past"] = drv.alloc(8)
            for out in ("out_a", "out_b", "out_c"):
                dev[out] = drv.alloc(ROWS * H * D * 2)
            drv.upload(dev["past"], np.array([past], np.int64))

            def arguments(out):
                return [ptr(dev["q"]), ptr(dev["k"]), ptr(dev["v"]), ptr(dev["past"]), ptr(dev[out]), i32(ROWS), i32(H),
                        i32(Hkv), i32(capacity), i32(capacity), i32(0), f32(D ** -0.5), f32(0.0), ptr(0)]  # (no sinks)
            runs = {"per_token": lambda: drv.launch(per_token, (H, ROWS), (ATTEND_THREADS,), arguments("out_a")),
                    "block": lambda: drv.launch(block, (H, -(-ROWS // ATTEND_BLOCK_QUERIES)), (ATTEND_THREADS,),
                                                arguments("out_b")),
                    "mma": lambda: drv.launch(mma, (H, -(-ROWS // ATTEND_MMA_QUERIES)), (ATTEND_THREADS,),
                                              arguments("out_c"))}
            outputs = {}
            for (name, run), out in zip(runs.items(), ("out_a", "out_b", "out_c")):
                run()
                outputs[name] = np.empty(ROWS * H * D, np.float16)
                drv.download(outputs[name], dev[out])
            diff = max(float(np.abs(a.astype(np.float32) - outputs["per_token"].astype(np.float32)).max())
                       for a in outputs.values())
            timed = {name: [] for name in runs}
            for _ in range(2):  # alternating
                for name, run in runs.items():
                    timed[name].append(seconds_per_call(drv, run))
            for pointer in dev.values():
                drv.free(pointer)
            row = {"heads": H, "kv_heads": Hkv, "head_dim": D, "past": past, "rows": ROWS, "max_abs_diff": diff,
                   **{f"{name}_us": min(t) * 1e6 for name, t in timed.items()}}
            row["speedup"] = row["per_token_us"] / row["block_us"]
            row["mma_speedup"] = row["per_token_us"] / row["mma_us"]
            rows_out.append(row)
            mma_col = f", tensor cores {row['mma_us']:.0f} us ({row['mma_speedup']:.2f}x)"
            print(f"H {H}/{Hkv} D {D}, {ROWS} rows after {past}: per token {row['per_token_us']:.0f} us, "
                  f"16-token blocks {row['block_us']:.0f} us ({row['speedup']:.2f}x){mma_col}, outputs differ by "
                  f"{diff:.1e}", flush=True)
    out = args.output or ROOT / "benchmarks" / "results" / f"cuda_attention-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cuda_attention", "date": dt.datetime.now().isoformat(timespec="seconds"),
                               "gpu": gpu.name, "rows": rows_out}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["max_abs_diff"] < 2e-2 for r in rows_out) else 1


if __name__ == "__main__":
    sys.exit(main())
