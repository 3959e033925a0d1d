"""The cuda backend: a native engine's decoder step (awq_edge/decoder.py) on our own kernels,
through the CUDA driver API (awq_edge/cuda_driver.py). No torch, no TensorRT, no compiler:
the engine carries its kernels as cubins.

    backend = CudaBackend(engine_dir, manifest, info, max_context)   # weights streamed to the GPU
    logits = backend.forward(prompt_ids)   # DeviceLogits: stay on the GPU
    token = sampler(logits, seen)          # chosen there (plugins/kernels/sample.cu)
    logits = backend.forward([token])      # decode: one CUDA graph replay
    token, logits = backend.sample_and_feed(logits.ptr, settings, seen, draw)  # both, run ahead (below)

Each op of decode_ops(spec) is one launch in decode (launch_op below, the mirror of the reference
backend's run(), whose numpy twins define what each kernel computes): the GEMV does a linear's
fused norm, activation and residual add. Prefill feeds chunks of up to PREFILL_CHUNK tokens: the
same ops, with the fusions as kernels of their own around each linear's product. A step of one
token (decode) replays a CUDA graph of its launches, captured the first time: the position
counter lives on the device and advances inside the graph, so a replay needs only the ids
written before it. A prefill chunk replays one too: the chunk padded to the next of
PREFILL_GRAPH_ROWS (the extra rows' K/V land past the real ones, where the next tokens overwrite
them before any query reads them), all of the step but its tail (the last row's norm and the
head), which is launched after it for the real last row, with the advance by the real rows.
From Python each launch costs host time (packing its arguments, a ctypes call): a 16-row
SmolLM2 chunk's ~330 launches took 8.5 ms on the H200 (run 3), a full chunk's graph 2.9 ms.
Sampling runs after the step with the request's settings, keeping the repetition-penalty
history on the device; two int32 come back (the token, and the attention kernels' over-capacity
flag). Decode runs ahead (sample_and_feed, which the Engine calls): the decode step embeds the
token where the sampler wrote it, so the step that feeds a token is queued behind its sampling
before the host reads it back, and the GPU computes the next logits while the host detokenizes,
checks stop strings and hands the text on; a reply that stops there takes that step back
(rewind). Per token the host then waits once, for the sampler, not for the step.

What is fastest depends on the GPU, so the backend times it there (on our own driver, unless
AWQ_EDGE_TUNE=0): loading times each one-row GEMV kind per role of decode's linears and keeps the
fastest, then that step against the persistent step (tune_decode_gemv), and a prefill chunk
size's first use times every path below and keeps the fastest (faster_prefill_graph); the
choices are kept for the next load (awq_edge/gpu_tuning.py), where nothing is timed again.
Without timing, the defaults below.

A prefill chunk's linears (matmul below): from CUBLAS_FROM_ROWS rows, "dequantize a slab of
weight rows to fp16, then cuBLAS's fp16 GEMM" when the machine has cuBLAS (awq_edge/cublas.py;
`prefill_path` says which ran and why): from an H100 run's cuBLAS and GEMM timings, an estimated
1.5-3.6x our GEMM from M = 128 up (docs/cuda.md). Below that (or without cuBLAS): up to 32 rows
the GEMV (on tensor cores from 2 rows, all of them in one pass), else our tensor-core GEMM. Its
attention: blocks of 64 tokens on tensor cores from 16 rows, or for fewer a block per token.

Nothing in this file has run on a GPU yet: it is checked on a lent GPU by
tests/test_cuda_backend_gpu.py (against the reference backend) and benchmarks/gpu_check.sh, and
in CI with the kernels' own source on a CPU emulation (tests/test_kernels_on_cpu.py).
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from .cublas import CublasUnavailable, load_cublas
from .decoder import HEAD_DIMS, HEAD_TOP_K, buffer_shapes, decode_ops, head_slices, step_ids
from .engine_dir import DecoderInfo
from .errors import UserError
from .gpu_tuning import read_tuning, tuning_key, write_tuning
from .memory import PREFILL_CHUNK, format_size
from .plugins import cuda_major
from .sampling import NO_USABLE_LOGITS, DeviceLogits, fp32_draw

CHUNK_BYTES = 64 << 20           # weights go to the GPU in pieces this size: no second host copy
# Launch shapes of the kernels (their comments in plugins/kernels/*.cu give the same).
NORM_THREADS = 256
DELTA_THREADS = 256  # plugins/kernels/delta_net.cu's blocks: a delta net's key and value heads at most this wide
GEMV_ROWS_PER_BLOCK, GEMV_THREADS = 4, 128
MOE_THREADS = 256  # plugins/kernels/moe.cu's route and combine (its expert GEMVs: the GEMV's shape)
# The one-row GEMV on tensor cores (awq_gemv_tc_*, plugins/kernels/gemv_w4a16.cu gemv_tc): 16 rows
# a block of 256 threads, for K % 32 == 0 and K <= 16384 (x in its shared memory), RoPE at
# head_dim % 16 == 0; other linears take the CUDA-core one (4 rows a block).
GEMV_TC_ROWS, GEMV_TC_THREADS, GEMV_TC_MAX_K = 16, 256, 16384
GEMV_TC_BLOCKS_PER_SM = 2  # its persistent grid (kTcBlocksPerSm: launch bounds of 128 registers x 256 threads)
# Which one decode runs. "cuda_cores", "tensor_cores" and "tensor_cores_persistent" take one for
# all linears: the persistent grid is GEMV_TC_BLOCKS_PER_SM blocks an SM, each taking several
# 16-row tiles in turn with its loads running on into the next, and x normed once a block.
# "auto" chooses per linear role (gemv_role): the one timed fastest on this GPU when the backend
# was loaded (tune_decode_gemv), else auto_default: the persistent tensor-core GEMV for the
# linears with an RMSNorm prologue (q/k/v, gate/up), the CUDA-core one for the rest. On the H200
# (benchmarks/cuda_layer.py, 2026-12-04 run 3, each op alone in a Llama-2-7B layer, CUDA cores /
# tensor cores / persistent): qkv 25.7 / 19.5 / 14.8 us, gate/up 43.1 / 31.3 / 21.0 (a block norms
# x once for all its rows: every block reads all of x and the norm weight), but o_proj 4.4 / 6.0 /
# 6.0 and down 10.0 / 12.0 / 11.9 (a plain GEMV streams faster on CUDA cores, benchmarks/gemv.py).
# SmolLM2's layer the same way round (qkv 4.1 / 3.5 / 3.5, o_proj 1.6 / 2.2 / 2.2). End to end
# (cuda_decode.py, all linears one way): 7B 298 / 359 / 432 tok/s, Llama-3.2-1B 932 / 1223 / 1352.
# No Orin or RTX 40xx has run them, hence the timing at load.
# "persistent_step": the step in one launch (plugins/kernels/decode_step.cu, issue 19: a small
# model's layer is launch- and latency-bound), every linear on its CUDA-core GEMV body, the ops a
# queue of tasks over STEP_BLOCKS_PER_SM blocks an SM; an int4 head (its GEMV as auto chooses,
# the candidate search, the re-scoring) and the position's advance are launched after it. Asked
# for (set_decode_gemv, or AWQ_EDGE_DECODE=persistent_step for any program that loads an engine:
# awq-edge run, chat, serve, bench), or taken by auto where the timing at load found it
# TUNE_MARGIN faster than auto's per-op step and its output agreed with that step's
# (tune_decode_gemv; not yet timed on any GPU).
DECODE_GEMVS = ("auto", "cuda_cores", "tensor_cores", "tensor_cores_persistent", "persistent_step")
# the head sizes the persistent step's attention takes (decode_step.cu: a fourth, 96, took its
# registers from 230 to 255 and spilled; a head size of 96 decodes on attend_split's own launch)
STEP_HEAD_DIMS = (64, 128, 256)
GEMV_KINDS = ("cuda_cores", "tensor_cores", "tensor_cores_persistent")
STEP_BLOCKS_PER_SM = 2  # decode_step.cu: ~230 registers x 128 threads a block (ptxas, sm_90; 3 an SM spill)
STEP_ARGS = 28          # decode_step.cu kStepArgs: a StepOp is 4 + this many int64
STEP_KINDS = {"embed": 0, "norm": 1, "add_norm": 2, "head_norm": 3, "act": 4, "rope_store": 5, "attention": 6,
              "linear": 7, "lm_head": 8}  # decode_step.cu StepKind
STEP_HEAD_ROWS = 16     # decode_step.cu step_lm_head: a task's blocks of rows (4 warps x 4)
STEP_STALLED = 2        # a bit of the status word (decode_step.cu AWQ_STEP_STALLED)
# The timing at load: each variant replayed this many times after a warm-up, in turn with the
# others, the median kept; a role leaves auto_default only for a GEMV at least TUNE_MARGIN faster.
TUNE_REPLAYS, TUNE_MARGIN = 3, 0.03
# ... and the persistent step only where its output agrees with the per-op step's within this
# fraction of that output's norm (they sum in another order: fp16 rounding, ~1e-3, apart).
STEP_AGREEMENT = 1e-2
GEMV_MAX_ROWS, GEMV_CHUNKED_MAX_ROWS = 8, 32  # plugins/kernels/w4a16.h: short chunks' GEMVs (CUDA cores: 8 rows each)
GEMV_MMA_ROWS_PER_BLOCK = 16                  # the tensor-core GEMV (2..32 rows): one mma tile of rows


def mma_rows_suffix(rows: int) -> str:
    """The tensor-core GEMV for `rows` rows of x (2..32) in one pass: awq_gemv_mma{this}_g{G}."""
    return "" if rows <= 8 else "_x16" if rows <= 16 else "_x32"


GEMM_TILE_M, GEMM_TILE_N, GEMM_STEP_K, GEMM_THREADS = 64, 128, 32, 256  # plugins/kernels/gemm_w4a16.cu
# The GEMM splits K over gridDim.z blocks when a chunk's output has too few 64 x 128 tiles to give
# each SM GEMM_SPLIT_BLOCKS_PER_SM blocks (a 64-row chunk of a 4096-wide linear: 32 tiles); each
# split's fp32 accumulators go through this workspace (32 KiB a tile and split), summed by the
# tile's last block (plugins/kernels/gemm_w4a16.cu). At most GEMM_MAX_SPLITS, each at least
# GEMM_MIN_SPLIT_STEPS K steps of 32. Not yet timed on a GPU.
GEMM_SPLIT_BLOCKS_PER_SM, GEMM_MAX_SPLITS, GEMM_MIN_SPLIT_STEPS = 2, 8, 8
GEMM_SPLIT_TILE_BYTES = GEMM_THREADS * 32 * 4
GEMM_SPLIT_WORKSPACE_BYTES = 8 << 20
GEMM_SPLIT_MAX_TILES = GEMM_SPLIT_WORKSPACE_BYTES // (2 * GEMM_SPLIT_TILE_BYTES)  # counters: a split has 2+
ROPE_THREADS, ATTEND_THREADS = 256, 128
ATTEND_SPLIT_KEYS = 128          # decode attention: keys per block (and threads), plugins/kernels/attention.cu
# The timing at load checks the persistent step (tune_decode_gemv) at this position of a filled cache:
# several splits of the context, which the step's attention merges across blocks as a chat's does.
STEP_CHECK_POSITION = 3 * ATTEND_SPLIT_KEYS + 64
ATTEND_BLOCK_QUERIES = 16        # prefill attention from this many rows a chunk: blocks of tokens
ATTEND_MMA_QUERIES = 64          # on tensor cores (awq_attend_mma), this many a block
# A prefill chunk is padded to the first of these that holds it (at most 1.5x its rows) and
# replays that size's graph; the largest is PREFILL_CHUNK.
PREFILL_GRAPH_ROWS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
LM_HEAD_ROWS_PER_BLOCK = 32      # the heads: 4 rows a warp (plugins/kernels/decoder_ops.cu)
HEAD_SELECT_THREADS, HEAD_RESCORE_ROWS = 1024, 8  # an int4 head's re-scoring (plugins/kernels/head_top_k.cu)
SAMPLE_THREADS = 1024
DEQUANT_THREADS = 256
# Prefill through cuBLAS: from this many rows a chunk, the fp16 slab of weight rows it dequantizes
# into at most this many bytes, and cuBLAS's own scratch. Full chunks only: on the H200
# (benchmarks/cuda_decode.py, 2026-12-04) dequantize + cuBLAS beat our GEMM 1.5-1.9x on a 256-row
# chunk (a graph replay) but lost 1.4-4x on 16 and 64 rows, launched one by one (a 7B's ~800 slabs);
# those are graph replays now too, to be timed again (benchmarks/cuda_decode.py prefill_times).
CUBLAS_FROM_ROWS = PREFILL_CHUNK
DEQUANT_SLAB_BYTES = 16 << 20
CUBLAS_WORKSPACE_BYTES = 4 << 20
# What cuBLAS itself takes on the device (its handle, the kernels it loads on first use), counted in
# the memory plan, not allocated by us: 134 MiB on the H200 with CUDA 13's cuBLAS (2026-12-04,
# test_cublas_fits_the_reserve_the_memory_plan_counts_for_it), with some room for other builds.
CUBLAS_RESERVE_BYTES = 160 << 20
# plugins/kernels/activation.cuh ActKind
ACT_KINDS = {"silu": 0, "gelu_tanh": 1, "relu2": 2, "xielu": 3, "gelu": 4, "relu": 5}
ACT_UNGATED = 8  # ActKind kUngated: act(x), not act(gate) * up (an MLP without a gate)


def act_code(kind: str, gated: bool) -> int:
    """The kernels' int for an activation: its ActKind, with kUngated added for an MLP without a gate."""
    return ACT_KINDS[kind] | (0 if gated else ACT_UNGATED)


