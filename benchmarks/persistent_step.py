#!/usr/bin/env python3
"""The floor of a persistent decode step against a launch per op (issue 19: for models under
about 1B, is one launch a token worth building?).

    python3 benchmarks/persistent_step.py [--shapes smollm2-135m,llama3.2-1b] [--context 512] [--output FILE.json]

awq_step_skeleton (plugins/kernels/persistent_step.cu) runs the phases of a decode step's layers
(q/k/v, attention over --context cached tokens, o_proj, gate/up, down), each reading what the
real op reads from DRAM (a linear's int4 weights with a fp16 scale and zero a group of 128;
attention's K and V rows) and the vector the phase before wrote, with nothing of the real
arithmetic (small at these sizes). Three ways, at 1, 2 and 4 blocks of 256 threads an SM, alternating:

    persistent   one cooperative launch a step, a grid barrier between phases (grid_sync.cuh)
    queue        one launch a step, its phases' tiles (as many a phase as blocks) a queue of tasks
                 taken in order by whichever block is free, each waiting (after loading its own
                 bytes) only for the phase before to be done (awq_step_skeleton_queue: no
                 cooperative launch, and it runs on the CPU emulation)
    per_op       a launch a phase (the same kernel, one phase each, as many blocks), a step's
                 launches in one CUDA graph, overlapped on sm_90 (pdl.cuh), as the backend's
                 decode step is

Layers: the shape's, or more so that a step's bytes are >= 4x the L2 (each phase reads DRAM, as
in a real step). Time per layer = host time over --iters steps after a synchronize / (iters x
layers), median of 5. Each way's block sums are checked against skeleton_twin first (a wrong
barrier gives other sums; a stalled one sets its flag). Roofline = bytes per layer / the copy
bandwidth of the same run. Read us_per_layer against cuda_layer.py's real layer of the same
shape in the same gpu_check run (run 3: SmolLM2's 19.4 us at 512 cached tokens): the gap between
the real layer and per_op is the real kernels' own work; between per_op and persistent, what
one launch a step saves on the same work. The real step on the queue (decode_step.cu, decode
choice persistent_step) is in cuda_layer.py's variant "fused, layers in one launch" and
cuda_decode.py's decode_tok_s_persistent_step: against queue_us here, what its real work costs.

JSON: gpu, copy_gbs, context, and per shape: layers, bytes_per_layer, roofline_us, per_op_us,
persistent_us and queue_us ({blocks an SM: us per layer} each), phases (name, bytes, out_words).
Needs an NVIDIA GPU and nvcc (the kernel is compiled here); no torch. Without a GPU it prints one
line and exits 2.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: an installed (or gpu_check.sh's linked) awq_edge wins

SKELETON_THREADS = 256   # persistent_step.cu kThreads
GROUP = 128              # the group size the phases' scale/zero bytes assume
BLOCKS_PER_SM = (1, 2, 4)
WAYS = ("per_op", "persistent", "queue")
STEP_QUEUE_BYTES = 24    # persistent_step.cu StepQueue: next, base (u64), finished, stalled (u32)


def linear_bytes(n: int, k: int) -> int:
    """int4 weights [n, k] with a fp16 scale and zero per group of GROUP."""
    return n * k // 2 + n * -(-k // GROUP) * 4


def layer_phases(shape: dict, context: int) -> list[tuple[str, int, int]]:
    """(name, bytes read, output words) of a decoder layer's phases (uint32 words of fp16 pairs)."""
    h, inter, D = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    H, Hkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    qkv = (H + 2 * Hkv) * D
    return [("q/k/v", linear_bytes(qkv, h), qkv // 2),
            ("attention", 2 * Hkv * (context + 1) * D * 2, H * D // 2),
            ("o_proj", linear_bytes(h, H * D), h // 2),
            ("gate/up", linear_bytes(2 * inter, h), inter // 2),
            ("down", linear_bytes(h, inter), h // 2)]


def step_layout(phases: list, layers: int, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(phase_start in uint4 words [P + 1], vector_words [P + 1]: the first phase's input, then each
    phase's output) for `layers` copies of a layer's phases, each phase's bytes rounded up to 16."""
    sizes = [-(-nbytes // 16) for _, nbytes, _ in phases] * layers
    start = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    words = np.array([hidden // 2] + [out for _, _, out in phases] * layers, np.int32)
    return start, words


def mix(x: np.ndarray) -> np.ndarray:
    """persistent_step.cu's mix (MurmurHash3's 32-bit finalizer) on uint64 arrays of uint32 values."""
    mask = (1 << 32) - 1
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & mask
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & mask
    return x ^ (x >> 16)


def skeleton_twin(words: np.ndarray, phase_start: np.ndarray, vector_words: np.ndarray, initial: np.ndarray,
                  blocks: int) -> np.ndarray:
    """awq_step_skeleton's block_sums (uint32 [blocks]) after all phases, from the uint4 words
    (uint32 [n, 4]) and the first phase's input vector (its rule: persistent_step.cu's header)."""
    mask = (1 << 32) - 1
    vector = initial.astype(np.uint64)
    span = SKELETON_THREADS * blocks
    for p in range(len(phase_start) - 1):
        seg = words[phase_start[p]:phase_start[p + 1]]
        fold = (seg[:, 0] ^ seg[:, 1] ^ seg[:, 2] ^ seg[:, 3]).astype(np.uint64)
        per_block = np.pad(fold, (0, -fold.size % span)).reshape(-1, blocks, SKELETON_THREADS).sum(axis=(0, 2))
        sums = (per_block + int(vector[:vector_words[p]].sum())) & mask
        n_out = int(vector_words[p + 1])
        j = np.arange(n_out, dtype=np.uint64)
        vector = mix((sums[j // -(-n_out // blocks)] + j) & mask)
    return sums.astype(np.uint32)


class Skeleton:
    """The kernel on one GPU, over one step's layout: run(persistent or per op) and check()."""

    def __init__(self, drv, functions: dict, programmatic: bool, phase_start: np.ndarray, vector_words: np.ndarray,
                 rng):
        self.drv, self.functions, self.programmatic = drv, functions, programmatic
        self.phase_start, self.vector_words = phase_start, vector_words
        self.words = np.frombuffer(rng.bytes(int(phase_start[-1]) * 16), np.uint32).reshape(-1, 4)
        self.initial = np.frombuffer(rng.bytes(int(vector_words[0]) * 4), np.uint32)
        self.stride = int(vector_words.max())
        self.dev = {"bytes": drv.alloc(self.words.nbytes), "start": drv.alloc(phase_start.nbytes),
                    "words": drv.alloc(vector_words.nbytes), "vectors": drv.alloc(2 * self.stride * 4),
                    "barrier": drv.alloc(16), "sums": drv.alloc(4 * 4096), "queue": drv.alloc(STEP_QUEUE_BYTES),
                    "done": drv.alloc(4 * len(phase_start))}
        drv.upload(self.dev["bytes"], self.words)
        drv.upload(self.dev["start"], phase_start)
        drv.upload(self.dev["words"], vector_words)
        for name, nbytes in (("barrier", 16), ("queue", STEP_QUEUE_BYTES), ("done", 4 * len(phase_start))):
            drv.zero(self.dev[name], nbytes)  # once: both kernels leave them ready for the next launch

    def args(self, first: int, phases: int) -> list:
        from awq_edge.cuda_driver import i32, ptr

        d = self.dev
        return [ptr(d["bytes"]), ptr(d["start"]), ptr(d["words"]), i32(first), i32(phases), ptr(d["vectors"]),
                i32(self.stride), ptr(d["barrier"]), ptr(d["sums"])]

    def launch(self, way: str, blocks: int) -> None:
        """One step the given way, on `blocks` blocks (the queue: as many tiles a phase)."""
        from awq_edge.cuda_driver import i32, ptr

        phases = len(self.phase_start) - 1
        if way == "per_op":
            for p in range(phases):
                self.drv.launch(self.functions["awq_step_skeleton"], (blocks,), (SKELETON_THREADS,), self.args(p, 1),
                                programmatic=self.programmatic)
            return
        if way == "queue":
            d = self.dev
            self.drv.launch(self.functions["awq_step_skeleton_queue"], (blocks,), (SKELETON_THREADS,),
                            [ptr(d["bytes"]), ptr(d["start"]), ptr(d["words"]), i32(phases), i32(blocks),
                             ptr(d["vectors"]), i32(self.stride), ptr(d["queue"]), ptr(d["done"]), ptr(d["sums"])])
            return
        args, launch = self.args(0, phases), self.drv.lib.cuLaunchCooperativeKernel
        launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        self.drv.check(launch(self.functions["awq_step_skeleton"], blocks, 1, 1, SKELETON_THREADS, 1, 1, 0,
                              self.drv.stream, params), "cuLaunchCooperativeKernel")

    def check(self, way: str, blocks: int) -> str | None:
        """One step from the initial vector: what is wrong when its block sums are not the twin's or
        something stalled, else None."""
        self.drv.synchronize()
        self.drv.upload(self.dev["vectors"], self.initial)
        self.launch(way, blocks)
        sums, barrier, queue = np.empty(blocks, np.uint32), np.empty(4, np.uint32), np.empty(6, np.uint32)
        # (queue: next and base as uint32 pairs, then finished, stalled)
        self.drv.download(sums, self.dev["sums"])
        self.drv.download(barrier, self.dev["barrier"])
        self.drv.download(queue, self.dev["queue"])
        stalled = bool(barrier[2] or queue[5])
        want = skeleton_twin(self.words, self.phase_start, self.vector_words, self.initial, blocks)
        if stalled or not np.array_equal(sums, want):
            return (f"the step skeleton ({way}, {blocks} blocks) disagrees with its twin (stalled: {stalled}, "
                    f"{int((sums != want).sum())} block sums differ)")
        return None

    def free(self) -> None:
        for address in self.dev.values():
            self.drv.free(address)


def build_cubin(nvcc: str, arch: str, out: Path) -> bytes:
    from awq_edge import plugins

    kernels = plugins.PLUGINS_DIR / "kernels"
    subprocess.run([nvcc, "-std=c++17", "-O3", "-cubin", f"-arch={arch}", "-I", str(kernels), "-o", str(out),
                    str(kernels / "persistent_step.cu")], check=True)
    return out.read_bytes()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="smollm2-135m,llama3.2-1b")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    from awq_edge import plugins
    from awq_edge.cuda_driver import CudaError, Driver
    from awq_edge.cuda_runtime import benchmark_gpu, seconds_per_call
    from awq_edge.synthetic import SHAPES
    from cuda_layer import copy_gbs

    gpu = benchmark_gpu("benchmarks/persistent_step.py")
    if gpu is None:
        return 2
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]}; pick from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    drv = Driver(gpu.index)
    with tempfile.TemporaryDirectory(prefix="awq-edge-skeleton-") as tmp:
        module = drv.load_module(build_cubin(plugins.find_nvcc(), gpu.arch, Path(tmp) / "s.cubin"))
    functions = {name: drv.function(module, name) for name in ("awq_step_skeleton", "awq_step_skeleton_queue")}
    sms, l2, ceiling = drv.multiprocessor_count(), drv.l2_cache_bytes(), copy_gbs(drv)
    resident = ctypes.c_int()  # a cooperative launch must fit at once: at most this many blocks an SM
    drv.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_void_p,
                                                                     ctypes.c_int, ctypes.c_size_t]
    drv.check(drv.lib.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(resident),
                                                                  functions["awq_step_skeleton"], SKELETON_THREADS, 0),
              "cuOccupancyMaxActiveBlocksPerMultiprocessor")
    per_sm = [k for k in BLOCKS_PER_SM if k <= resident.value]
    print(f"{gpu.name} ({gpu.arch}): {sms} SMs ({resident.value} skeleton blocks an SM at once), L2 {l2 >> 20} MiB, "
          f"copy {ceiling:.0f} GB/s, context {args.context}")
    rng, results = np.random.default_rng(0), []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        phases = layer_phases(shape, args.context)
        per_layer = sum(nbytes for _, nbytes, _ in phases)
        layers = max(shape["num_hidden_layers"], -(-4 * l2 // per_layer))
        start, words = step_layout(phases, layers, shape["hidden_size"])
        skeleton = Skeleton(drv, functions, int(gpu.arch.removeprefix("sm_")) >= 90, start, words, rng)
        try:
            runs = {}  # (way, blocks an SM) -> one step
            for k in per_sm:
                for way in WAYS:
                    try:
                        wrong = skeleton.check(way, k * sms)
                    except CudaError as e:  # (one way the driver refuses: the others are still timed)
                        print(f"{name}: {way} at {k} blocks an SM not run: {e}")
                        continue
                    if wrong:
                        print(f"error: {wrong}", file=sys.stderr)
                        return 1
                    runs[way, k] = lambda way=way, blocks=k * sms: skeleton.launch(way, blocks)
                if ("per_op", k) in runs:
                    graph = drv.capture(lambda: skeleton.launch("per_op", k * sms))
                    runs["per_op", k] = lambda graph=graph: drv.replay(graph)
            timings = {key: [] for key in runs}
            for _ in range(5):  # alternating, each a median of its own
                for key, run in runs.items():
                    timings[key].append(seconds_per_call(drv, run, args.iters, 1) / layers * 1e6)
        finally:
            skeleton.free()
        us = {key: float(np.median(t)) for key, t in timings.items()}
        row = {"shape": name, "layers": layers, "bytes_per_layer": per_layer,
               "roofline_us": per_layer / (ceiling * 1e9) * 1e6,
               **{f"{way}_us": {k: us[way, k] for k in per_sm if (way, k) in us} for way in WAYS},
               "phases": [dict(name=n, bytes=b, out_words=w) for n, b, w in phases]}
        results.append(row)
        print(f"{name}: {layers} layers of {per_layer / 2**20:.2f} MiB (roofline {row['roofline_us']:.2f} us), "
              "us a layer: " + "; ".join(f"{way} " + ", ".join(f"{v:.2f} at {k} blocks/SM" for k, v in
                                                                   row[f"{way}_us"].items()) for way in WAYS))
    report = {"gpu": gpu.name, "arch": gpu.arch, "sms": sms, "copy_gbs": ceiling, "context": args.context,
              "date": dt.datetime.now().isoformat(timespec="seconds"), "shapes": results}
    if args.output:
        args.output.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
