#!/usr/bin/env python3
"""One decoder layer on the GPU against its roofline: every kernel of a layer back to back in
one CUDA graph, the way a decode step runs them.

    python3 benchmarks/cuda_layer.py [--shape llama2-7b] [--context 512] [--output FILE.json]

The engine is a random-weight int4 g128 engine of the shape (awq_edge/synthetic.py) with a
small vocabulary and enough layers that their weights are >= 4x the L2 cache, so each layer
reads its weights from DRAM, as in a real step. After a prefill of --context tokens, a graph
holds --repeats passes over the layers' ops of a one-token step (decode_ops(spec) without the
embedding, the final norm and the lm_head; the position counter does not advance, so each
pass attends over the same --context cached rows). The fused op list (the default: norms in the
linears' prologue, activation and residual adds in their epilogues) and the unfused one (a
kernel per op) are timed in the same run, alternating, and the fused list without overlapped
launches (plugins/kernels/pdl.cuh, sm_90 only) with and without the GEMVs' L2 prefetch of the
next linear's weights (what sm_87/sm_89 run instead). Time per layer = replay time /
(repeats x layers), host-timed over whole replays after a synchronize, median of 5.

Roofline of a layer = (its weight bytes + the K and V rows its attention reads) / the bandwidth
of a device-to-device copy measured in the same run (read + write bytes / time). Activations
(a few KiB) are left out. JSON: gpu, shape, context, layers, launches_per_layer, us_per_layer,
bytes_per_layer, roofline_us, roofline_fraction, copy_gbs (the backend's default: fused, overlapped
launches on sm_90), and under "variants" each variant's us_per_layer, launches_per_layer and
roofline_fraction. Needs an NVIDIA GPU and nvcc (the
engine's kernels are compiled here); no torch. Without a GPU it prints one line and exits 2.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: an installed (or gpu_check.sh's linked) awq_edge wins

REPLAYS = 5


def layer_ops(ops: list) -> list:
    """The ops of the layers in a step's op list: all but the embedding, the final norm and the head."""
    assert ops[0].kind == "embed" and ops[-1].kind == "lm_head" and ops[-2].args.get("last_row")
    return ops[1:-2]


def layer_bytes(info, context: int) -> int:
    """Bytes one layer reads in a decode step at `context` cached tokens: its weights (every
    tensor of model.layers.*, over the layers) and the K and V rows attention reads."""
    spec = info.spec
    weights = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for name, (dtype, shape, _) in info.tensors.items()
                  if name.startswith("model.layers."))
    kv = 2 * spec.kv_heads * (context + 1) * spec.head_dim * 2
    return weights // spec.layers + kv


