#!/usr/bin/env python3
"""The lm_head of a decode step on the GPU: int8 rows (the cuda engine's default), int4 with its
top 64 re-scored, fp16.

    python3 benchmarks/cuda_head.py [--output FILE.json]

For three head shapes (SmolLM2's 49152 x 576, Qwen2.5-1.5B's 151936 x 1536, Llama-3.2-1B's
128256 x 2048: the models whose head is a large share of a token's reads), a one-layer random engine per head kind (awq_edge.synthetic, tied embeddings),
and the cuda backend's own launches of its lm_head op (CudaBackend.launch_op), captured in one
CUDA graph over enough copies of the head's tensors (>= 4x the L2) that each replay reads them
from DRAM, as a decode step does: microseconds per head, its bytes, GB/s, and for int4 the share
of the re-scoring (its two selection launches alone, graph-timed the same way). The int4 head's
argmax is checked against the fp16 head's on the same x (the tables are the same embedding).
This decides whether int4 becomes the cuda engine's default head (docs/cuda.md): the bytes it
saves against the re-scoring's fixed cost. Needs an NVIDIA GPU and nvcc; no torch. Without a GPU
it prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: an installed (or gpu_check.sh's linked) awq_edge wins

HEADS = [("smollm2-135m", 49152, 576), ("qwen2.5-1.5b", 151936, 1536), ("llama3.2-1b", 128256, 2048)]
KINDS = ("int8", "int4", "fp16")


def head_tensors(op) -> list[str]:
    """The engine tensors a head reads whole each step (an int4 head's fp16 table: 64 rows only)."""
    a = op.args
    if a["bits"] == 4:
        return [f"{a['weight']}.{part}" for part in ("qweight", "scales", "zeros")]
    return [a["table"]] + ([a["scales"]] if a["bits"] == 8 else [])


def tensor_bytes(info, name: str) -> int:
    dtype, shape, _offset = info.tensors[name]
    return np.dtype(dtype).itemsize * int(np.prod(shape))


def rotating_graph(backend, info, names: list[str], launch, copies: int):
    """One CUDA graph of `launch()` once per copy of the tensors `names`, each copy in its own
    device memory (copy 0 is the engine's); returns (graph, the copies' allocations)."""
    drv, weights = backend.drv, backend.weights
    sets, extra = [{name: weights[name] for name in names}], []
    for _ in range(copies - 1):
        copy = {}
        for name in names:
            copy[name] = drv.alloc(tensor_bytes(info, name))
            drv.copy(copy[name], weights[name], tensor_bytes(info, name))
            extra.append(copy[name])
        sets.append(copy)
    original = dict(weights)

    def all_copies():
        for pointers in sets:
            weights.update(pointers)
            launch()
        weights.update(original)

    return drv.capture(all_copies), extra


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.cuda_runtime import benchmark_gpu, seconds_per_call
    from awq_edge.devices import profile_for_arch
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest
    from awq_edge.synthetic import SHAPES, write_random_engine

    gpu = benchmark_gpu("benchmarks/cuda_head.py")
    if gpu is None:
        return 2
    device = profile_for_arch(gpu.arch)
    if device is None:
        print(f"error: no device profile has the arch {gpu.arch}; add one under devices/", file=sys.stderr)
        return 2
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="awq-edge-head-") as tmp:
        for shape_name, vocab, hidden in HEADS:
            shape = dict(SHAPES["smollm2-135m"], hidden_size=hidden, intermediate_size=2 * hidden,
                         num_attention_heads=hidden // 64, num_key_value_heads=1, head_dim=64, vocab_size=vocab,
                         num_hidden_layers=1, tie_word_embeddings=True)
            x = (np.random.default_rng(hidden).standard_normal(hidden) * 2).astype(np.float16)
            row, argmax = {"shape": shape_name, "vocab": vocab, "hidden": hidden}, {}
            for kind in KINDS:
                engine = Path(tmp) / f"{shape_name}-{kind}"
                write_random_engine(engine, shape, device, max_context=16, lm_head=kind)
                manifest = read_manifest(engine)
                info = read_decoder_info(engine, check_files(engine, manifest["files"]))
                backend = CudaBackend(engine, manifest, info, 16, cublas=False, tune=False)  # (auto's default GEMV)
                op = next(op for op in backend.ops if op.kind == "lm_head")
                names = head_tensors(op)
                nbytes = sum(tensor_bytes(info, name) for name in names)
                copies = max(1, min(64, -(-4 * backend.drv.l2_cache_bytes() // nbytes)))
                backend.drv.upload(backend.buf["x"], x)
                graph, extra = rotating_graph(backend, info, names, lambda: backend.launch_op(op, 1), copies)
                row[f"{kind}_us"] = seconds_per_call(backend.drv, lambda: backend.drv.replay(graph)) / copies * 1e6
                row[f"{kind}_bytes"] = nbytes
                row[f"{kind}_gbs"] = nbytes / row[f"{kind}_us"] / 1e3
                if kind == "int4":  # the re-scoring alone (its reads are the logits and 64 table rows)
                    rescore = backend.drv.capture(lambda: backend.rescore_top_k(op.args))
                    row["int4_rescore_us"] = seconds_per_call(backend.drv, lambda: backend.drv.replay(rescore)) * 1e6
                backend.drv.replay(graph)
                logits = np.empty(vocab, np.float32)
                backend.drv.synchronize()
                backend.drv.download(logits, backend.buf["logits"])
                argmax[kind] = int(logits.argmax())
                for pointer in extra:
                    backend.drv.free(pointer)
            row["int4_over_int8"] = row["int4_us"] / row["int8_us"]
            row["int4_argmax_is_fp16s"] = argmax["int4"] == argmax["fp16"]
            if not row["int4_argmax_is_fp16s"]:
                failures.append(shape_name)
            rows.append(row)
            print(f"{shape_name} head {vocab} x {hidden}: " + ", ".join(
                f"{kind} {row[f'{kind}_us']:.1f} us ({row[f'{kind}_gbs']:.0f} GB/s)" for kind in KINDS) +
                f"; int4 / int8 {row['int4_over_int8']:.2f}x, of which re-scoring {row['int4_rescore_us']:.1f} us; "
                f"int4 argmax {'=' if row['int4_argmax_is_fp16s'] else '!='} fp16's", flush=True)
    out = args.output or ROOT / "benchmarks" / "results" / f"cuda_head-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cuda_head", "date": dt.datetime.now().isoformat(timespec="seconds"),
                               "gpu": gpu.name, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
