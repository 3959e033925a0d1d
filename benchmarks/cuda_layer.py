#!/usr/bin/env python3
"""One decoder layer on the GPU against its roofline: every kernel of a layer back to back in
one CUDA graph, the way a decode step runs them.

    python3 benchmarks/cuda_layer.py [--shape llama2-7b] [--context 512] [--cache N] [--output FILE.json]

The engine is a random-weight int4 g128 engine of the shape (awq_edge/synthetic.py) with a
small vocabulary and enough layers that their weights are >= 4x the L2 cache, so each layer
reads its weights from DRAM, as in a real step. After a prefill of --context tokens, a graph
holds --repeats passes over the layers' ops of a one-token step (decode_ops(spec) without the
embedding, the final norm and the lm_head; the position counter does not advance, so each
pass attends over the same --context cached rows). The KV cache holds --cache tokens (default
--context + 1): a chat engine's is its whole context, and decode attention's grid has a block
per 128 of them, most of them past the position early in a chat. The fused op list (the default: norms in the
linears' prologue, activation and residual adds in their epilogues) and the unfused one (a
kernel per op) are timed in the same run, alternating, and the fused list without overlapped
launches (plugins/kernels/pdl.cuh, sm_90 only) with and without the GEMVs' L2 prefetch of the
next linear's weights (what sm_87/sm_89 run instead), and the fused list with every linear on
the CUDA-core GEMV, on the tensor-core one, and on that on a persistent grid
(cuda_backend.GEMV_KINDS; the default, "auto", takes the persistent tensor-core one for the
linears with a norm prologue and the CUDA-core one for the rest); and the layers in one launch
(decode choice "persistent_step", plugins/kernels/decode_step.cu), and, where a linear's K lets its
GEMV tasks run several 4-row blocks at once, the same one at a time. Time per layer = replay time /
(repeats x layers), host-timed over whole replays after a synchronize, median of 5.

Roofline of a layer = (its weight bytes + the K and V rows its attention reads) / the bandwidth
of a device-to-device copy measured in the same run (read + write bytes / time). Activations
(a few KiB) are left out.

Then where a layer's time goes, op by op (fused, overlapped launches on sm_90; each GEMV):
for each op of a layer's fused list (the same kinds in the same order in every layer; labelled
by kind, and the weight name without model.layers.N., e.g. "linear self_attn.qkv_proj",
"attention"), a graph of only that op of every layer, --repeats times (launch_ops on that list:
each linear prefetches the next layer's same linear), timed as above. Its bytes: the layer's
tensors its args name (a linear's qweight, scales, zeros, bias and prologue norm's weight), and
attention's K and V rows (they add up to the layer's bytes); % of copy = bytes / (time x copy
bandwidth). The ops' times add up to more or less than the whole layer's: the difference is what
running them together costs or saves (overlap, serialization). An op timed alone may find its
data in L2 when its bytes over all the layers fit there (attention's K and V at small contexts,
a small linear over few layers), so it runs faster than in a layer, where the other ops' weights
evict it: the table marks such rows "(L2)" (bytes x layers < L2).

JSON: gpu, shape, context, cache, layers, launches_per_layer, us_per_layer, bytes_per_layer,
roofline_us, roofline_fraction, copy_gbs (the backend's default: fused, overlapped launches on
sm_90), under "variants" each variant's us_per_layer, launches_per_layer and roofline_fraction,
under "breakdown" per decode GEMV (cuda_cores, tensor_cores, tensor_cores_persistent) each op's
{op (its label), us_per_layer, bytes (per layer), pct_of_copy}, and breakdown_sum_us per GEMV (the
ops' us_per_layer summed). Needs an NVIDIA GPU and nvcc (the
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


ONE_ROW_BLOCK = "fused, layers in one launch, a row block at a time"


def layer_ops(ops: list) -> list:
    """The ops of the layers in a step's op list: all but the embedding, the final norm and the head."""
    assert ops[0].kind == "embed" and ops[-1].kind == "lm_head" and ops[-2].args.get("last_row")
    return ops[1:-2]


def layer_bytes(info, context: int) -> int:
    """Bytes one layer reads in a decode step at `context` cached tokens: its weights (every
    tensor of model.layers.*, over the layers) and the K and V rows attention reads."""
    weights = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for name, (dtype, shape, _) in info.tensors.items()
                  if name.startswith("model.layers."))
    return weights // info.spec.layers + kv_bytes_read(info.spec, context)


def kv_bytes_read(spec, context: int) -> int:
    """The K and V rows (fp16) one layer's attention reads for a token at `context` cached tokens."""
    return 2 * spec.kv_heads * (context + 1) * spec.head_dim * 2