def copy_gbs(drv, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, read + write, median of 5 timed batches of 10."""
    src, dst = drv.alloc(nbytes), drv.alloc(nbytes)
    try:
        drv.copy(dst, src, nbytes)
        drv.synchronize()
        times = []
        for _ in range(REPLAYS):
            t0 = time.perf_counter()
            for _ in range(10):
                drv.copy(dst, src, nbytes)
            drv.synchronize()
            times.append((time.perf_counter() - t0) / 10)
    finally:
        drv.free(src)
        drv.free(dst)
    return 2 * nbytes / float(np.median(times)) / 1e9


def time_layers(backend, ops: list, repeats: int) -> tuple[float, int]:
    """(seconds, kernel launches) per pass over `ops` (one token), captured `repeats` times in one graph."""
    before = backend.drv.launch_count
    graph = backend.drv.capture(lambda: [backend.launch_ops(ops, 1) for _ in range(repeats)])
    launches = (backend.drv.launch_count - before) // repeats
    backend.drv.replay(graph)  # warm-up
    backend.drv.synchronize()
    times = []
    for _ in range(REPLAYS):
        t0 = time.perf_counter()
        backend.drv.replay(graph)
        backend.drv.synchronize()
        times.append((time.perf_counter() - t0) / repeats)
    return float(np.median(times)), launches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama2-7b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=None, help="passes over the layers per graph "
                        "(default: enough for about 80 layers, at least 1)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from awq_edge.cuda_backend import CudaBackend
    from awq_edge.decoder import decode_ops
    from awq_edge.cuda_runtime import CudaRuntime, find_gpus
    from awq_edge.devices import profile_for_arch
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest
    from awq_edge.synthetic import SHAPES, write_random_engine

    gpus = find_gpus()
    if not gpus:
        print("error: no NVIDIA GPU found; benchmarks/cuda_layer.py times the cuda backend's kernels and needs one",
              file=sys.stderr)
        return 2
    gpu = gpus[0]
    device = profile_for_arch(gpu.arch)
    if device is None:
        print(f"error: no device profile has the arch {gpu.arch}; add one under devices/", file=sys.stderr)
        return 2
    l2 = CudaRuntime().l2_cache_bytes()
    shape = dict(SHAPES[args.shape], vocab_size=512, max_position_embeddings=max(args.context + 1, 1024))
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * shape["head_dim"]
    approx_layer = (hidden * (qkv + hidden + 3 * inter)) // 2  # int4 weights, for the layer count only
    shape["num_hidden_layers"] = layers = max(2, -(-4 * l2 // approx_layer))
    repeats = args.repeats or max(1, -(-80 // layers))
    with tempfile.TemporaryDirectory(prefix="awq-edge-layer-") as tmp:
        engine = Path(tmp) / "engine"
        print(f"{gpu.name} ({gpu.arch}), L2 {l2 >> 20} MiB: a random {args.shape}-shaped engine of {layers} layers")
        write_random_engine(engine, shape, device, max_context=args.context + 1)
        manifest = read_manifest(engine)
        info = read_decoder_info(engine, check_files(engine, manifest["files"]))
        backend = CudaBackend(engine, manifest, info, max_context=args.context + 1)
        backend.forward(np.random.default_rng(0).integers(0, 256, args.context))
        ceiling = copy_gbs(backend.drv)
        # (fused op list, overlapped launches, L2 prefetch bytes): the backend's default first
        default = (True, backend.programmatic, backend.prefetch_bytes)
        prefetch = backend.drv.l2_cache_bytes() // 2
        variants = {"fused": default, "unfused": (False, *default[1:])}
        if backend.programmatic:  # what sm_87/sm_89 run, and the same without the prefetch
            variants["fused, not overlapped, L2 prefetch"] = (True, False, prefetch)
        variants["fused, not overlapped, no prefetch"] = (True, False, 0)
        timed = {name: [] for name in variants}
        for _ in range(3):  # the variants alternating: the median of each
            for name, (fused, programmatic, prefetch_bytes) in variants.items():
                backend.programmatic, backend.prefetch_bytes = programmatic, prefetch_bytes
                timed[name].append(time_layers(backend, layer_ops(decode_ops(info.spec, fused=fused)), repeats))
    nbytes = layer_bytes(info, args.context)
    roofline = nbytes / (ceiling * 1e9)
    results = {name: {"us_per_layer": float(np.median([t for t, _ in runs])) / layers * 1e6,
                      "launches_per_layer": runs[0][1] / layers} for name, runs in timed.items()}
    for r in results.values():
        r["roofline_fraction"] = roofline * 1e6 / r["us_per_layer"]
    row = {"gpu": gpu.name, "arch": gpu.arch, "shape": args.shape, "context": args.context, "layers": layers,
           **results["fused"], "bytes_per_layer": nbytes, "roofline_us": roofline * 1e6, "copy_gbs": ceiling,
           "variants": results,
           "date": dt.datetime.now().isoformat(timespec="seconds"),
           "timing": f"{repeats} passes over the {layers} layers in one graph, host clock, median of {REPLAYS}"}
    print(f"{args.shape} layer at context {args.context}: {row['us_per_layer']:.1f} us, "
          f"{row['launches_per_layer']:.0f} launches, {nbytes / 1e6:.1f} MB -> roofline {row['roofline_us']:.1f} us "
          f"at {ceiling:.0f} GB/s copy: {100 * row['roofline_fraction']:.0f}% of roofline")
    for name, r in results.items():
        print(f"  {name:>32}: {r['us_per_layer']:6.1f} us, {r['launches_per_layer']:.0f} launches, "
              f"{100 * r['roofline_fraction']:.0f}% of roofline")
    out = args.output or ROOT / "benchmarks" / "results" / f"cuda_layer-{gpu.arch}-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