def prefill_graph_rows(rows: int, room: int) -> int | None:
    """The padded size of a prefill chunk of `rows` whose graph it replays, or None when the padding
    would not fit the `room` left in the cache (then its kernels are launched one by one)."""
    return next((size for size in PREFILL_GRAPH_ROWS if rows <= size <= room), None)


def gemv_role(a: dict) -> str:
    """Decode's one-row GEMVs that run the same kernel in every layer, timed together by the tuning:
    the weight's name without its layer, and the fusion ("self_attn.qkv_proj norm_rope",
    "lm_head.q4 logits"; Gemma's first q/k/v, which norms its input, is a role of its own)."""
    name = a["weight"].split(".", 3)[3] if a["weight"].startswith("model.layers.") else a["weight"]
    return f"{name} {'norm_' if a.get('norm') else ''}{a.get('epilogue', 'logits')}"


def decode_choice(environ=os.environ) -> str:
    """The decode choice (DECODE_GEMVS) that AWQ_EDGE_DECODE names, by default auto."""
    value = environ.get("AWQ_EDGE_DECODE", "").strip() or "auto"
    if value not in DECODE_GEMVS:
        raise UserError(f"AWQ_EDGE_DECODE={value!r} is not a decode choice; set one of {', '.join(DECODE_GEMVS)}, "
                        "or unset it for auto")
    return value


def auto_default(a: dict) -> str:
    """auto's GEMV for a linear of op args `a` where nothing was timed (see DECODE_GEMVS)."""
    return "tensor_cores_persistent" if a.get("norm") else "cuda_cores"


def step_tail(ops: list) -> int:
    """Where a step's tail starts: the final norm (of the last row only) and the head."""
    return next(i for i, op in enumerate(ops) if op.args.get("last_row"))


def step_row_blocks_at_once(k: int) -> int:
    """How many 4-row blocks a task of the persistent step's GEMV runs at once (decode_step.cu
    step_gemv_rows: a group of the block's 128 threads each, a 16-byte chunk of K a thread): 4
    while a row's K / 32 chunks fit one warp, 2 while they fit two, else 1; its tasks are cut to
    match."""
    chunks = k // 32
    return 4 if chunks <= 32 else 2 if chunks <= 64 else 1


def step_capacity(spec) -> int:
    """The most ops a persistent step's table holds: the unfused op list, a RoPE op a layer more."""
    return len(decode_ops(spec, fused=False)) + spec.layers


def step_table_bytes(spec) -> int:
    """The persistent step's table (StepOp: 4 + STEP_ARGS int64), its counts (uint32) and queue."""
    return step_capacity(spec) * (8 * (4 + STEP_ARGS) + 4) + 32