def op_bytes(info, op, context: int) -> int:
    """Bytes one op of a layer reads in a decode step: the layer's tensors its args name (a
    linear's {weight}.qweight, .scales, .zeros, .bias, its norm), and for attention the K and V rows."""
    names = [v for v in op.args.values() if str(v).startswith("model.layers.")]  # not buffers, not "rope"
    weights = sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for name, (dtype, shape, _) in info.tensors.items()
                  if any(name == v or name.startswith(v + ".") for v in names))
    return weights + (kv_bytes_read(info.spec, context) if op.kind == "attention" else 0)


def op_groups(ops: list, layers: int) -> list[tuple[str, list]]:
    """(label, that op of every layer) for each op position within a layer of `ops` (layer_ops'):
    its kind, and for an op with a layer's weight that name without model.layers.N."""
    def label(op) -> str:
        weight = op.args.get("weight")
        return f"{op.kind} {weight.split('.', 3)[3]}" if str(weight).startswith("model.layers.") else op.kind

    per_layer = len(ops) // layers
    assert per_layer * layers == len(ops), (len(ops), layers)
    groups = [ops[i::per_layer] for i in range(per_layer)]
    for group in groups:
        assert len({label(op) for op in group}) == 1, [label(op) for op in group]
    return [(label(group[0]), group) for group in groups]


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


def time_layers(backend, ops: list, repeats: int, step: bool = False) -> tuple[float, int]:
    """(seconds, kernel launches) per pass over `ops` (one token), captured `repeats` times in one
    graph; step: a pass is one launch of the persistent step over `ops` instead."""
    before = backend.drv.launch_count
    if step:
        backend._prepare_step(ops)  # (its table: an upload, before the capture)
    launch = backend.launch_step if step else lambda: backend.launch_ops(ops, 1)
    graph = backend.drv.capture(lambda: [launch() for _ in range(repeats)])
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
    parser.add_argument("--cache", type=int, default=None, help="KV cache tokens (default: --context + 1)")
    parser.add_argument("--repeats", type=int, default=None, help="passes over the layers per graph "
                        "(default: enough for about 80 layers, at least 1)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    from awq_edge.cuda_backend import GEMV_KINDS, CudaBackend, step_row_blocks_at_once
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
    cache = args.cache or args.context + 1
    if cache <= args.context:
        print(f"error: --cache {cache} leaves no room for a token after --context {args.context}; "
              "give a larger --cache", file=sys.stderr)
        return 2
    shape = dict(SHAPES[args.shape], vocab_size=512, max_position_embeddings=max(cache, 1024))
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * shape["head_dim"]
    approx_layer = (hidden * (qkv + hidden + 3 * inter)) // 2  # int4 weights, for the layer count only
    shape["num_hidden_layers"] = layers = max(2, -(-4 * l2 // approx_layer))
    repeats = args.repeats or max(1, -(-80 // layers))
    with tempfile.TemporaryDirectory(prefix="awq-edge-layer-") as tmp:
        engine = Path(tmp) / "engine"
        print(f"{gpu.name} ({gpu.arch}), L2 {l2 >> 20} MiB: a random {args.shape}-shaped engine of {layers} layers")
        write_random_engine(engine, shape, device, max_context=cache)
        manifest = read_manifest(engine)
        info = read_decoder_info(engine, check_files(engine, manifest["files"]))
        backend = CudaBackend(engine, manifest, info, max_context=cache, tuning_cache=False)  # (timed here)
        backend.forward(np.random.default_rng(0).integers(0, 256, args.context))
        ceiling = copy_gbs(backend.drv)
        # (fused op list, overlapped launches, L2 prefetch bytes, decode GEMV): the backend's default first
        default = (True, backend.programmatic, backend.prefetch_bytes, backend.decode_gemv)
        prefetch = backend.drv.l2_cache_bytes() // 2
        variants = {"fused": default, "unfused": (False, *default[1:])}
        for gemv in GEMV_KINDS:  # every linear on one GEMV
            variants[f"fused, GEMV on {gemv.replace('_', ' ')}"] = (*default[:3], gemv)
        variants["fused, layers in one launch"] = (*default[:3], "persistent_step")
        if any(step_row_blocks_at_once(op.args["K"]) > 1 for op in decode_ops(info.spec) if op.kind == "linear"):
            # (its GEMV tasks one 4-row block at a time, where K allows several: decode_step.cu step_gemv_rows)
            variants[ONE_ROW_BLOCK] = (*default[:3], "persistent_step")
        if backend.programmatic:  # what sm_87/sm_89 run, and the same without the prefetch
            variants["fused, not overlapped, L2 prefetch"] = (True, False, prefetch, default[3])
        variants["fused, not overlapped, no prefetch"] = (True, False, 0, default[3])
        timed = {name: [] for name in variants}
        for _ in range(3):  # the variants alternating: the median of each
            for name, (fused, programmatic, prefetch_bytes, gemv) in variants.items():
                backend.programmatic, backend.prefetch_bytes = programmatic, prefetch_bytes
                backend.set_decode_gemv(gemv)
                backend.step_rows_at_once = 1 if name == ONE_ROW_BLOCK else None
                timed[name].append(time_layers(backend, layer_ops(decode_ops(info.spec, fused=fused)), repeats,
                                               step=gemv == "persistent_step"))
        breakdown = {}  # per decode GEMV kind, with the default launches
        for gemv in GEMV_KINDS:
            backend.programmatic, backend.prefetch_bytes = default[1:3]
            backend.set_decode_gemv(gemv)
            breakdown[gemv] = [(label, op_bytes(info, group[0], args.context), time_layers(backend, group, repeats)[0])
                               for label, group in op_groups(layer_ops(decode_ops(info.spec, fused=True)), layers)]
    nbytes = layer_bytes(info, args.context)
    roofline = nbytes / (ceiling * 1e9)
    results = {name: {"us_per_layer": float(np.median([t for t, _ in runs])) / layers * 1e6,
                      "launches_per_layer": runs[0][1] / layers} for name, runs in timed.items()}
    for r in results.values():
        r["roofline_fraction"] = roofline * 1e6 / r["us_per_layer"]
    ops = {gemv: [{"op": label, "us_per_layer": t / layers * 1e6, "bytes": b,
                   "pct_of_copy": 100 * b / (t / layers * ceiling * 1e9)} for label, b, t in rows]
           for gemv, rows in breakdown.items()}
    row = {"gpu": gpu.name, "arch": gpu.arch, "shape": args.shape, "context": args.context, "cache": cache,
           "layers": layers,
           **results["fused"], "bytes_per_layer": nbytes, "roofline_us": roofline * 1e6, "copy_gbs": ceiling,
           "variants": results, "gemv_tuning": backend.gemv_tuning,
           "breakdown": ops, "breakdown_sum_us": {gemv: sum(r["us_per_layer"] for r in rows) for gemv, rows in ops.items()},
           "date": dt.datetime.now().isoformat(timespec="seconds"),
           "timing": f"{repeats} passes over the {layers} layers in one graph, host clock, median of {REPLAYS}"}
    print(f"{args.shape} layer at context {args.context} (cache {cache}): {row['us_per_layer']:.1f} us, "
          f"{row['launches_per_layer']:.0f} launches, {nbytes / 1e6:.1f} MB -> roofline {row['roofline_us']:.1f} us "
          f"at {ceiling:.0f} GB/s copy: {100 * row['roofline_fraction']:.0f}% of roofline")
    if backend.gemv_tuning and "seconds" in backend.gemv_tuning:  # (None with AWQ_EDGE_TUNE=0; no time on an error)
        print(f"  fused's GEMVs (auto, timed at load in {backend.gemv_tuning['seconds']:.2f} s): "
              + ", ".join(f"{role} {kind}" for role, kind in backend.gemv_tuning["gemv"].items()))
        us, why = backend.gemv_tuning.get("persistent_step_us"), backend.gemv_tuning.get("persistent_step_error")
        if us or why:  # (the timing at load's last word: the whole step per op against the persistent step)
            print(f"  the persistent step at load: {'taken' if backend.gemv_tuning['persistent_step'] else 'not taken'}"
                  + (f" ({us['persistent']:.1f} us a step, per op {us['per_op']:.1f} us)" if us else f": {why}"))
    for name, r in results.items():
        print(f"  {name:>32}: {r['us_per_layer']:6.1f} us, {r['launches_per_layer']:.2g} launches, "
              f"{100 * r['roofline_fraction']:.0f}% of roofline")
    for gemv, rows in ops.items():
        print(f"  each op alone over the {layers} layers, GEMV on {gemv.replace('_', ' ')}: "
              f"{row['breakdown_sum_us'][gemv]:.1f} us in all ({row['breakdown_sum_us'][gemv] - row['us_per_layer']:+.1f} "
              "us against the default layer)")
        print(f"  {'op':>32}  us/layer  share      MB  % of copy")
        for r in rows:
            print(f"  {r['op']:>32}  {r['us_per_layer']:8.1f}  {100 * r['us_per_layer'] / row['us_per_layer']:4.0f}%  "
                  f"{r['bytes'] / 1e6:6.1f}  {r['pct_of_copy']:8.0f}%{' (L2)' if r['bytes'] * layers < l2 else ''}")
    out = args.output or ROOT / "benchmarks" / "results" / f"cuda_layer-{gpu.arch}-{dt.date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