def slab_rows(n: int, k: int, slab_bytes: int = DEQUANT_SLAB_BYTES) -> int:
    """Weight rows dequantized at a time for a [n, k] linear: whole when it fits slab_bytes, else
    the most rows that do (a multiple of 8: N is one)."""
    return min(n, max(8, slab_bytes // (2 * k) // 8 * 8))


def gemm_grid(rows: int, n: int) -> tuple[int, int]:
    """The GEMM's output tiles for rows x n: (along n, along rows)."""
    return -(-n // GEMM_TILE_N), -(-rows // GEMM_TILE_M)


def gemm_split_count(rows: int, n: int, k: int, sm_count: int) -> int:
    """How many blocks split K for a GEMM of rows x n x k: enough for GEMM_SPLIT_BLOCKS_PER_SM
    blocks an SM, within GEMM_MAX_SPLITS, GEMM_MIN_SPLIT_STEPS K steps a split and the workspace."""
    across, down = gemm_grid(rows, n)
    tiles = across * down
    if tiles > GEMM_SPLIT_MAX_TILES:
        return 1
    want = -(-GEMM_SPLIT_BLOCKS_PER_SM * sm_count // tiles)
    fits = GEMM_SPLIT_WORKSPACE_BYTES // (tiles * GEMM_SPLIT_TILE_BYTES)
    return max(1, min(want, GEMM_MAX_SPLITS, -(-k // GEMM_STEP_K) // GEMM_MIN_SPLIT_STEPS, fits))


def slab_buffer_bytes(spec) -> int:
    """The dequantized slab's buffer: the largest slab of any linear."""
    linears = [op.args for op in decode_ops(spec) if op.kind == "linear"]
    return max(2 * slab_rows(a["N"], a["K"]) * a["K"] for a in linears)


def cublas_prefill_bytes(spec) -> int:
    """Device bytes the cuBLAS prefill needs: the slab, cuBLAS's workspace and its own reserve."""
    return slab_buffer_bytes(spec) + CUBLAS_WORKSPACE_BYTES + CUBLAS_RESERVE_BYTES


def head_candidate_bytes(spec) -> int:
    """An int4 head's candidates between its two selection kernels: a key and an id each."""
    slices, _ = head_slices(spec.vocab)
    return 8 * slices * HEAD_TOP_K


def find_gpu(manifest: dict):
    """The GPU this engine runs on, or a one-line UserError (none, or another arch)."""
    from .cuda_runtime import find_gpus

    built = f"{manifest['gpu_arch']} ({manifest['device']})"
    gpus = find_gpus()
    if not gpus:
        raise UserError(f"no NVIDIA GPU found: this engine (backend cuda) runs on a {built} GPU; build one for "
                        "this machine with `awq-edge build SRC --device cpu`")
    for gpu in gpus:
        if gpu.arch == manifest["gpu_arch"]:
            return gpu
    here = ", ".join(f"{g.name} ({g.arch})" for g in gpus)
    raise UserError(f"this engine was built for {built} but this machine has {here}; rebuild it with "
                    "`awq-edge build SRC --device gpu`")


def kernels_refused(error, built_for: str | None, driver) -> str:
    """Why the driver would not load an engine's cubins, in one line, and what to do: most often
    they came from an nvcc newer than the CUDA the driver supports (CUDA 13's on JetPack 6's 12.6)."""
    try:
        supported = driver.cuda_version()
    except Exception:  # noqa: BLE001  (the message below does without it)
        supported = None
    if built_for and supported and cuda_major(built_for) > cuda_major(supported):
        return (f"the engine's kernels were compiled by nvcc {built_for} and this GPU's driver supports CUDA "
                f"{supported} at most ({error}); rebuild the engine with an nvcc of CUDA {supported} or older "
                "(NVCC=/path/to/that/nvcc awq-edge build ...), or update the driver")
    return (f"the GPU's driver refused the engine's kernels ({error}); rebuild the engine for this GPU "
            "(`awq-edge build SRC --device gpu --output ENGINE`)")


class CudaBackend:
    """The backend interface of awq_edge.engine: forward, rewind, position, max_context,
    vocab_size, kv_bytes; forward returns DeviceLogits."""

    def __init__(self, engine_dir: Path, manifest: dict, info: DecoderInfo, max_context: int, driver=None,
                 cublas=None, tune: bool | None = None, tuning_cache: Path | bool | None = None):
        """driver: a cuda_driver.Driver; by default one on the GPU of the engine's arch (the tests
        pass one that records the launches, to check them against the cubins without a GPU).
        cublas: what runs long prefill chunks' GEMMs (cublas.Cublas's gemm_wt); by default the
        machine's cuBLAS when it has one (with a driver given: none); False: our GEMM always.
        tune: time the decode GEMVs on this GPU now (tune_decode_gemv) and each prefill chunk size
        on every path at its first use (faster_prefill_graph); by default on a GPU of our own driver, unless
        AWQ_EDGE_TUNE=0. tuning_cache: the folder that keeps what was timed for the next load
        (awq_edge/gpu_tuning.py); by default the cache folder's tuning/ on our own driver, False:
        none."""
        from .cuda_driver import CudaError, Driver

        engine_dir = Path(engine_dir)
        decode = decode_choice()  # (a wrong one refused before the GPU is touched)
        gpu = find_gpu(manifest) if driver is None else None
        self.spec = spec = info.spec
        self.ops = decode_ops(spec)
        self.max_context, self.vocab_size, self.position = int(max_context), spec.vocab, 0
        # sm_90+: each kernel may start while the one before finishes (plugins/kernels/pdl.cuh);
        # before, each GEMV sends the next linear's first weights toward L2 (up to half of it) instead
        self.programmatic = int(manifest["gpu_arch"].removeprefix("sm_")) >= 90
        try:
            self.drv = driver or Driver(gpu.index)
            self.prefetch_bytes = 0 if self.programmatic else self.drv.l2_cache_bytes() // 2
            self.sm_count = self.drv.multiprocessor_count()
            self.kernels = self._load_kernels(engine_dir, manifest)
            self._check_room(info)
            self.weights = self._upload_weights(engine_dir, info)
            self._allocate()
            self.cublas, self.no_cublas = self._open_cublas(False if cublas is None and driver else cublas)
            self.cublas_from_rows = CUBLAS_FROM_ROWS  # (benchmarks/cuda_decode.py moves it to time both paths)
            self.tuned_gemv: dict[str, str] = {}      # auto's choice per gemv_role, where timed
            self.tuned_step = False                    # auto decodes on the persistent step (timed faster)
            self.step_rows_at_once = None              # (None: step_row_blocks_at_once; tests set 1 or 2)
            self.gemv_tuning = None                    # what tune_decode_gemv measured
            self.slab_bytes = DEQUANT_SLAB_BYTES       # (and tries slabs that fit the L2)
            self.l2_slab_bytes = min(DEQUANT_SLAB_BYTES, self.drv.l2_cache_bytes() // 2)
            self._graphs = {}  # rows -> the instantiated CUDA graph of a step of that many rows
            self.set_decode_gemv(decode)  # (the benchmarks time each; an engine the step cannot run: refused)
            self.tune = tune if tune is not None else driver is None and os.environ.get("AWQ_EDGE_TUNE", "1") != "0"
            self.time_prefill = self.tune              # (off once set_prefill_path chooses)
            self.prefill_timed: dict[int, str] = {}    # padded rows -> its path, gpu_tuning.PREFILL_PATHS
            self.prefill_tuning: dict[int, dict] = {}  # padded rows -> each path's milliseconds
            self.tuning_path = self._tuning_path(manifest, tuning_cache, driver) if self.tune else None
            if self.tune and not self._read_tuning():
                try:
                    self.tune_decode_gemv()
                    self._keep_tuning()
                except CudaError as e:  # (e.g. no room for a timed graph): the defaults, untimed
                    self.gemv_tuning, self.time_prefill = {"error": str(e), "gemv": self.auto_choices()}, False
        except CudaError as e:
            raise UserError(f"the GPU refused the engine: {e}") from None

    # ------------------------------------------------------------ setup
    def _load_kernels(self, engine_dir: Path, manifest: dict) -> dict:
        from .cuda_driver import CudaError

        functions = {}
        for module_name, file in manifest["kernels"].items():  # checked by engine_dir.read_manifest
            try:
                module = self.drv.load_module((engine_dir / file).read_bytes())
            except CudaError as e:
                raise UserError(kernels_refused(e, manifest.get("kernels_cuda"), self.drv)) from None
            for name in KERNELS_OF[module_name]:
                try:
                    functions[name] = self.drv.function(module, name)
                except CudaError as e:
                    if "NOT_FOUND" not in str(e):
                        raise
                    raise UserError(f"{engine_dir / file} has no kernel {name}: the engine was built by an older "
                                    "awq-edge; rebuild it with `awq-edge build`") from None
        return functions

    def _check_room(self, info: DecoderInfo) -> None:
        """Refuse before allocating when the GPU has not the room the plan needs."""
        need = info.weight_bytes + info.kv_bytes_per_token * self.max_context + info.workspace(self.max_context)
        free, _ = self.drv.memory_info()
        if need > free:
            raise UserError(f"the engine needs {format_size(need)} of GPU memory for a {self.max_context}-token "
                            f"context, and the GPU has {format_size(free)} free; lower --max-context or --max-memory")

    def _upload_weights(self, engine_dir: Path, info: DecoderInfo) -> dict[str, int]:
        """weights.bin into one device allocation, CHUNK_BYTES at a time; name -> device pointer."""
        base = self.drv.alloc(info.weight_bytes)
        chunk = np.empty(CHUNK_BYTES, np.uint8)
        with open(engine_dir / info.weights_file, "rb") as f:
            done = 0
            while done < info.weight_bytes:
                n = f.readinto(memoryview(chunk)[:min(CHUNK_BYTES, info.weight_bytes - done)])
                if not n:
                    raise UserError(f"{engine_dir / info.weights_file} ended early; rebuild or re-copy the engine")
                self.drv.upload(base + done, chunk[:n])
                done += n
        return {name: base + offset for name, (_dtype, _shape, offset) in info.tensors.items()}

    def _allocate(self) -> None:
        spec, drv, C = self.spec, self.drv, self.max_context
        self.buf_bytes = {name: int(np.prod(shape)) * (4 if name == "logits" else 2)
                          for name, shape in buffer_shapes(spec, PREFILL_CHUNK).items()}
        self.buf = {name: drv.alloc(nbytes) for name, nbytes in self.buf_bytes.items()}
        self.q_rot_bytes = PREFILL_CHUNK * spec.heads * spec.head_dim * 2
        self.q_rot = drv.alloc(self.q_rot_bytes)
        # decode attention's splits of the context: each one's softmax state, and a counter per head
        self.attn_splits = -(-C // ATTEND_SPLIT_KEYS)
        self.attn_partials_bytes = 4 * spec.heads * self.attn_splits * (2 + spec.head_dim)
        self.attn_partials = drv.alloc(self.attn_partials_bytes)
        self.attn_counters = drv.alloc(4 * spec.heads)
        drv.zero(self.attn_counters, 4 * spec.heads)
        self.layer_kv_bytes = spec.kv_heads * C * spec.head_dim * 2
        attention = spec.attention_layers  # (a cache of 0: an LFM2 short convolution's layer)
        self.k_cache = [drv.alloc(self.layer_kv_bytes) if i in attention else 0 for i in range(spec.layers)]
        self.v_cache = [drv.alloc(self.layer_kv_bytes) if i in attention else 0 for i in range(spec.layers)]
        # (LFM2's) each short convolution's B * x by position after kernel - 1 rows of zeros (awq_short_conv)
        self.conv_store_bytes = (spec.conv_kernel - 1 + C) * spec.hidden * 2
        self.conv_store = {i: drv.alloc(self.conv_store_bytes) for i in spec.conv_layers}
        for store in self.conv_store.values():
            drv.zero(store, self.conv_store_bytes)
        # (Qwen3.5's) each delta net's convolution inputs and S, float32, updated in place by its kernels; a copy
        # at the last prefill's end, where a rewind can go back to, and a spare for the tuning's replays
        d = spec.delta
        self.delta_bytes = 4 * d.state_elems if d else 0
        self.delta_state, self.delta_kept, self.delta_spare = (
            {i: drv.alloc(self.delta_bytes) for i in spec.delta_layers} for _ in range(3))
        for state in self.delta_state.values():
            drv.zero(state, self.delta_bytes)
        self.delta_kept_at: int | None = None  # the position delta_kept holds
        self._kv_bytes = (2 * len(attention) * self.layer_kv_bytes + len(self.conv_store) * self.conv_store_bytes
                          + 3 * len(self.delta_state) * self.delta_bytes)
        self.ids = drv.alloc(PREFILL_CHUNK * 4)        # int32 ids of the step
        self.past = drv.alloc(8)                       # int64 position counter, advanced by the step
        self.sample_work = drv.alloc(2 * spec.vocab * 4)
        self.head_candidates = drv.alloc(head_candidate_bytes(spec))  # an int4 head's: keys, then ids
        self.cublas_workspace = drv.alloc(CUBLAS_WORKSPACE_BYTES)  # with the slab: in cublas_prefill_bytes
        self.dequant_slab = drv.alloc(slab_buffer_bytes(spec))
        self.gemm_partials = drv.alloc(GEMM_SPLIT_WORKSPACE_BYTES)  # the split-K GEMM's, and a counter a tile
        self.gemm_counters = drv.alloc(4 * GEMM_SPLIT_MAX_TILES)
        drv.zero(self.gemm_counters, 4 * GEMM_SPLIT_MAX_TILES)
        self.token = drv.alloc(8)                      # int32 sampled token (a decode step's input), then
        self.status = self.token + 4                   # int32 attention status: one download reads both
        self.uniform = drv.alloc(4)
        # the copies that overlap a running step go through page-locked memory, and the host waits
        # for the sampler alone through an event recorded behind its token's copy
        self.host_token, self.host_draw = drv.host_array(2, np.int32), drv.host_array(1, np.float32)
        self.sampled = drv.event()
        self.timer = drv.event(timing=True), drv.event(timing=True)  # (tune_decode_gemv's)
        self.draw_on_device = 0.0                      # what `uniform` holds (greedy: always 0)
        self.uploads = ()                              # pageable arrays a queued copy still reads
        self.run_ahead = True                          # (benchmarks/cuda_decode.py times it off too)
        self.step_capacity = step_capacity(spec)       # the persistent step's table, its counts, its queue
        self.step_table = drv.alloc(8 * (4 + STEP_ARGS) * self.step_capacity)
        self.step_done, self.step_queue = drv.alloc(4 * self.step_capacity), drv.alloc(32)
        self.seen = drv.alloc(C * 4)                   # the repetition-penalty history, on the device
        self.n_seen = drv.alloc(4)
        self.seen_mirror: list[int] = []               # what `seen` holds, to upload only what is new
        self.seen_source = None                        # the caller's list the mirror was last made from
        drv.zero(self.past, 8)
        drv.zero(self.n_seen, 4)
        drv.zero(self.token, 8)
        drv.zero(self.uniform, 4)
        self._reset_step_queue()

    def _open_cublas(self, given):
        """(the GEMM of long prefill chunks, None) or (None, why there is none)."""
        if given is False:
            return None, "cuBLAS not asked for"  # (the tests' fake drivers too)
        if given is None:
            try:
                given = load_cublas(self.drv.stream, self.cublas_workspace, CUBLAS_WORKSPACE_BYTES)
            except CublasUnavailable as e:
                return None, f"no cuBLAS: {e}"
        return given, None

    @property
    def decode_path(self) -> str:
        """What a decode step runs (awq-edge bench prints it): the head is the choice a build makes."""
        head = {"int4": "int4, its top 64 re-scored from fp16"}.get(self.spec.lm_head, self.spec.lm_head)
        said = {"tensor_cores": "on tensor cores", "tensor_cores_persistent": "on tensor cores (persistent grid)",
                "cuda_cores": "on CUDA cores",
                "persistent_step": "on CUDA cores, the step in one persistent launch (an int4 head's as auto)"}
        gemv = said.get(self.decode_gemv, "on tensor cores (persistent grid) after a norm, else CUDA cores")
        if self.decode_gemv == "auto" and self.tuned_step:
            gemv = f"as timed on this GPU: {said['persistent_step']}"
        elif self.decode_gemv == "auto" and self.gemv_tuning and "error" not in self.gemv_tuning:
            gemv = "as timed on this GPU (" + "; ".join(
                f"{'lm_head' if role.startswith('lm_head') else role.split()[0].rsplit('.', 1)[-1]} "
                f"{said[self.gemv_kind(ops[0].args)]}" for role, ops in self.gemv_roles().items()) + ")"
        ahead = ", run ahead of the host" if self.run_ahead else ", one step at a time"
        return f"cuda graph of awq-edge kernels, GEMV {gemv}, lm_head {head}{ahead}"

    @property
    def prefill_path(self) -> str:
        """What a prefill chunk's linears run, and why (awq-edge bench prints it)."""
        if self.cublas is None:
            return f"awq-edge GEMV/GEMM ({self.no_cublas})"
        if self.time_prefill:
            timed = ", ".join(f"{rows} rows {path}" for rows, path in sorted(self.prefill_timed.items()))
            return (f"dequantize + cuBLAS or awq-edge GEMM per chunk size from {GEMV_CHUNKED_MAX_ROWS + 1} rows, "
                    f"the faster on this GPU ({timed or 'none timed yet'}), awq-edge GEMV below")
        return f"dequantize + cuBLAS from {self.cublas_from_rows} rows a chunk, awq-edge GEMV/GEMM below"

    # ------------------------------------------------------------ the engine's interface
    def kv_bytes(self) -> int:
        return self._kv_bytes

    def rewind(self, position: int) -> None:
        """As backend_ort's: where a delta net's states cannot be taken back to `position`, to the last
        prefill's end at or before it, else 0; `position` then says where."""
        if not 0 <= position <= self.position:
            raise UserError(f"cannot rewind to {position}: the cache holds {self.position} tokens")
        self.drv.synchronize()  # a step run ahead may still advance the counter (a plain copy would not wait)
        if self.delta_state and position < self.position:
            kept = self.delta_kept_at is not None and self.delta_kept_at <= position
            for i, state in self.delta_state.items():
                if kept:
                    self.drv.copy(state, self.delta_kept[i], self.delta_bytes)
                else:
                    self.drv.zero(state, self.delta_bytes)
            self.drv.synchronize()  # (the copies queued: the upload below is a synchronous one)
            position = self.delta_kept_at if kept else 0
        self.position = int(position)
        self.drv.upload(self.past, np.array([self.position], np.int64))

    def delta_s(self, layer: int) -> int:
        """Where S of a delta-net or Mamba-2 layer begins: after its convolution's inputs in the layer's state
        (export.spec.DeltaNet.state_shapes' order)."""
        return self.delta_state[layer] + 4 * int(np.prod(self.spec.delta.state_shapes[0]))

    def _keep_delta_states(self, into: dict) -> None:
        """Each delta net's states copied into `into` (delta_kept, delta_spare), behind the queued work."""
        for i, state in self.delta_state.items():
            self.drv.copy(into[i], state, self.delta_bytes)

    def _restore_delta_states(self) -> None:
        """The states as _keep_delta_states(delta_spare) left them (after the tuning's replays)."""
        for i, state in self.delta_state.items():
            self.drv.copy(state, self.delta_spare[i], self.delta_bytes)

    def forward(self, ids) -> DeviceLogits:
        ids = step_ids(ids, self.position, self.max_context, self.vocab_size)
        staged = []  # the chunks' host arrays: the copies read them until the synchronize below
        for start in range(0, ids.size, PREFILL_CHUNK):  # on the stream in order; the host waits once
            chunk = ids[start:start + PREFILL_CHUNK].astype(np.int32)
            rows = chunk.size
            room = min(self.max_context, self.spec.max_positions) - self.position
            # (a delta net's state would take a padded row in: its prefill chunks' kernels run one by one)
            padded = 1 if rows == 1 else None if self.delta_state else prefill_graph_rows(rows, room)
            staged.append(chunk if padded is None else np.pad(chunk, (0, padded - rows)))
            self.drv.upload_async(self.token if rows == 1 else self.ids, staged[-1])  # (decode embeds `token`)
            if padded is None:
                self._step(rows)
            else:
                self._replay(padded)
                if rows > 1:  # (decode's graph has its tail)
                    self._tail(rows)
            self.position += rows
        if self.delta_state and ids.size > 1:  # a prefill's end: where a rewind can go back to
            self._keep_delta_states(self.delta_kept)
            self.delta_kept_at = self.position
        self.drv.synchronize()
        return DeviceLogits(self, self.buf["logits"], self.vocab_size)

    def _replay(self, rows: int) -> None:
        """One CUDA graph replay, captured the first time: a decode step's ~5 launches a layer
        (rows 1), or a prefill chunk's ~11 but its tail, for a chunk padded to `rows`."""
        if rows not in self._graphs:
            if (rows > GEMV_CHUNKED_MAX_ROWS and self.time_prefill and self.cublas is not None
                    and rows not in self.prefill_timed):
                self._graphs[rows] = self.faster_prefill_graph(rows)
                self._keep_tuning()
            else:
                if rows == 1 and self.decodes_on_step():
                    self._prepare_step()
                self._graphs[rows] = self.drv.capture(lambda: self._step(1) if rows == 1 else self._body(rows))
        self.drv.replay(self._graphs[rows])

    def faster_prefill_graph(self, rows: int):
        """The graph of a prefill chunk padded to `rows` (its ids on the stream already) on the
        fastest path for its linears on this GPU (prefill_timed, prefill_tuning): dequantize +
        cuBLAS, the same with slabs of half the L2 where that is smaller (they stay in L2
        between the two kernels, in smaller GEMMs: an Orin's 4 MiB), or our GEMM; each captured
        and timed (a warm-up and a replay each, in turn). Replaying a chunk's body again changes
        nothing: its embed rewrites h, its rows' K/V are written before any query reads them, and
        only the tail advances the position; the caller's replay of the one kept is what stays."""
        paths = ["cublas", "cublas_l2", "ours"] if self.l2_slab_bytes < DEQUANT_SLAB_BYTES else ["cublas", "ours"]
        graphs = {}
        try:
            for path in paths:
                self.prefill_timed[rows] = path
                graphs[path] = self.drv.capture(lambda: self._body(rows))
            times = self._time_graphs(graphs, replays=1)
        except BaseException:
            self.prefill_timed.pop(rows, None)
            for graph in graphs.values():
                self.drv.release(graph)
            raise
        kept = min(times, key=times.get)
        self.prefill_timed[rows] = kept
        self.prefill_tuning[rows] = {path: round(t * 1e3, 3) for path, t in times.items()}
        for path in paths:
            if path != kept:
                self.drv.release(graphs.pop(path))
        return graphs[kept]

    def uses_cublas(self, rows: int) -> bool:
        """Whether a prefill chunk of `rows` (padded) runs its linears through dequantize + cuBLAS."""
        if self.cublas is None:
            return False
        if rows in self.prefill_timed:
            return self.prefill_timed[rows] != "ours"
        return rows >= self.cublas_from_rows

    def slab_bytes_for(self, rows: int) -> int:
        """The dequantized slab's size for a prefill chunk of `rows` (padded) through cuBLAS."""
        return self.l2_slab_bytes if self.prefill_timed.get(rows) == "cublas_l2" else self.slab_bytes

    def _body(self, rows: int) -> None:
        """A step's launches up to its tail (decode on the persistent step: its one launch)."""
        if rows == 1 and self.decodes_on_step():
            self.launch_step()
        else:
            self.launch_ops(self.ops[:step_tail(self.ops)], rows)

    def _tail(self, rows: int) -> None:
        """A step's tail: the norm of its last row and the head (on the persistent step: an int4
        head's kernels, if any), then the position advanced by its rows."""
        persistent = rows == 1 and self.decodes_on_step()
        self.launch_ops(self.ops[self.step_end() if persistent else step_tail(self.ops):], rows)
        self.launch("awq_advance", (1,), (1,), [self.past, ("i32", rows)])

    def set_prefill_path(self, cublas, cublas_from_rows: int, slab_bytes: int = DEQUANT_SLAB_BYTES) -> None:
        """What prefill's linears run (a Cublas or None, from how many rows, slabs of at most
        slab_bytes: the buffer's size or less), chosen here rather than timed per chunk size;
        the captured prefill graphs, which hold the old choice, are dropped."""
        if not 0 < slab_bytes <= DEQUANT_SLAB_BYTES:
            raise ValueError(f"slab_bytes {slab_bytes} is not in 1..{DEQUANT_SLAB_BYTES}")
        self.cublas, self.cublas_from_rows, self.slab_bytes = cublas, int(cublas_from_rows), int(slab_bytes)
        self.no_cublas = None if cublas is not None else "cuBLAS not asked for"
        self.time_prefill, self.prefill_timed = False, {}
        self._drop_graphs([rows for rows in self._graphs if rows > 1])

    def _drop_graphs(self, sizes) -> None:
        """Release the captured graphs of these step sizes (they hold an old choice)."""
        for rows in sizes:
            if rows in self._graphs:
                self.drv.release(self._graphs.pop(rows))

    def set_decode_gemv(self, kind: str) -> None:
        """Which one-row GEMV decode runs (one of DECODE_GEMVS; the tensor-core one only where a
        linear's shape allows, on_tensor_cores); the captured decode graph, which holds the old
        choice, is dropped."""
        if kind not in DECODE_GEMVS:
            raise ValueError(f"decode GEMV {kind!r} is not one of {', '.join(DECODE_GEMVS)}")
        refusal = self.step_refusal() if kind == "persistent_step" else None
        if refusal:
            raise UserError(refusal)
        self.decode_gemv = kind
        self._drop_graphs([1])

    def _step(self, rows: int) -> None:
        self._body(rows)
        self._tail(rows)

    # ------------------------------------------------------------ the persistent step
    def _reset_step_queue(self) -> None:
        """Zero the persistent step's counts and queue, as each launch leaves them, but one that
        stalled: a block that gave up late may count its task after the step's end."""
        self.drv.zero(self.step_done, 4 * self.step_capacity)
        self.drv.zero(self.step_queue, 32)

    def decodes_on_step(self) -> bool:
        """Whether a decode step runs on the persistent step: asked for, or auto's as timed here."""
        return self.decode_gemv == "persistent_step" or self.decode_gemv == "auto" and self.tuned_step

    def step_refusal(self) -> str | None:
        """Why this engine cannot decode on the persistent step, or None: its GEMV bodies take
        16-byte loads only, so every linear's K % 32 == 0 (every real model's shape), and its
        attention takes STEP_HEAD_DIMS."""
        fix = "choose another decode (AWQ_EDGE_DECODE, or unset it)"
        if self.spec.act_order:
            return f"the persistent decode step does not gather GPTQ act-order inputs; {fix}"
        if any(op.kind == "add" for op in self.ops):
            return (f"the persistent decode step has no residual add of its own (OLMo 2's post-norm block, an "
                    f"unfused parallel block); {fix}")
        if self.spec.qk_norm_after_rope:
            return f"the persistent decode step does not rotate q and k before their norms (Hunyuan's); {fix}"
        if self.spec.delta:
            return (f"the persistent decode step has no gated delta net nor Mamba-2 mixer (Qwen3.5's, Granite "
                    f"4.0-H's); {fix}")
        if self.spec.attention_gate or self.spec.output_gate:
            return f"the persistent decode step does not gate the attention's output (LFM3's, AFMoE's); {fix}"
        if self.spec.conv_layers:
            return f"the persistent decode step has no short convolution (LFM2's); {fix}"
        if self.spec.clip_qkv:
            return f"the persistent decode step does not clamp q, k and v (OLMo 1's clip_qkv); {fix}"
        if self.spec.moe_layers:
            return f"the persistent decode step has no mixture of experts; {fix}"
        if self.spec.head_dim not in STEP_HEAD_DIMS:
            return (f"the persistent decode step takes head sizes {', '.join(map(str, STEP_HEAD_DIMS))}, and this "
                    f"model's is {self.spec.head_dim}; {fix}")
        ragged = next((a for a in (op.args for op in self.ops if op.kind == "linear") if a["K"] % 32), None)
        if ragged is None:
            return None
        return (f"the persistent decode step needs each linear's input width to be a multiple of 32, and "
                f"{ragged['weight']}'s is {ragged['K']}; {fix}")

    def step_blocks(self) -> int:
        """The persistent step's grid (its ops' tasks are cut for it)."""
        return STEP_BLOCKS_PER_SM * self.sm_count

    def step_end(self) -> int:
        """Where the persistent step's ops end: all a decode step's but an int4 head (its candidate
        search and re-scoring are kernels of their own, launched after the step)."""
        return next((i for i, op in enumerate(self.ops) if op.kind == "lm_head" and op.args["bits"] == 4),
                    len(self.ops))

    def step_ops(self, ops: list) -> list[tuple]:
        """ops (of one row) as plugins/kernels/decode_step.cu's StepOp rows: (kind, tasks, variant,
        args), args as launch() takes them, in the order each kind's case reads them."""
        b, w, spec, C = self.buf, self.weights, self.spec, self.max_context
        H, Hkv, D, eps = spec.heads, spec.kv_heads, spec.head_dim, ("f32", spec.eps)
        blocks = self.step_blocks()
        rows = []
        for op in ops:
            a = op.args
            if op.kind == "embed":  # variant 8: int8 rows, their scales; then GPT-2's positions and the counter
                rows.append(("embed", 1, 8 if a["scales"] else 0, [
                    self.token, w[a["table"]], b[a["out"]], ("i32", spec.hidden), ("i32", spec.vocab),
                    ("f32", a["scale"] or 1.0), w[a["scales"]] if a["scales"] else 0,
                    w[a["positions"]] if a["positions"] else 0, self.past]))
            elif op.kind == "norm":  # (the final one of the last row: the only row)
                rows.append(("norm", 1, 0, [b[a["x"]], w[a["weight"]], b[a["out"]], ("i32", spec.hidden), eps,
                                            w[a["bias"]] if a["bias"] else 0]))
            elif op.kind == "add_norm":
                rows.append(("add_norm", 1, 0, [b[a["x"]], b[a["residual"]], w[a["weight"]], b[a["out"]],
                                                ("i32", spec.hidden), eps, w[a["bias"]] if a["bias"] else 0]))
            elif op.kind == "head_norm":
                rows.append(("head_norm", a["heads"], 0, [b[a["x"]], ("i32", a["offset"]), ("i32", a["size"]),
                                                          w[a["weight"]], eps]))
            elif op.kind == "act":
                rows.append(("act", 1, 0, [b[a["x"]], b[a["out"]], ("i32", spec.intermediate),
                                           ("i32", act_code(a["kind"], a["gated"])),
                                           w[a["params"]] if a["params"] else 0]))
            elif op.kind == "attention":
                layer, qkv = a["layer"], b[a["qkv"]]
                if not a["rotated"]:
                    rows.append(("rope_store", 1, 0, [
                        qkv, qkv + 2 * H * D, qkv + 2 * (H + Hkv) * D, self.k_cache[layer], self.v_cache[layer],
                        self.past, *self.rope_tables(a["rope"]), self.q_rot, ("i32", H),
                        ("i32", Hkv), ("i32", D), ("i32", C), ("i32", spec.max_positions),
                        ("i32", spec.qkv_width), ("i32", spec.qkv_width), self.status]))
                per_head = max(1, min(self.attn_splits, blocks // H))
                rows.append(("attention", H * per_head, D, [
                    self.q_rot, self.k_cache[layer], self.v_cache[layer], self.past, b[a["out"]], self.attn_partials,
                    self.attn_counters, ("i32", H), ("i32", Hkv), ("i32", C), ("i32", spec.max_positions),
                    ("i32", a["window"]), ("f32", spec.attn_scale), ("f32", spec.attn_softcap),
                    ("i32", self.attn_splits), ("i32", per_head), w[a["sinks"]] if a["sinks"] else 0]))
            elif op.kind == "linear":
                name, n, k = a["weight"], a["N"], a["K"]
                fusion = GEMV_FUSIONS.index(f"{'norm_' if a['norm'] else ''}{a['epilogue']}")
                rope = self.rope_args(a["layer"], a["rope"]) if a["epilogue"] == "rope" else [0] * 7 + [("i32", 0)] * 5
                if k % 32:
                    raise UserError(self.step_refusal())
                at_once = self.step_rows_at_once or step_row_blocks_at_once(k)
                rows.append(("linear", min(-(-n // GEMV_ROWS_PER_BLOCK // at_once), blocks), fusion, [
                    b[a["x"]], w[f"{name}.qweight"], w[f"{name}.scales"], w[f"{name}.zeros"], b[a["out"]],
                    ("i32", n), ("i32", k), w[a["norm"]] if a["norm"] else 0, eps,
                    w[f"{name}.bias"] if a["bias"] else 0,
                    ("i32", act_code(a["act"], a["gated"]) if a["act"] else 0), *rope,
                    ("i32", at_once)]))
            elif op.kind == "lm_head" and a["bits"] in (8, 16):
                table = [w[a["table"]], w[a["scales"]]] if a["bits"] == 8 else [w[a["table"]], 0]
                rows.append(("lm_head", min(-(-spec.vocab // STEP_HEAD_ROWS), blocks), a["bits"], [
                    b[a["x"]], *table, b[a["out"]], ("i32", spec.vocab), ("i32", spec.hidden),
                    ("f32", a["softcap"]), w[a["bias"]] if a["bias"] else 0]))
            else:
                raise ValueError(f"the persistent step has no op {op.kind} ({a.get('bits', '')})")
        return rows

    def _prepare_step(self, ops: list | None = None) -> None:
        """The persistent step's StepOp table of ops (by default a decode step's, up to step_end) on
        the device, before a capture (an upload is not a graph's)."""
        rows = self.step_ops(self.ops[:self.step_end()] if ops is None else ops)
        self.drv.synchronize()  # (once per capture: the copy below must not overtake queued work)
        table = np.zeros((len(rows), 4 + STEP_ARGS), np.int64)
        first = 0
        for i, (kind, tasks, variant, args) in enumerate(rows):
            values = [a if isinstance(a, int) else a[1] if a[0] == "i32" else
                      int(np.float32(a[1]).view(np.int32)) for a in args]
            table[i, :4 + len(values)] = [STEP_KINDS[kind], tasks, first, variant, *values]
            first += tasks
        if len(rows) > self.step_capacity:
            raise ValueError(f"a persistent step of {len(rows)} ops; its table holds {self.step_capacity}")
        self.drv.upload(self.step_table, table)
        self.step_count = len(rows)

    def launch_step(self) -> None:
        """One launch of the persistent step over _prepare_step's table."""
        self.launch(f"awq_decode_step_g{self.spec.group_size}", (self.step_blocks(),),
                    (GEMV_THREADS,), [self.step_table, ("i32", self.step_count), self.step_queue, self.step_done,
                                      self.status])

    def launch_ops(self, ops: list, rows: int) -> None:
        """ops in order; each linear is told the next one's weights (the L2 prefetch)."""
        linears = [op for op in ops if op.kind == "linear"]
        next_linear = {id(op): following for op, following in zip(linears, linears[1:])}
        for op in ops:
            self.launch_op(op, rows, next_linear.get(id(op)))

    # ------------------------------------------------------------ the ops, one launch each
    def launch(self, name: str, grid: tuple, block: tuple, args: list) -> None:
        """args: device pointers (ints) and ("i32" | "f32", value) pairs, in the kernel's order."""
        from .cuda_driver import f32, i32, ptr

        values = [ptr(a) if isinstance(a, int) else (i32 if a[0] == "i32" else f32)(a[1]) for a in args]
        self.drv.launch(self.kernels[name], grid, block, values, programmatic=self.programmatic)

    def launch_op(self, op, rows: int, next_linear=None) -> None:
        """The kernel of one op for a step of `rows` tokens (reference_backend.run's mirror)."""
        a, w, b, spec = op.args, self.weights, self.buf, self.spec
        eps = ("f32", spec.eps)
        if op.kind == "embed":  # decode's id is where the sampler writes it
            ids = self.token if rows == 1 else self.ids
            tail = [b[a["out"]], ("i32", spec.hidden), ("i32", spec.vocab), ("f32", a["scale"] or 1.0)]
            if a["scales"]:
                self.launch("awq_embed_q8", (rows,), (NORM_THREADS,), [ids, w[a["table"]], w[a["scales"]], *tail])
            else:
                self.launch("awq_embed", (rows,), (NORM_THREADS,), [ids, w[a["table"]], *tail])
            if a["positions"]:  # (GPT-2's learned positions: each row's, from the device's position counter)
                self.launch("awq_add_positions", (rows,), (NORM_THREADS,),
                            [b[a["out"]], w[a["positions"]], self.past, ("i32", spec.hidden)])
        elif op.kind == "norm":
            last = a.get("last_row", False)
            self.launch("awq_norm", (1 if last else rows,), (NORM_THREADS,),
                        [b[a["x"]], w[a["weight"]], w[a["bias"]] if a["bias"] else 0, b[a["out"]],
                         ("i32", spec.hidden), eps, ("i32", rows - 1 if last else 0)])
        elif op.kind == "add_norm":
            last = a.get("last_row", False)
            self.launch("awq_add_norm", (1 if last else rows,), (NORM_THREADS,),
                        [b[a["x"]], b[a["residual"]], w[a["weight"]], w[a["bias"]] if a["bias"] else 0, b[a["out"]],
                         ("i32", spec.hidden), eps, ("i32", rows - 1 if last else 0)])
        elif op.kind == "linear":
            self.linear(op, rows, next_linear)
        elif op.kind == "add":
            self.launch("awq_residual_add", (rows,), (NORM_THREADS,),
                        [b[a["residual"]], b[a["x"]], ("i32", spec.hidden)])
        elif op.kind == "rope":
            self.launch("awq_rope_in_place", (rows,), (ROPE_THREADS,),
                        [b[a["qkv"]], self.past, *self.rope_tables(a["rope"]), ("i32", a["heads"]),
                         ("i32", spec.head_dim), ("i32", spec.qkv_width), ("i32", spec.max_positions)])
        elif op.kind == "head_norm":
            self.launch("awq_head_rms_norm", (a["heads"], rows), (NORM_THREADS,),
                        [b[a["x"]], ("i32", spec.qkv_width), ("i32", a["offset"]), ("i32", a["size"]),
                         w[a["weight"]], eps])
        elif op.kind == "attention":
            self.attention(op, rows)
        elif op.kind == "moe":
            self.experts(op, rows)
        elif op.kind == "act":
            self.launch("awq_act", (rows,), (NORM_THREADS,),  # (a["n"]: a shared expert's width, or the MLP's)
                        [b[a["x"]], b[a["out"]], ("i32", a["n"]), ("i32", act_code(a["kind"], a["gated"])),
                         w[a["params"]] if a["params"] else 0])
        elif op.kind == "gather":
            self.launch("awq_gather_columns", (rows,), (NORM_THREADS,),
                        [b[a["x"]], w[a["order"]], b[a["out"]], ("i32", a["n"])])
        elif op.kind == "head_gate":
            self.launch("awq_head_gate", (a["heads"], rows), (NORM_THREADS,),
                        [b[a["ctx"]], b[a["x"]], w[a["weight"]], ("i32", spec.hidden), ("i32", a["size"])])
        elif op.kind == "output_gate":
            self.launch("awq_output_gate", (rows,), (NORM_THREADS,), [b[a["ctx"]], b[a["x"]], ("i32", a["n"])])
        elif op.kind == "clamp":
            self.launch("awq_clamp", (rows,), (NORM_THREADS,), [b[a["x"]], ("i32", a["n"]), ("f32", a["limit"])])
        elif op.kind == "short_conv":
            self.launch("awq_short_conv", (rows,), (NORM_THREADS,),
                        [b[a["x"]], b[a["out"]], self.conv_store[a["layer"]], w[a["weight"]],
                         w[a["bias"]] if a["bias"] else 0, self.past, ("i32", spec.hidden), ("i32", spec.conv_kernel)])
        elif op.kind == "delta_conv":
            d = spec.delta
            self.launch("awq_delta_conv", (-(-d.conv_dim // DELTA_THREADS),), (DELTA_THREADS,),
                        [b[a["x"]], ("i32", d.conv_dim + d.value_dim), self.delta_state[a["layer"]], w[a["weight"]],
                         w[a["bias"]] if a["bias"] else 0, ("i32", rows), ("i32", d.conv_dim), ("i32", d.kernel)])
        elif op.kind == "delta_rule":
            d = spec.delta
            self.launch("awq_delta_rule", (d.v_heads,), (DELTA_THREADS,),
                        [b[a["x"]], ("i32", d.conv_dim + d.value_dim), b[a["normed"]], b[a["out"]],
                         self.delta_s(a["layer"]), w[a["b"]], w[a["a"]],
                         w[a["dt_bias"]], w[a["rate"]], w[a["norm"]], ("i32", rows), ("i32", spec.hidden),
                         ("i32", d.k_heads), ("i32", d.v_heads), ("i32", d.k_dim), ("i32", d.v_dim), eps])
        elif op.kind == "mamba_rule":
            d = spec.delta
            self.launch("awq_mamba_rule", (d.v_heads,), (DELTA_THREADS,),
                        [b[a["x"]], ("i32", d.conv_dim + d.value_dim), b[a["normed"]], b[a["out"]],
                         self.delta_s(a["layer"]), w[a["a"]],
                         w[a["dt_bias"]], w[a["rate"]], w[a["skip"]], ("i32", rows), ("i32", spec.hidden),
                         ("i32", d.k_heads), ("i32", d.v_heads), ("i32", d.k_dim), ("i32", d.v_dim),
                         ("f32", d.dt_min), ("f32", math.inf if d.dt_max is None else d.dt_max)])
        elif op.kind == "group_norm":
            self.launch("awq_group_norm", (rows, a["groups"]), (DELTA_THREADS,),
                        [b[a["x"]], w[a["weight"]], ("i32", spec.delta.value_dim), ("i32", a["groups"]), eps])
        elif op.kind == "lm_head" and a["bits"] == 4:
            self.rescored_head(a)
        elif op.kind == "lm_head":
            blocks = -(-spec.vocab // LM_HEAD_ROWS_PER_BLOCK)
            table = [w[a["table"]], w[a["scales"]]] if a["bits"] == 8 else [w[a["table"]]]
            self.launch("awq_lm_head_q8" if a["bits"] == 8 else "awq_lm_head", (blocks,), (NORM_THREADS,),
                        [b[a["x"]], *table, b[a["out"]], ("i32", spec.vocab), ("i32", spec.hidden),
                         ("f32", a["softcap"]), w[a["bias"]] if a["bias"] else 0])
        else:
            raise ValueError(f"unknown op {op.kind}")

    def rescored_head(self, a: dict) -> None:
        """An int4 head: the 4-bit GEMV's logits, then its top_k recomputed from the fp16 table (the
        twin is reference_backend.twin_rescored_head)."""
        w, b, spec = self.weights, self.buf, self.spec
        n, k, name = a["N"], a["K"], a["weight"]
        args = [b[a["x"]], w[f"{name}.qweight"], w[f"{name}.scales"], w[f"{name}.zeros"], b[a["out"]], ("i32", n),
                ("i32", k), ("i32", spec.vocab), ("f32", a["softcap"])]
        kind = self.gemv_kind(a)
        if kind != "cuda_cores":
            self.launch(f"awq_gemv_tc_logits_g{a['group_size']}", self.tensor_core_grid(n, kind), (GEMV_TC_THREADS,),
                        args)
        else:
            self.launch(f"awq_gemv_logits_g{a['group_size']}_w{4 if k % 32 == 0 else 1}", (n // GEMV_ROWS_PER_BLOCK,),
                        (GEMV_THREADS,), args)
        self.rescore_top_k(a)

    def rescore_top_k(self, a: dict) -> None:
        """The int4 head's top_k logits recomputed from the fp16 table: each slice's candidates,
        then the top of those, re-scored."""
        w, b, spec, top_k = self.weights, self.buf, self.spec, a["top_k"]
        slices, length = head_slices(spec.vocab)
        keys, ids = self.head_candidates, self.head_candidates + 4 * slices * top_k
        self.launch("awq_head_candidates", (slices,), (HEAD_SELECT_THREADS,),
                    [b[a["out"]], ("i32", spec.vocab), ("i32", length), ("i32", top_k), keys, ids])
        self.launch("awq_head_rescore", (-(-top_k // HEAD_RESCORE_ROWS),), (HEAD_SELECT_THREADS,),
                    [keys, ids, ("i32", slices * top_k), ("i32", top_k), b[a["x"]], w[a["exact"]],
                     ("i32", spec.hidden), ("f32", a["softcap"]), b[a["out"]]])

    def linear(self, op, rows: int, next_linear=None) -> None:
        """One row (decode): the GEMV with the op's norm prologue, bias, and act, residual or RoPE
        epilogue. More rows (prefill): the norm kernel, the product (matmul), then the bias, act,
        residual or RoPE/KV-write kernel."""
        a, w, b, spec = op.args, self.weights, self.buf, self.spec
        name, n, k, g = a["weight"], a["N"], a["K"], spec.group_size
        weights = [w[f"{name}.qweight"], w[f"{name}.scales"], w[f"{name}.zeros"]]
        bias = w[f"{name}.bias"] if a["bias"] else 0
        wide = k % 32 == 0  # rows of 16-byte aligned words: 128-bit weight loads
        if rows == 1:
            fusion = f"{'norm_' if a['norm'] else ''}{a['epilogue']}"
            rope = self.rope_args(a["layer"], a["rope"]) if a["epilogue"] == "rope" else [0] * 7 + [("i32", 0)] * 5
            prefetch = [0, ("i32", 0)]
            if next_linear is not None and self.prefetch_bytes:
                nxt = next_linear.args
                prefetch = [w[f"{nxt['weight']}.qweight"], ("i32", min(nxt["N"] * nxt["K"] // 2, self.prefetch_bytes))]
            args = [b[a["x"]], *weights, b[a["out"]], ("i32", n), ("i32", k), w[a["norm"]] if a["norm"] else 0,
                    ("f32", spec.eps), bias, ("i32", act_code(a["act"], a["gated"]) if a["act"] else 0), *rope,
                    *prefetch]
            kind = self.gemv_kind(a)
            if kind != "cuda_cores":
                self.launch(f"awq_gemv_tc_{fusion}_g{g}", self.tensor_core_grid(n, kind), (GEMV_TC_THREADS,), args)
            else:
                self.launch(f"awq_gemv_{fusion}_g{g}_w{4 if wide else 1}", (n // GEMV_ROWS_PER_BLOCK,), (GEMV_THREADS,),
                            args)
            return
        x = b[a["x"]]
        if a["norm"]:
            self.launch("awq_norm", (rows,), (NORM_THREADS,),
                        [x, w[a["norm"]], 0, b["x"], ("i32", k), ("f32", spec.eps), ("i32", 0)])
            x = b["x"]
        # the result's buffer before its epilogue kernel: "attn" is hidden wide and free when the adds are fused
        y = {"store": b[a["out"]], "rope": b[a["out"]], "act": b["gate_up"], "residual": b["attn"]}[a["epilogue"]]
        self.matmul(x, name, n, k, y, rows)
        if a["bias"]:
            self.launch("awq_bias_add", (rows,), (NORM_THREADS,), [y, bias, ("i32", n)])
        if a["epilogue"] == "act":
            self.launch("awq_act", (rows,), (NORM_THREADS,),
                        [y, b[a["out"]], ("i32", spec.intermediate), ("i32", act_code(a["act"], a["gated"])), 0])
        elif a["epilogue"] == "residual":
            self.launch("awq_residual_add", (rows,), (NORM_THREADS,), [b[a["out"]], y, ("i32", n)])
        elif a["epilogue"] == "rope":
            self.rope_store(y, a["layer"], a["rope"], rows)

    def gemv_kind(self, a: dict) -> str:
        """The one-row GEMV (GEMV_KINDS) a linear or int4 head of op args `a` runs: decode_gemv's
        choice, for auto the one timed for its role (else auto_default), where its shape allows it:
        the tensor-core GEMV takes K % 32 == 0 up to GEMV_TC_MAX_K, and RoPE at head_dim % 16 == 0."""
        kind = self.decode_gemv
        if kind in ("auto", "persistent_step"):  # (the persistent step's linears run inside it; its head as auto's)
            kind = self.tuned_gemv.get(gemv_role(a)) or auto_default(a)
        return kind if self.fits_tensor_cores(a) else "cuda_cores"

    def fits_tensor_cores(self, a: dict) -> bool:
        return (a["K"] % 32 == 0 and a["K"] <= GEMV_TC_MAX_K
                and (a.get("epilogue") != "rope" or self.spec.head_dim % GEMV_TC_ROWS == 0))

    def tensor_core_grid(self, n: int, kind: str) -> tuple[int]:
        """The tensor-core GEMV's grid for n rows: a block a 16-row tile, or on the persistent grid at
        most GEMV_TC_BLOCKS_PER_SM blocks an SM."""
        tiles = -(-n // GEMV_TC_ROWS)
        if kind == "tensor_cores_persistent":
            return (min(tiles, GEMV_TC_BLOCKS_PER_SM * self.sm_count),)
        return (tiles,)

    # ------------------------------------------------------------ the decode GEMVs timed at load
    def gemv_roles(self) -> dict[str, list]:
        """Decode's one-row GEMV ops (the linears, an int4 head) by gemv_role, in step order."""
        roles = {}
        for op in self.ops:
            if op.kind == "linear" or op.kind == "lm_head" and op.args["bits"] == 4:
                roles.setdefault(gemv_role(op.args), []).append(op)
        return roles

    def auto_choices(self) -> dict[str, str]:
        """auto's GEMV for each role now: as timed (or read from the cache), else its default."""
        saved, self.decode_gemv = self.decode_gemv, "auto"
        try:
            return {role: self.gemv_kind(ops[0].args) for role, ops in self.gemv_roles().items()}
        finally:
            self.decode_gemv = saved

    def _kinds_per_role(self) -> dict[str, list]:
        """The GEMV kinds each role's shape takes, in GEMV_KINDS's order."""
        return {role: [kind for kind in GEMV_KINDS if kind == "cuda_cores" or self.fits_tensor_cores(ops[0].args)]
                for role, ops in self.gemv_roles().items()}

    def _tuning_path(self, manifest: dict, folder, driver) -> Path | None:
        """Where this GPU's choices for this engine's kernels and shapes are kept (gpu_tuning)."""
        if folder is None and driver is None:
            try:
                from .data import cache_dir

                folder = cache_dir() / "tuning"
            except OSError:  # (no writable home: time at every load)
                return None
        if not folder:
            return None
        shapes = [[role, ops[0].args["N"], ops[0].args["K"], len(ops)] for role, ops in self.gemv_roles().items()]
        key = tuning_key(gpu=self.drv.device_name(), arch=manifest["gpu_arch"], sms=self.sm_count,
                         kernels=manifest.get("plugin_hash"), group_size=self.spec.group_size, gemvs=shapes,
                         layers=self.spec.layers, heads=[self.spec.heads, self.spec.kv_heads, self.spec.head_dim])
        return Path(folder) / f"{key}.json"

    def _read_tuning(self) -> bool:
        """Take the choices an earlier load kept for this GPU and engine, if a valid file has them."""
        cached = self.tuning_path and read_tuning(self.tuning_path, self._kinds_per_role(),
                                                  {r for r in PREFILL_GRAPH_ROWS if r > GEMV_CHUNKED_MAX_ROWS},
                                                  self.step_refusal() is None)
        if not cached:
            return False
        self.tuned_gemv, self.prefill_timed, self.tuned_step = cached["gemv"], cached["prefill"], cached["step"]
        if not cached["prefetch"]:
            self.prefetch_bytes = 0
        self.gemv_tuning = {"gemv": self.auto_choices(), "prefetch": self.prefetch_bytes > 0,
                            "persistent_step": self.tuned_step, "cached": str(self.tuning_path)}
        return True

    def _keep_tuning(self) -> None:
        if self.tuning_path is not None:
            write_tuning(self.tuning_path, self.auto_choices(), self.prefill_timed, self.prefetch_bytes > 0,
                         self.tuned_step)

    def tune_decode_gemv(self) -> dict:
        """auto's GEMV per role, timed on this GPU. For each role, each GEMV kind its shape takes
        runs the role's ops of every layer back to back in one graph, as a step runs them (the
        weights from DRAM, the launches overlapping as in a step); the fastest, if TUNE_MARGIN
        faster than auto_default, replaces it. Then the whole step (but its tail) with those
        choices against the defaults: the faster is kept (a GEMV faster alone may slow the kernels
        around it). Where GEMVs send the next linear's weights toward L2 (sm_87/sm_89, no
        overlapped launches), the step without that prefetch too: it is dropped unless it saves
        TUNE_MARGIN. Last, that step against the persistent step (where the engine's shapes
        allow it, step_refusal): auto decodes on the persistent step when it is TUNE_MARGIN faster
        and its output (the logits, or an int4 head's input) agreed with the per-op step's
        (_step_or_persistent). The timed graphs write the activations, the logits and the cache at
        the position (which the next step overwrites): call it before a prompt or between replies.
        Returns what it measured, kept in gemv_tuning: "us" (role -> kind -> microseconds),
        "step_us" (default and tuned, when they differ), "prefetch_us" (with and without),
        "persistent_step_us" (per_op and persistent, or "persistent_step_error": why it was not
        timed), "gemv" (role -> the kind it runs now), "prefetch" (whether it does),
        "persistent_step" (whether decode runs on it), "seconds" (the host's wall time for all of
        it: what it adds to loading the engine)."""
        started = time.perf_counter()
        self._zero_buffers()  # (a role's graph reads its input unwritten)
        self._keep_delta_states(self.delta_spare)  # (the steps timed run the delta nets: put back after)
        saved, self.decode_gemv, self.tuned_gemv, self.tuned_step = self.decode_gemv, "auto", {}, False
        report, chosen, fitting, on_step = {"us": {}}, {}, self._kinds_per_role(), False
        try:
            for role, ops in self.gemv_roles().items():
                default = self.gemv_kind(ops[0].args)
                kinds = [default] + [kind for kind in fitting[role] if kind != default]
                if len(kinds) == 1:
                    continue
                times = self._time_launches({kind: self._launches({role: kind}, ops) for kind in kinds})
                report["us"][role] = {kind: round(t * 1e6, 2) for kind, t in times.items()}
                best = min(times, key=times.get)
                if times[best] < (1 - TUNE_MARGIN) * times[default]:
                    chosen[role] = best
            body = self.ops[:step_tail(self.ops)]
            if chosen:
                step = self._time_launches({"default": self._launches({}, body), "tuned": self._launches(chosen, body)})
                report["step_us"] = {name: round(t * 1e6, 2) for name, t in step.items()}
                if step["tuned"] > step["default"]:
                    chosen = {}
            if self.prefetch_bytes:
                step = self._time_launches({"with": self._launches(chosen, body),
                                            "without": self._launches(chosen, body, prefetch_bytes=0)})
                report["prefetch_us"] = {name: round(t * 1e6, 2) for name, t in step.items()}
                if step["with"] > (1 - TUNE_MARGIN) * step["without"]:
                    self.prefetch_bytes = 0
            if self.step_refusal() is None:
                on_step = self._step_or_persistent(chosen, report)
        except BaseException:
            chosen, on_step = {}, False
            raise
        finally:
            self.decode_gemv, self.tuned_gemv, self.tuned_step = saved, chosen, on_step
            report["gemv"], report["prefetch"] = self.auto_choices(), self.prefetch_bytes > 0
            report["persistent_step"] = on_step
            self._restore_delta_states()
            self.drv.synchronize()
            self._drop_graphs([1])
        report["seconds"] = round(time.perf_counter() - started, 4)
        self.gemv_tuning = report
        return report

    def _step_or_persistent(self, chosen: dict, report: dict) -> bool:
        """Whether auto should decode on the persistent step: a decode step up to step_end as per-op
        launches (auto's GEMVs `chosen`) and on the persistent step, each replayed once, must give
        the same output (the logits, or an int4 head's input: within STEP_AGREEMENT of each
        other's norm, all finite, the step not stalled, the GPU not refusing its launch; else
        "persistent_step_error" says why), then both timed: the persistent step only if
        TUNE_MARGIN faster ("persistent_step_us"). With an empty cache (at load) both run at
        STEP_CHECK_POSITION of a cache filled for it (where a chat's attention has several splits
        to merge), the position put back after; else at the conversation's."""
        from .cuda_driver import CudaError

        ops = self.ops[:self.step_end()]
        out = ops[-1].args["out"]  # (the logits, fp32; else the final norm's fp16 row)
        size, dtype = (self.vocab_size, np.float32) if ops[-1].kind == "lm_head" else (self.spec.hidden, np.float16)
        graphs, outputs = {}, {}
        empty = self.position == 0
        if empty:
            at = min(STEP_CHECK_POSITION, self.max_context - 1, self.spec.max_positions - 1)
            self.drv.upload(self.past, np.array([at], np.int64))
        try:
            graphs["per_op"] = self.drv.capture(self._launches(chosen, ops))
            self._prepare_step()
            try:
                graphs["persistent"] = self.drv.capture(self.launch_step)
            except CudaError as e:  # (e.g. its registers: the per-op step's choices stand)
                report["persistent_step_error"] = f"the GPU refused it: {e}"
                return False
            for name, graph in graphs.items():
                self._clear_for_check(empty)
                self.drv.replay(graph)
                self.drv.synchronize()
                outputs[name] = np.empty(size, dtype)
                self.drv.download(outputs[name], self.buf[out])
            status = np.empty(1, np.int32)
            self.drv.download(status, self.status)
            want, got = (outputs[name].astype(np.float64) for name in ("per_op", "persistent"))
            if status[0] & STEP_STALLED:
                self.drv.zero(self.status, 4)  # (the counts and the queue: below)
                report["persistent_step_error"] = "it stalled (a task waited in vain)"
                return False
            if not (np.isfinite(want).all() and np.isfinite(got).all()
                    and np.linalg.norm(got - want) <= STEP_AGREEMENT * np.linalg.norm(want)):
                report["persistent_step_error"] = (
                    f"its {out} differed from the per-op step's by {np.linalg.norm(got - want):.3g} "
                    f"(norm {np.linalg.norm(want):.3g}), or was not finite")
                return False
            times = self._time_graphs(graphs)
        finally:
            for graph in graphs.values():
                self.drv.release(graph)
            self.drv.synchronize()  # (a memset does not wait for the stream)
            self.drv.zero(self.attn_counters, 4 * self.spec.heads)  # (as a step that went wrong may leave them)
            self._reset_step_queue()
            self.drv.upload(self.past, np.array([self.position], np.int64))
        report["persistent_step_us"] = {name: round(t * 1e6, 2) for name, t in times.items()}
        return times["persistent"] < (1 - TUNE_MARGIN) * times["per_op"]

    def _clear_for_check(self, cache: bool) -> None:
        """Zero what a step writes (the activations, rotated q, attention's partials), so that an
        output one way of running the step fails to write shows, not the other's left there; and
        where the cache is empty, fill it: keys of 0.25, values alternating 1 and -0.5 (zeros would
        make attention's output ~0, which a missing one would match)."""
        self._zero_buffers()
        self.drv.zero(self.q_rot, self.q_rot_bytes)
        self.drv.zero(self.attn_partials, self.attn_partials_bytes)
        if cache:
            words = self.layer_kv_bytes // 4  # (2 fp16 a word)
            for layer in (i for i in range(self.spec.layers) if self.k_cache[i]):
                self.drv.fill32(self.k_cache[layer], words, 0x34003400)
                self.drv.fill32(self.v_cache[layer], words, 0xB8003C00)

    def _zero_buffers(self) -> None:
        """Zero the activation buffers (after what the stream has queued: a memset does not wait)."""
        self.drv.synchronize()
        for name, nbytes in self.buf_bytes.items():
            self.drv.zero(self.buf[name], nbytes)

    def _launches(self, choice: dict, ops: list, prefetch_bytes: int | None = None):
        """What a graph captures: ops for one row, with auto's GEMV per role `choice` (and the L2
        prefetch of so many bytes: by default the backend's)."""
        def launches():
            saved = self.tuned_gemv, self.prefetch_bytes
            self.tuned_gemv = choice
            self.prefetch_bytes = saved[1] if prefetch_bytes is None else prefetch_bytes
            try:
                self.launch_ops(ops, 1)
            finally:
                self.tuned_gemv, self.prefetch_bytes = saved
        return launches

    def _time_launches(self, variants: dict) -> dict[str, float]:
        """_time_graphs of each variant's launches (name -> a function making them), captured here
        and freed after."""
        graphs = {}
        try:
            for name, launches in variants.items():
                graphs[name] = self.drv.capture(launches)
            return self._time_graphs(graphs)
        finally:
            for graph in graphs.values():
                self.drv.release(graph)

    def _time_graphs(self, graphs: dict, replays: int = TUNE_REPLAYS) -> dict[str, float]:
        """Seconds of GPU time a replay of each graph takes (name -> graph), by CUDA events: a
        warm-up, then `replays` replays each in turn, the median."""
        start, end = self.timer
        times = {name: [] for name in graphs}
        for replay in range(replays + 1):
            for name, graph in graphs.items():
                self.drv.record(start)
                self.drv.replay(graph)
                self.drv.record(end)
                self.drv.wait(end)
                if replay:
                    times[name].append(self.drv.elapsed(start, end))
        return {name: float(np.median(t)) for name, t in times.items()}

    def matmul(self, x: int, name: str, n: int, k: int, y: int, rows: int) -> None:
        """y[rows, n] = x[rows, k] @ W_hat^T of linear `name` for rows > 1, rounded to fp16: dequantize
        + cuBLAS from cublas_from_rows rows (when found), else up to 32 rows a GEMV (the GEMM's
        64-row tiles would be mostly empty): where K % 32 == 0 the tensor-core one, all the rows in
        one pass, else the CUDA-core one 8 rows at a time; else the tensor-core GEMM."""
        w, g = self.weights, self.spec.group_size
        weights = [w[f"{name}.qweight"], w[f"{name}.scales"], w[f"{name}.zeros"]]
        wide = k % 32 == 0  # rows of 16-byte aligned words: 128-bit weight loads
        if self.uses_cublas(rows):
            try:
                self.dequantized_matmul(x, name, n, k, y, rows)
                return
            except CublasUnavailable as e:  # e.g. a shape it refuses: ours from here on, y written whole below
                self.cublas, self.no_cublas = None, f"cuBLAS failed: {e}"
        if 2 <= rows <= GEMV_CHUNKED_MAX_ROWS and wide:  # as awq_w4a16_matmul: on tensor cores, one pass
            self.launch(f"awq_gemv_mma{mma_rows_suffix(rows)}_g{g}", (-(-n // GEMV_MMA_ROWS_PER_BLOCK),),
                        (GEMV_THREADS,), [x, *weights, y, ("i32", rows), ("i32", n), ("i32", k)])
        elif rows <= GEMV_CHUNKED_MAX_ROWS:  # the CUDA-core GEMV, 8 rows at a time
            for m0 in range(0, rows, GEMV_MAX_ROWS):
                m = min(GEMV_MAX_ROWS, rows - m0)
                self.launch(f"awq_gemv_rows{m}_g{g}_w{4 if wide else 1}", (n // GEMV_ROWS_PER_BLOCK,), (GEMV_THREADS,),
                            [x + 2 * m0 * k, *weights, y + 2 * m0 * n, ("i32", n), ("i32", k)])
        else:
            grid = (*gemm_grid(rows, n), gemm_split_count(rows, n, k, self.sm_count))
            self.launch(f"awq_gemm_g{g}_v{1 if wide else 0}", grid, (GEMM_THREADS,),
                        [x, *weights, y, ("i32", rows), ("i32", n), ("i32", k), self.gemm_partials, self.gemm_counters])

    def dequantized_matmul(self, x: int, name: str, n: int, k: int, y: int, rows: int) -> None:
        """y[rows, n] = x[rows, k] @ W_hat^T as our GEMM computes it, a slab of weight rows at a
        time: dequantized to fp16 (awq_dequantize, rounded as our kernels round), then cuBLAS's
        fp16 GEMM with fp32 accumulation into the slab's columns of y."""
        w, g = self.weights, self.spec.group_size
        groups = -(-k // g)
        slab = slab_rows(n, k, self.slab_bytes_for(rows))
        for n0 in range(0, n, slab):
            rows_here = min(slab, n - n0)
            self.launch(f"awq_dequantize_g{g}", (-(-rows_here * k // 8 // DEQUANT_THREADS),), (DEQUANT_THREADS,),
                        [w[f"{name}.qweight"] + n0 * k // 2, w[f"{name}.scales"] + 2 * n0 * groups,
                         w[f"{name}.zeros"] + 2 * n0 * groups, self.dequant_slab, ("i32", rows_here), ("i32", k)])
            self.cublas.gemm_wt(self.dequant_slab, x, y + 2 * n0, n=rows_here, rows=rows, k=k, ldc=n)

    def rope_args(self, layer: int, rope: int) -> list:
        """The GEMV's RoPE epilogue arguments (plugins/kernels/gemv_w4a16.cu RopeArgs), in order."""
        spec, w = self.spec, self.weights
        return [w[f"rope.{rope}.cos"], w[f"rope.{rope}.sin"], self.q_rot, self.k_cache[layer], self.v_cache[layer],
                self.past, self.status, ("i32", spec.heads), ("i32", spec.kv_heads), ("i32", spec.head_dim),
                ("i32", self.max_context), ("i32", spec.max_positions)]

    def rope_tables(self, rope: int | None) -> list:
        """The cos and sin tables of RoPE `rope`, or null pointers (None: q and k rotated already)."""
        return [0, 0] if rope is None else [self.weights[f"rope.{rope}.cos"], self.weights[f"rope.{rope}.sin"]]

    def rope_store(self, qkv: int, layer: int, rope: int | None, rows: int) -> None:
        """RoPE of q (into q_rot) and k, and the KV rows written in place (plugins/kernels/attention.h)."""
        spec = self.spec
        H, Hkv, D = spec.heads, spec.kv_heads, spec.head_dim
        k, v = qkv + 2 * H * D, qkv + 2 * (H + Hkv) * D  # byte offsets of k and v in a fused row
        self.launch("awq_rope_store", (rows,), (ROPE_THREADS,),
                    [qkv, k, v, self.k_cache[layer], self.v_cache[layer], self.past, *self.rope_tables(rope),
                     self.q_rot, ("i32", rows), ("i32", H), ("i32", Hkv), ("i32", D),
                     ("i32", self.max_context), ("i32", spec.max_positions), ("i32", spec.qkv_width),
                     ("i32", spec.qkv_width), self.status])

    def attention(self, op, rows: int) -> None:
        """RoPE and the KV write (unless the q/k/v linear's epilogue did them), then attention."""
        a, spec = op.args, self.spec
        H, Hkv, D, layer = spec.heads, spec.kv_heads, spec.head_dim, a["layer"]
        if not a["rotated"]:
            self.rope_store(self.buf[a["qkv"]], layer, a["rope"], rows)
        out = self.buf[a["out"]]
        limits = [("i32", self.max_context), ("i32", spec.max_positions), ("i32", a["window"]),
                  ("f32", spec.attn_scale), ("f32", spec.attn_softcap),
                  self.weights[a["sinks"]] if a["sinks"] else 0]  # (and the sinks: gpt-oss's, Granite SWA's)
        if rows == 1:  # decode: the context split over blocks (flash-decoding), merged by each head's last block
            self.launch(f"awq_attend_split_d{D}", (H, self.attn_splits), (ATTEND_SPLIT_KEYS,),
                        [self.q_rot, self.k_cache[layer], self.v_cache[layer], self.past, out, self.attn_partials,
                         self.attn_counters, ("i32", H), ("i32", Hkv), *limits])
        else:  # 16 rows or more: blocks of 64 tokens share each K/V tile, on tensor cores
            if rows >= ATTEND_BLOCK_QUERIES:
                name, grid = f"awq_attend_mma_d{D}", (H, -(-rows // ATTEND_MMA_QUERIES))
            else:  # a few rows: a block per (head, token), more blocks to spread
                name, grid = f"awq_attend_d{D}", (H, rows)
            self.launch(name, grid, (ATTEND_THREADS,),
                        [self.q_rot, self.k_cache[layer], self.v_cache[layer], self.past, out, ("i32", rows),
                         ("i32", H), ("i32", Hkv), *limits])

    def experts(self, op, rows: int) -> None:
        """A mixture of experts' layer (plugins/kernels/moe.cu): the input normed into x (unless an op
        before did, as a linear's prefill norms it), each row's experts chosen on the device, each chosen
        expert's gate/up then down GEMV (gpt-oss's gate/up stored, its clamped SwiGLU a kernel of its
        own), and their weighted sum (with the shared expert's output, which the ops before computed)
        into out."""
        a, w, b, spec = op.args, self.weights, self.buf, self.spec
        E, W, H, k, g = spec.experts, spec.expert_width, spec.hidden, spec.experts_per_token, spec.group_size
        x = b[a["x"]]
        if a["norm"]:
            self.launch("awq_norm", (rows,), (NORM_THREADS,),
                        [x, w[a["norm"]], 0, b["x"], ("i32", H), ("f32", spec.eps), ("i32", 0)])
            x = b["x"]
        ids, weights = b["moe_ids"], b["moe_weights"]
        self.launch("awq_moe_route", (rows,), (MOE_THREADS,),
                    [x, w[a["router"]], w[a["router_bias"]] if a["router_bias"] else 0,
                     w[a["bias"]] if a["bias"] else 0, ids, weights, ("i32", E), ("i32", H), ("i32", k),
                     ("i32", int(a["normalize"])), ("i32", int(a["sigmoid"])), ("f32", a["scale"])])

        def expert_gemv(part: str, fusion: str, src: int, strides: tuple, n: int, width: int, out: int) -> None:
            name = f"{a['experts']}.{part}"
            wide = 4 if width % 32 == 0 else 1  # (16-byte weight loads)
            self.launch(f"awq_moe_gemv_{fusion}_g{g}_w{wide}", (n // GEMV_ROWS_PER_BLOCK, k, rows), (GEMV_THREADS,),
                        [src, ("i32", strides[0]), ("i32", strides[1]), ids, ("i32", k), ("i32", E),
                         w[f"{name}.qweight"], w[f"{name}.scales"], w[f"{name}.zeros"],
                         w[f"{name}.bias"] if a["swiglu"] else 0, out, ("i32", n), ("i32", width),
                         ("i32", act_code("silu", True))])

        # gate/up reads each row's x for every slot (strides: a row, a slot); down reads each slot's act
        if a["swiglu"]:  # (gpt-oss's: gate/up stored with its biases, then its clamped SwiGLU)
            expert_gemv("gate_up", "store", x, (H, 0), 2 * W, H, b["moe_gate_up"])
            alpha, limit = a["swiglu"]
            self.launch("awq_moe_swiglu", (rows * k,), (MOE_THREADS,),
                        [b["moe_gate_up"], b["moe_act"], ("i32", W), ("f32", alpha), ("f32", limit)])
        else:
            expert_gemv("gate_up", "act", x, (H, 0), 2 * W, H, b["moe_act"])
        expert_gemv("down", "store", b["moe_act"], (k * W, W), H, W, b["moe_out"])
        self.launch("awq_moe_combine", (rows,), (MOE_THREADS,),
                    [b["moe_out"], weights, ("i32", k), b["shared"] if a["shared"] else 0,
                     w[a["shared_gate"]] if a["shared_gate"] else 0, x, b[a["out"]], ("i32", H)])

    # ------------------------------------------------------------ logits and sampling
    def logits_to_host(self, device_ptr: int) -> np.ndarray:
        host, status = np.empty(self.vocab_size, np.float32), np.empty(1, np.int32)
        self.drv.download(host, device_ptr)
        self.drv.download(status, self.status)
        self._check_status(int(status[0]))
        return host

    def _check_status(self, status: int) -> None:
        """The attention kernels flag a step whose rows did not fit the cache (the host's
        position check, decoder.step_ids, should make that impossible: the device's counter
        disagreed); the persistent step one whose task waited in vain. Either way the cache no
        longer matches the tokens: start over from an empty one. A persistent step that auto
        took (tuned_step) is given up for the per-op step, here and in the tuning file."""
        if status == 0:
            return
        self.drv.synchronize()  # (a step may be running ahead)
        self.drv.zero(self.status, 4)
        self.rewind(0)
        self.seen_mirror = []
        what = ("the GPU's persistent decode step stalled" if status & STEP_STALLED else
                "the GPU's KV cache position went past its capacity")
        if status & STEP_STALLED:
            self._reset_step_queue()
            if self.tuned_step:
                self.tuned_step = False
                self._drop_graphs([1])
                self._keep_tuning()
                if self.gemv_tuning:
                    self.gemv_tuning["persistent_step"] = False
                what += " (decode goes on without it)"
        raise UserError(f"{what} (an engine bug, please report it); the conversation was reset: send the request "
                        "again")

    def sample_token(self, device_ptr: int, settings, seen_ids, uniform: float) -> int:
        """The next token by the Sampler's rule, chosen on the GPU. The history the repetition
        penalty reads stays on the device: only the ids it lacks are uploaded."""
        self._queue_sample(device_ptr, settings, seen_ids, uniform)
        return self._sampled_token(seen_ids)

    def sample_and_feed(self, device_ptr: int, settings, seen_ids, uniform: float) -> tuple[int, DeviceLogits]:
        """sample_token, and the decode step that feeds the chosen token queued behind it before the
        host reads the token back: the GPU computes the next logits while the host handles this
        token. (token, those logits); the caller that stops at this token takes the step back with
        rewind(position - 1)."""
        step_ids([0], self.position, self.max_context, self.vocab_size)  # room for one more
        self._queue_sample(device_ptr, settings, seen_ids, uniform)
        self._replay(1)
        self.position = fed = self.position + 1
        try:
            token = self._sampled_token(seen_ids)
        except BaseException:  # no token (or Ctrl-C while waiting): the step fed nothing the caller keeps
            if self.position == fed:  # (an over-capacity flag has reset the cache already)
                self.rewind(fed - 1)
            raise
        return token, DeviceLogits(self, self.buf["logits"], self.vocab_size)

    def _queue_sample(self, device_ptr: int, settings, seen_ids, uniform: float) -> None:
        """The sampler's launch, the copy of its token to host_token and the event `sampled`, queued."""
        self._sync_history(seen_ids)
        draw = fp32_draw(uniform)
        if draw != self.draw_on_device:  # (greedy: never)
            self.host_draw[0] = draw      # page-locked: the copy does not wait for a step running ahead
            self.drv.upload_async(self.uniform, self.host_draw)
            self.draw_on_device = draw
        self.launch("awq_sample_step", (1,), (SAMPLE_THREADS,),
                    [device_ptr, ("i32", self.vocab_size), self.seen, self.n_seen, ("i32", self.max_context),
                     ("f32", settings.repetition_penalty), ("f32", settings.temperature), ("i32", settings.top_k),
                     ("f32", settings.top_p), self.uniform, self.sample_work, self.token])
        self.drv.download_async(self.host_token, self.token)  # the token and the attention status
        self.drv.record(self.sampled)

    def _sync_history(self, seen_ids) -> None:
        """Queue what makes the device's repetition-penalty history (`seen`, `n_seen`) the last
        max_context of seen_ids: only the ids it lacks. The engine's list only grows, by the token
        the sampler chose and appended on the device too, which takes O(1) to check (the same
        list, one id longer, ending in that token), where copying and comparing the whole history
        every token grows with the context; any other list is compared with the mirror."""
        mirror, source, self.seen_source = self.seen_mirror, self.seen_source, None  # (set again once read)
        if seen_ids is source and len(seen_ids) == len(mirror) < self.max_context and seen_ids[-1] == mirror[-1]:
            return
        seen = list(seen_ids)[-self.max_context:]
        if seen[:len(mirror)] != mirror:  # another history (a new prompt): upload it whole
            mirror = []
        if len(seen) > len(mirror):  # else the device holds the history, and its count
            # (pageable: these live until the wait for `sampled`, after which the copies have run)
            self.uploads = np.array(seen[len(mirror):], np.int32), np.array([len(seen)], np.int32)
            self.drv.upload_async(self.seen + 4 * len(mirror), self.uploads[0])
            self.drv.upload_async(self.n_seen, self.uploads[1])
        self.seen_mirror = seen

    def _sampled_token(self, seen_ids) -> int:
        """Wait for the sampler (not for a step queued behind it) and read its token."""
        self.drv.wait(self.sampled)
        token, status = (int(v) for v in self.host_token)
        self._check_status(status)
        if token < 0:  # the kernel found no logit above -inf (NaN counts as -inf)
            self.seen_mirror = []  # (the device's history is uploaded whole next time)
            raise UserError(NO_USABLE_LOGITS)
        if len(self.seen_mirror) < self.max_context:  # the sampler appended it on the device
            self.seen_mirror.append(token)
        self.seen_source = seen_ids
        return token


# The one-row GEMVs' fusions (gemv_w4a16.cu AWQ_GEMV_FUSIONS): an entry of each on CUDA cores
# (per group size and load width) and on tensor cores (per group size).
GEMV_FUSIONS = ("store", "norm_store", "act", "norm_act", "residual", "rope", "norm_rope")

# Which kernels each cubin (plugins.CUBIN_SOURCES) provides to this backend.
KERNELS_OF = {
    "gemv_w4a16": [f"awq_gemv_{fusion}_g{g}_w{w}" for fusion in GEMV_FUSIONS for g in (32, 64, 128) for w in (1, 4)] +
                  [f"awq_gemv_rows{m}_g{g}_w{w}" for m in range(1, 9) for g in (32, 64, 128) for w in (1, 4)] +
                  [f"awq_gemv_mma{suffix}_g{g}" for suffix in ("", "_x16", "_x32") for g in (32, 64, 128)] +
                  [f"awq_gemv_logits_g{g}_w{w}" for g in (32, 64, 128) for w in (1, 4)] +
                  [f"awq_gemv_tc_{fusion}_g{g}" for fusion in (*GEMV_FUSIONS, "logits") for g in (32, 64, 128)],
    "gemm_w4a16": [f"awq_gemm_g{g}_v{v}" for g in (32, 64, 128) for v in (0, 1)] +
                  [f"awq_dequantize_g{g}" for g in (32, 64, 128)],
    "attention": ["awq_rope_store", "awq_rope_in_place"] +
                 [f"awq_attend{kind}_d{d}" for kind in ("", "_split", "_mma") for d in HEAD_DIMS] +
                 [f"awq_attend_block_d{d}" for d in (64, 128, 256)],  # (benchmarks/cuda_attention.py's)
    "sample": ["awq_sample_step"],
    "head_top_k": ["awq_head_candidates", "awq_head_rescore"],
    "decode_step": [f"awq_decode_step_g{g}" for g in (32, 64, 128)],
    "decoder_ops": ["awq_embed", "awq_embed_q8", "awq_norm", "awq_add_norm", "awq_head_rms_norm", "awq_bias_add",
                    "awq_act", "awq_residual_add", "awq_gather_columns", "awq_clamp", "awq_short_conv",
                    "awq_head_gate", "awq_output_gate",
                    "awq_add_positions", "awq_lm_head", "awq_lm_head_q8", "awq_advance"],
    "delta_net": ["awq_delta_conv", "awq_delta_rule", "awq_mamba_rule", "awq_group_norm"],
    "moe": ["awq_moe_route", "awq_moe_swiglu", "awq_moe_combine"] +
           [f"awq_moe_gemv_{fusion}_g{g}_w{w}" for fusion in ("act", "store") for g in (32, 64, 128) for w in (1, 4)],
}
