"""Helpers shared by the native-engine tests, CPU and GPU (no tests here; numpy only, so the
bare GPU machine imports it too).

- teacher_forced: run two backends over the same ids (the prompt, then one token per step) and
  report each step's relative logit error and where their argmaxes disagree although the
  reference's top two are further apart than that error allows.
- cubin_kernels: each kernel's parameter offsets and sizes and its block-size bound, read from
  the cubin's ELF sections (no GPU, no cuobjdump).
- read_native_engine: a native engine folder's manifest and decoder info, checked as Engine.load does.
- RecordingDriver: the cuda backend's driver where there is no GPU, recording its launches; its
  timing events read a clock that each graph replay advances by its launches' `cost`.
- MemoryDriver: a RecordingDriver whose device memory is host memory, and which runs the kernels
  it is given numpy twins of (to check the host side's pointer arithmetic with real numbers).
- RecordingCublas: stands in for awq_edge.cublas.Cublas: records each GEMM, or with a
  MemoryDriver computes it.
- emulate_mma_16816: one tensor-core instruction over a warp's fragments, with the layouts of
  plugins/kernels/mma.cuh, for running a kernel's fragment plan lane by lane.
- attention_f64: causal (windowed, soft-capped) attention over a KV cache in float64, what the
  attention twins and plans are checked against.
- on_device: fresh device copies of named arrays, freed afterwards (a context manager).
- fused_gemv_error: one decode GEMV entry point (CUDA cores or tensor cores) on fresh random
  data with poisoned outputs, through any driver (the GPU's, or EmulatedDriver), against the
  twins of what it fuses.
- split_attention_errors: the decode attention kernel (flash-decoding splits) through any driver,
  against its twin, at successive positions.
- select_plan, head_candidates_twin, head_rescore_twin: the int4 head's candidate search as
  plugins/kernels/select.cuh and head_top_k.cu do it, step by step and block by block;
  tie_heavy_logits, what they are tested on.
"""
from __future__ import annotations

import ctypes
import json
import functools
import mmap
from contextlib import contextmanager

import numpy as np


def teacher_forced(backend, reference, ids: list[int], prompt: int, margin: float = 4.0, logits=None):
    """(errors per step, steps whose argmax differs by more than a near-tie); the backend's logits
    of each step appended to `logits` if given."""
    errors, disagreements = [], []
    for step in [ids[:prompt]] + [[t] for t in ids[prompt:]]:
        a, b = np.asarray(backend.forward(step)), np.asarray(reference.forward(step))
        if logits is not None:
            logits.append(a.copy())
        errors.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
        if a.argmax() != b.argmax() and not near_tie(b, a.argmax(), margin * errors[-1] * np.abs(b).max()):
            disagreements.append(len(errors) - 1)
    return errors, disagreements


def round_embedding_int8(ckpt) -> None:
    """The checkpoint's embedding table rounded through a cuda engine's int8 rows, in place: an ORT
    engine of it then holds what the cuda engine's embedding reads, and a comparison of the two
    checks their arithmetic, not int8 quantization (benchmarks/embedding_int8_quality.py measures
    that). A fresh checkpoint's file only: hard-linked copies must not be written in place."""
    from safetensors.numpy import load_file, save_file

    from awq_edge.families import family_for
    from awq_edge.packing import dequantize_rows_int8, quantize_rows_int8

    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    family = family_for(json.loads((ckpt / "config.json").read_text())["model_type"])
    name = family.their_name("model.embed_tokens.weight")  # (as stored: GPT-NeoX's gpt_neox.embed_in)
    table = tensors[name]
    tensors[name] = dequantize_rows_int8(*quantize_rows_int8(table)).astype(table.dtype)
    path.unlink()
    save_file(tensors, path, metadata={"format": "pt"})


def near_tie(reference_logits: np.ndarray, token: int, tolerance: float) -> bool:
    """Whether `token` is within `tolerance` of the reference's best logit."""
    return float(reference_logits.max() - reference_logits[token]) <= tolerance


# ---------------------------------------------------------------- what a cubin says about its kernels
# A cubin is an ELF file. Each kernel's section .nv.info.<name> is a list of attributes, each
# (u8 format, u8 id, then a u16 value, or for format 4 a u16 size and that many bytes), 4-byte
# aligned. Two ids matter here (the values cuobjdump -elf prints for them):
EIATTR_MAX_THREADS = 0x05   # u32 x, y, z: the block size __launch_bounds__ allows
EIATTR_KPARAM_INFO = 0x17   # one per parameter: u32 index, u16 ordinal, u16 offset, u32 flags (size = bits 18..31)
EIFMT_SVAL = 4


def elf_sections(data: bytes) -> dict[str, bytes]:
    """name -> contents of each section of a 64-bit little-endian ELF file."""
    import struct

    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a 64-bit little-endian ELF file"
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * entsize) for i in range(count)]
    names_at = headers[names_index][4]

    def name(offset: int) -> str:
        start = names_at + offset
        return data[start:data.index(b"\0", start)].decode()

    return {name(h[0]): data[h[4]:h[4] + h[5]] for h in headers}


def elf_static_objects(data: bytes) -> tuple[dict[str, list], dict[str, int]]:
    """A shared library's function-local statics (symbols "_ZZ...": the kernels' __shared__
    variables, under emulate.h) by the source file each came from (its STT_FILE symbol: the
    linker lists each object's local symbols after it), as (offset, size) pairs, those with
    external linkage under "" (the emulation's own, in namespace cuda_on_cpu, left out); and every
    defined symbol's offset by name."""
    import struct
    from pathlib import Path

    sections = elf_sections(data)
    table, names = sections[".symtab"], sections[".strtab"]
    statics, offsets, source = {}, {}, ""
    for at in range(0, len(table), 24):
        name_at, info, _, section, value, size = struct.unpack_from("<IBBHQQ", table, at)
        name = names[name_at:names.index(b"\0", name_at)].decode()
        kind, local = info & 0xF, info >> 4 == 0
        if kind == 4:  # STT_FILE
            source = Path(name).stem
        elif section != 0:
            offsets[name] = value
            if kind == 1 and name.startswith("_ZZ") and "11cuda_on_cpu" not in name:  # STT_OBJECT
                statics.setdefault(source if local else "", []).append((value, size))
    return statics, offsets


def cubin_kernels(cubin: bytes) -> dict[str, dict]:
    """kernel name -> {"params": [(offset, size) in ordinal order], "max_threads": x*y*z or None}."""
    import struct

    kernels = {}
    for section, info in elf_sections(cubin).items():
        if not section.startswith(".nv.info."):
            continue
        params, max_threads, at = {}, None, 0
        while at < len(info):
            fmt, attr = info[at], info[at + 1]
            size = struct.unpack_from("<H", info, at + 2)[0] if fmt == EIFMT_SVAL else 0
            value = info[at + 4:at + 4 + size]
            at += 4 + size
            if attr == EIATTR_KPARAM_INFO:
                _index, ordinal, offset, flags = struct.unpack("<IHHI", value)
                params[ordinal] = (offset, flags >> 18)
            elif attr == EIATTR_MAX_THREADS:
                x, y, z = struct.unpack("<III", value)
                max_threads = x * y * z
        kernels[section[len(".nv.info."):]] = {"params": [params[i] for i in sorted(params)],
                                               "max_threads": max_threads}
    return kernels


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module (its helpers; main() not run)."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_native_engine(path):
    """(manifest, DecoderInfo) of a native engine folder, read and checked as Engine.load reads them."""
    from awq_edge.engine_dir import check_files, read_decoder_info, read_manifest

    manifest = read_manifest(path)
    return manifest, read_decoder_info(path, check_files(path, manifest["files"]))


class FakeEvent:
    """An event of the drivers below: when it ran, on their clock (compared by identity)."""
    time = None


class RecordingDriver:
    """Stands in for cuda_driver.Driver where there is no GPU, to see which kernels the cuda
    backend launches with which arguments: allocations are distinct fake addresses, copies do
    nothing, downloads read zeros, launches are recorded (name, grid, block, ctypes values).
    Time is a clock a replay advances by cost(kernel name, grid) of each launch in its graph: what
    tune_decode_gemv reads through events and elapsed. A launch costs, per block, the seconds of
    the first name substring in `costs` it contains (else 0.1 us; the persistent decode step's
    blocks 1 s, so that the timing at load never takes it unless a test says), plus `slowed` when
    it is of slowed_after's second kernel right after one of its first (a kernel fast alone that
    slows the next)."""

    def __init__(self):
        self.next_address, self.launches, self.kernel_info = 1 << 32, [], {}
        self.allocated = 0  # bytes asked for
        self.captures = self.replays = self.released = 0  # graphs captured, graph launches, graphs freed
        self.graphs, self.clock, self.previous = {}, 0.0, ""
        self.costs, self.slowed_after, self.slowed = {}, ("", ""), 0.0

    def cost(self, name: str, grid: tuple, args: list = ()) -> float:
        per_block = next((c for part, c in self.costs.items() if part in name),
                         1.0 if name.startswith("awq_decode_step") else 1e-7)
        first, then = self.slowed_after
        after = bool(first) and first in self.previous and then in name
        self.previous = name
        return per_block * int(np.prod(grid)) + (self.slowed if after else 0.0)

    def load_module(self, cubin: bytes) -> dict:
        return cubin_kernels(cubin)

    def function(self, module: dict, name: str) -> str:
        assert name in module, f"kernel {name} is not in its cubin (which has {sorted(module)})"
        self.kernel_info[name] = module[name]
        return name

    def memory_info(self) -> tuple[int, int]:
        return 1 << 40, 1 << 40

    def l2_cache_bytes(self) -> int:
        return 4 << 20  # an Orin's

    def multiprocessor_count(self) -> int:
        return 2  # (few: a persistent grid's blocks each take several tiles)

    def device_name(self) -> str:
        return "recording driver"

    def alloc(self, nbytes: int) -> int:
        address = self.next_address
        self.next_address += -(-max(int(nbytes), 1) // 256) * 256
        self.allocated += int(nbytes)
        return address

    @property
    def launch_count(self) -> int:
        return len(self.launches)

    def copy(self, dst, src, nbytes): pass
    def upload(self, device_ptr, array): pass
    def upload_async(self, device_ptr, array): pass
    def zero(self, device_ptr, nbytes): pass
    def fill32(self, device_ptr, count, word): pass
    def synchronize(self): pass
    def wait(self, event): pass

    def event(self, timing=False):
        return FakeEvent()

    def record(self, event):
        event.time = self.clock

    def elapsed(self, start, end) -> float:
        return end.time - start.time

    def release(self, executable):
        self.released += 1

    def host_array(self, count, dtype):
        return np.zeros(count, dtype)

    def replay(self, executable):
        self.replays += 1
        self.clock += sum(self.cost(name, grid, args) for name, grid, _, args in self.graphs[executable])

    def download(self, array, device_ptr):
        array[...] = 0

    download_async = download

    def launch(self, fn, grid, block, args, shared_bytes=0, programmatic=False):
        self.launches.append((fn, tuple(grid), tuple(block), list(args)))
        self.programmatic = programmatic

    def capture(self, launches):
        self.captures += 1
        before = len(self.launches)
        launches()
        self.graphs[f"graph {self.captures}"] = self.launches[before:]
        return f"graph {self.captures}"


class MemoryDriver(RecordingDriver):
    """Allocations are host arrays: uploads land in them and downloads read them. A launch of a
    kernel named in `twins` (name -> fn(driver, args as Python numbers)) runs the twin."""

    def __init__(self, twins: dict | None = None):
        super().__init__()
        self.memory: dict[int, np.ndarray] = {}
        self.twins = twins or {}

    def alloc(self, nbytes: int) -> int:
        address = super().alloc(nbytes)
        self.memory[address] = np.zeros(max(int(nbytes), 1), np.uint8)
        return address

    def bytes_at(self, address: int, nbytes: int) -> np.ndarray:
        """The uint8 view of [address, address + nbytes), which must lie inside one allocation."""
        base = max((b for b in self.memory if b <= address), default=None)
        assert base is not None and address + nbytes <= base + self.memory[base].size, \
            f"{nbytes} bytes at {address:#x} are outside every allocation"
        return self.memory[base][address - base:address - base + nbytes]

    def array_at(self, address: int, dtype, shape) -> np.ndarray:
        return self.bytes_at(address, int(np.prod(shape)) * np.dtype(dtype).itemsize).view(dtype).reshape(shape)

    def upload(self, device_ptr, array):
        self.bytes_at(device_ptr, array.nbytes)[:] = np.ascontiguousarray(array).reshape(-1).view(np.uint8)

    upload_async = upload

    def download(self, array, device_ptr):
        array.reshape(-1).view(np.uint8)[:] = self.bytes_at(device_ptr, array.nbytes)

    download_async = download

    def zero(self, device_ptr, nbytes):
        self.bytes_at(device_ptr, nbytes)[:] = 0

    def fill32(self, device_ptr, count, word):
        self.bytes_at(device_ptr, 4 * count).view(np.uint32)[:] = word

    def launch(self, fn, grid, block, args, shared_bytes=0, programmatic=False):
        super().launch(fn, grid, block, args, shared_bytes, programmatic)
        if fn in self.twins:
            self.twins[fn](self, [a.value for a in args])


class RecordingCublas:
    """cublas.Cublas's gemm_wt, recorded; on a driver whose memory the host reads (MemoryDriver,
    EmulatedDriver: array_at) also computed (float32, rounded to fp16), in a graph the driver is
    capturing at each replay, as the GPU's cuBLAS would be."""

    def __init__(self, driver=None):
        self.calls, self.driver = [], driver

    def gemm_wt(self, w, x, y, n, rows, k, ldc):
        self.calls.append(dict(w=w, x=x, y=y, n=n, rows=rows, k=k, ldc=ldc))
        if not hasattr(self.driver, "array_at"):
            return

        def gemm():
            weights = self.driver.array_at(w, np.float16, (n, k)).astype(np.float32)
            inputs = self.driver.array_at(x, np.float16, (rows, k)).astype(np.float32)
            out = self.driver.array_at(y, np.float16, ((rows - 1) * ldc + n,))
            product = (inputs @ weights.T).astype(np.float16)
            for r in range(rows):
                out[r * ldc:r * ldc + n] = product[r]

        if hasattr(self.driver, "enqueue"):
            self.driver.enqueue(gemm)
        else:
            gemm()


LANE_G, LANE_T = np.arange(32) // 4, np.arange(32) % 4  # a lane's fragment group and its place in it


def emulate_mma_16816(acc: np.ndarray, a: np.ndarray, b: np.ndarray) -> None:
    """acc [32 lanes, 4] += one mma.m16n8k16 of the lanes' fragments a [32, 4 regs, 2 halves] and
    b [32, 2, 2] (float64; the layouts of plugins/kernels/mma.cuh)."""
    g, t = LANE_G, LANE_T
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for reg, (row, col) in enumerate(((g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8))):
        A[row, col], A[row, col + 1] = a[:, reg, 0], a[:, reg, 1]
    for reg, k in enumerate((2 * t, 2 * t + 8)):
        B[k, g], B[k + 1, g] = b[:, reg, 0], b[:, reg, 1]
    C = A @ B
    acc += np.stack([C[g, 2 * t], C[g, 2 * t + 1], C[g + 8, 2 * t], C[g + 8, 2 * t + 1]], axis=1)


def attention_f64(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, past: int, window: int, scale: float,
                  softcap: float) -> np.ndarray:
    """q [S, H, D] at positions past..past+S-1 over the caches [Hkv, capacity, D] -> [S, H, D]
    float64: each token sees the keys from max(0, pos - window + 1) (0 without a window) to pos."""
    S, H, D = q.shape
    Hkv = k_cache.shape[0]
    out = np.empty((S, H, D))
    for s in range(S):
        pos = past + s
        first = max(0, pos - window + 1) if window else 0
        for h in range(H):
            keys, values = k_cache[h // (H // Hkv), first:pos + 1], v_cache[h // (H // Hkv), first:pos + 1]
            scores = keys.astype(np.float64) @ q[s, h].astype(np.float64) * scale
            if softcap:
                scores = softcap * np.tanh(scores / softcap)
            p = np.exp(scores - scores.max())
            out[s, h] = p @ values.astype(np.float64) / p.sum()
    return out


# ---------------------------------------------------------------- an int4 head's candidate search

@contextmanager
def on_device(drv, arrays: dict):
    """name -> device pointer of a fresh copy of each array (poisoned outputs included); all freed after."""
    dev = {}
    try:
        for name, a in arrays.items():
            dev[name] = drv.alloc(a.nbytes)
            drv.upload(dev[name], np.ascontiguousarray(a))
        yield dev
    finally:
        for pointer in dev.values():
            drv.free(pointer)


def fused_gemv_error(drv, fn, fusion: str, k: int, n: int, group_size: int, tensor_cores: bool,
                     blocks: int | None = None) -> float:
    """Relative error of decode GEMV entry point `fn` (drv.function's handle of awq_gemv_{fusion}_g*_w*,
    or awq_gemv_tc_{fusion}_g* when tensor_cores, on `blocks` blocks: default a block a 16-row tile)
    against the twins of what it fuses (norm prologue, bias, act, residual, RoPE with the KV-cache
    write), on fresh random data with every output poisoned with NaN (an output never written
    fails). RoPE: n = (H + 2 Hkv) 64."""
    from awq_edge import packing
    from awq_edge.cuda_backend import ACT_KINDS, GEMV_TC_ROWS, GEMV_TC_THREADS
    from awq_edge.cuda_driver import f32, i32, ptr
    from awq_edge.reference_backend import (dequantized, twin_act, twin_linear, twin_residual, twin_norm,
                                            twin_rope_store)

    rng = np.random.default_rng(k * n + len(fusion) + tensor_cores)
    groups = packing.num_groups(k, group_size)
    packed = packing.pack_for_plugin(rng.integers(0, 16, (n, k), dtype=np.uint8),
                                     rng.uniform(0.002, 0.02, (n, groups)).astype(np.float16),
                                     rng.integers(0, 16, (n, groups), dtype=np.uint8), group_size)
    x = (rng.standard_normal((1, k)) * 3).astype(np.float16)
    norm_weight = rng.uniform(0.5, 1.5, k).astype(np.float32)
    # a bias on every fusion but norm_act, which runs without one (the store fusions: q/k/v's, Qwen2's;
    # act and residual: the other linears' of ERNIE 4.5's use_bias, Jais 2's)
    bias = rng.standard_normal(n).astype(np.float16) if fusion != "norm_act" else None
    h = rng.standard_normal((1, n)).astype(np.float16)
    act = "gelu_tanh" if k % 32 else "silu"
    eps = 1e-6
    # RoPE: n = (H + 2 Hkv) D with D = 64, at position 5 of a 16-row cache
    D, pos, capacity = 64, 5, 16
    kv_heads = n // D // 4 or 1
    heads = n // D - 2 * kv_heads

    cos, sin = (rng.uniform(-1, 1, (capacity, D // 2)).astype(np.float16) for _ in range(2))
    xin = twin_norm(x, norm_weight, eps) if fusion.startswith("norm") else x
    y = twin_linear(xin, dequantized(packed["qweight"], packed["scales"], packed["zeros"], group_size), bias)
    if fusion.endswith("rope"):
        k_want, v_want = np.zeros((kv_heads, capacity, D), np.float16), np.zeros((kv_heads, capacity, D), np.float16)
        q, kk, v = y[:, :heads * D], y[:, heads * D:(heads + kv_heads) * D], y[:, (heads + kv_heads) * D:]
        q_want = twin_rope_store(q.reshape(1, heads, D), kk.reshape(1, kv_heads, D), v.reshape(1, kv_heads, D),
                                 k_want, v_want, pos, cos, sin)
        want = np.concatenate([q_want.reshape(-1), k_want[:, pos].reshape(-1), v_want[:, pos].reshape(-1)])[None]
    else:
        want = twin_act(y, act) if fusion.endswith("act") else twin_residual(h, y) if fusion == "residual" else y

    out = h.copy() if fusion == "residual" else np.full((1, n // 2 if fusion.endswith("act") else n), np.nan, np.float16)
    arrays = {"x": x, "q": packed["qweight"], "s": packed["scales"], "z": packed["zeros"], "norm": norm_weight,
              "bias": bias if bias is not None else h, "cos": cos, "sin": sin,
              "q_rot": np.full((max(heads, 1), D), np.nan, np.float16),
              "k_cache": np.full((kv_heads, capacity, D), np.nan, np.float16),
              "v_cache": np.full((kv_heads, capacity, D), np.nan, np.float16), "past": np.array([pos], np.int64),
              "status": np.zeros(1, np.int32), "out": out}
    with on_device(drv, arrays) as dev:
        grid, block = ((blocks or -(-n // GEMV_TC_ROWS),), (GEMV_TC_THREADS,)) if tensor_cores else ((n // 4,), (128,))
        drv.launch(fn, grid, block, [ptr(dev["x"]), ptr(dev["q"]), ptr(dev["s"]), ptr(dev["z"]), ptr(dev["out"]),
                                     i32(n), i32(k), ptr(dev["norm"]), f32(eps),
                                     ptr(dev["bias"] if bias is not None else 0), i32(ACT_KINDS[act]),
                                     *[ptr(dev[name]) for name in ("cos", "sin", "q_rot", "k_cache", "v_cache",
                                                                   "past", "status")],
                                     i32(heads), i32(kv_heads), i32(D), i32(capacity), i32(capacity),
                                     ptr(dev["q"]), i32(packed["qweight"].nbytes)])  # (the L2 prefetch: its own weights)
        got = {name: np.empty_like(arrays[name]) for name in ("out", "q_rot", "k_cache", "v_cache")}
        for name, a in got.items():
            drv.download(a, dev[name])
    if fusion.endswith("rope"):
        got = np.concatenate([got["q_rot"].reshape(-1)[:heads * D], got["k_cache"][:, pos].reshape(-1),
                              got["v_cache"][:, pos].reshape(-1)])[None]
    else:
        got = got["out"]
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} outputs never written"
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want.astype(np.float64)))


def random_quantized(rng, n: int, k: int, group_size: int):
    """(q, scales, zeros, packed): random levels, zero points and scales, and their plugin layout."""
    from awq_edge import packing

    groups = packing.num_groups(k, group_size)
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)
    zeros = rng.integers(0, 16, size=(n, groups), dtype=np.uint8)
    scales = rng.uniform(0.002, 0.02, size=(n, groups)).astype(np.float16)
    return q, scales, zeros, packing.pack_for_plugin(q, scales, zeros, group_size)


def prefill_attention_error(drv, fn, kernel: str, d: int, heads: tuple, past: int, rows: int, window: int,
                            softcap: float, sinks: bool = False) -> float:
    """awq_attend_{kernel}_d{d} ("block" or "mma"; "" for awq_attend_d{d}, a block per token;
    drv.function's handle `fn`) over a chunk of `rows` random query rows after `past` random cached
    rows, outputs poisoned with NaN (sinks: a random sink a head, gpt-oss's): its worst element error
    against twin_attend_block relative to the largest output."""
    from awq_edge.cuda_backend import ATTEND_BLOCK_QUERIES, ATTEND_MMA_QUERIES, ATTEND_THREADS
    from awq_edge.cuda_driver import f32, i32, ptr
    from awq_edge.reference_backend import twin_attend_block

    (H, Hkv), capacity = heads, past + rows + 5
    rng = np.random.default_rng(d + past)
    q = rng.standard_normal((rows, H, d)).astype(np.float16)
    k_cache = rng.standard_normal((Hkv, capacity, d)).astype(np.float16)
    v_cache = rng.standard_normal((Hkv, capacity, d)).astype(np.float16)
    per_block = {"mma": ATTEND_MMA_QUERIES, "block": ATTEND_BLOCK_QUERIES, "": 1}[kernel]
    head_sinks = rng.normal(1.0, 1.0, H).astype(np.float32) if sinks else None
    arrays = {"q": q, "k": k_cache, "v": v_cache, "past": np.array([past], np.int64),
              "out": np.full(rows * H * d, np.nan, np.float16),
              "sinks": head_sinks if sinks else np.zeros(H, np.float32)}
    with on_device(drv, arrays) as dev:
        drv.launch(fn, (H, -(-rows // per_block)), (ATTEND_THREADS,),
                   [*[ptr(dev[name]) for name in ("q", "k", "v", "past", "out")], i32(rows), i32(H), i32(Hkv),
                    i32(capacity), i32(capacity), i32(window), f32(d ** -0.5), f32(softcap),
                    ptr(dev["sinks"] if sinks else 0)])
        got = np.empty(rows * H * d, np.float16)
        drv.download(got, dev["out"])
    want = twin_attend_block(q, k_cache, v_cache, past, window, d ** -0.5, softcap, sinks=head_sinks).reshape(-1)
    assert not np.isnan(got).any(), f"{np.isnan(got).sum()} outputs never written"
    return float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max() / np.abs(want.astype(np.float32)).max())


def split_attention_errors(drv, fn, d: int, heads: tuple, window: int, softcap: float, capacity: int,
                           positions, sinks: bool = False) -> list[tuple[int, float]]:
    """awq_attend_split_d{d} (drv.function's handle `fn`) over a random cache of `capacity` rows at each
    of `positions` in turn (the per-head counters carried over: the merging blocks must reset them),
    outputs poisoned with NaN each time (sinks: a random sink a head): (position, worst element error
    against twin_attend_split relative to the largest output) per position."""
    from awq_edge.cuda_backend import ATTEND_SPLIT_KEYS
    from awq_edge.cuda_driver import f32, i32, ptr
    from awq_edge.reference_backend import twin_attend_split

    H, Hkv = heads
    rng = np.random.default_rng(d + window + capacity)
    q = rng.standard_normal((H, d)).astype(np.float16)
    k_cache = rng.standard_normal((Hkv, capacity, d)).astype(np.float16)
    v_cache = rng.standard_normal((Hkv, capacity, d)).astype(np.float16)
    splits = -(-capacity // ATTEND_SPLIT_KEYS)
    head_sinks = rng.normal(1.0, 1.0, H).astype(np.float32) if sinks else None
    arrays = {"q": q, "k": k_cache, "v": v_cache, "past": np.zeros(1, np.int64), "out": np.zeros(H * d, np.float16),
              "partials": np.zeros(H * splits * (2 + d), np.float32), "counters": np.zeros(H, np.int32),
              "sinks": head_sinks if sinks else np.zeros(H, np.float32)}
    errors = []
    with on_device(drv, arrays) as dev:
        for pos in positions:
            drv.upload(dev["past"], np.array([pos], np.int64))
            drv.upload(dev["out"], np.full(H * d, np.nan, np.float16))
            drv.launch(fn, (H, splits), (ATTEND_SPLIT_KEYS,),
                       [*[ptr(dev[name]) for name in ("q", "k", "v", "past", "out", "partials", "counters")],
                        i32(H), i32(Hkv), i32(capacity), i32(capacity), i32(window), f32(d ** -0.5), f32(softcap),
                        ptr(dev["sinks"] if sinks else 0)])
            got = np.empty(H * d, np.float16)
            drv.download(got, dev["out"])
            want = twin_attend_split(q, k_cache, v_cache, pos, window, d ** -0.5, softcap, ATTEND_SPLIT_KEYS,
                                     sinks=head_sinks)
            assert not np.isnan(got).any(), f"pos {pos}: {np.isnan(got).sum()} outputs never written"
            errors.append((pos, float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max()
                                      / np.abs(want.astype(np.float32)).max())))
    return errors


def select_plan(keys: np.ndarray, k: int, threads: int = 1024) -> np.ndarray:
    """The indices of the k largest uint32 keys, by rank, as select.cuh's kth_largest_key and
    emit_top_k find them: four radix passes (warp 0's walk: lane l sums digits 255 - 8l down to
    248 - 8l, the first lane whose running total reaches what is left walks its own bins), then
    tiles of `threads` keys whose ranks are the keys above the k-th before them plus the equal
    ones before them (at most `take`)."""
    keys = np.asarray(keys, np.uint32).astype(np.int64)
    prefix, remaining = 0, k
    for shift in (24, 16, 8, 0):
        high_mask = 0 if shift == 24 else (0xFFFFFFFF << (shift + 8)) & 0xFFFFFFFF
        hist = np.bincount((keys[(keys & high_mask) == prefix] >> shift) & 255, minlength=256)
        own = np.array([hist[255 - 8 * lane - np.arange(8)].sum() for lane in range(32)])
        inclusive = np.cumsum(own)
        lane = int(np.argmax(inclusive >= remaining))
        above, d = int(inclusive[lane] - own[lane]), 255 - 8 * lane
        while above + hist[d] < remaining:
            above += int(hist[d])
            d -= 1
        prefix, remaining = prefix | (d << shift), remaining - above
    out = np.full(k, -1, np.int64)
    above_base = equal_base = 0
    for tile in range(0, keys.size, threads):
        t = keys[tile:tile + threads]
        above, equal = t > prefix, t == prefix
        above_rank = above_base + np.cumsum(above) - above  # exclusive scans over the tile
        equal_rank = equal_base + np.cumsum(equal) - equal
        taken = above | (equal & (equal_rank < remaining))
        out[(above_rank + np.minimum(equal_rank, remaining))[taken]] = tile + np.flatnonzero(taken)
        above_base, equal_base = above_base + int(above.sum()), equal_base + int(equal.sum())
    assert (out >= 0).all() and np.unique(out).size == k
    return out


def tie_heavy_logits(rng: np.random.Generator, vocab: int) -> list[np.ndarray]:
    """Logits a top-k must break ties in: drawn from a few values (with NaN and the infinities),
    rounded to one decimal (ties inside and across slices), and all equal."""
    few = np.array([np.nan, -np.inf, np.inf, -1.5, 0.0, 2.25, 7.0], np.float32)
    return [rng.choice(few, vocab), np.round(rng.standard_normal(vocab), 1).astype(np.float32),
            np.full(vocab, 3.0, np.float32)]


def head_candidates_twin(logits: np.ndarray, vocab: int, length: int, top_k: int):
    """awq_head_candidates: (keys uint32 [slices, top_k], ids int32 [slices, top_k]), each slice's
    top_k in id order, padded with key 0 and id -1 past a short slice."""
    from awq_edge.reference_backend import order_keys

    slices = -(-vocab // length)
    keys, ids = np.zeros((slices, top_k), np.uint32), np.full((slices, top_k), -1, np.int32)
    for b in range(slices):
        part = order_keys(logits[b * length:min((b + 1) * length, vocab)])
        chosen = select_plan(part, min(top_k, part.size))
        keys[b, :chosen.size], ids[b, :chosen.size] = part[chosen], b * length + chosen
    return keys, ids


def head_rescore_twin(keys: np.ndarray, ids: np.ndarray, top_k: int, x: np.ndarray, table: np.ndarray,
                      softcap: float, logits: np.ndarray) -> np.ndarray:
    """awq_head_rescore: the top_k of all candidates, their logits recomputed from the fp16 table
    (in place); returns the chosen ids (padding ones dropped)."""
    from awq_edge.reference_backend import twin_lm_head

    chosen = ids.reshape(-1)[select_plan(keys.reshape(-1), top_k)]
    chosen = chosen[chosen >= 0]
    logits[chosen] = twin_lm_head(x, table[chosen], softcap)
    return chosen


# ---------------------------------------------------------------- the kernels' own source on the CPU

# Kernels the benchmarks launch that the backend does not (yet), emulated too.
BENCHMARK_KERNELS = {"gemv_w4a16": [f"awq_gemv_mma32_g{g}" for g in (32, 64, 128)],
                     "persistent_step": ["awq_step_skeleton", "awq_step_skeleton_queue"]}


# Kernels whose blocks wait on other blocks' counts (grid_sync.cuh): the concurrent schedule's.
BLOCKS_THAT_WAIT = ("awq_decode_step", "awq_step_skeleton")


def build_emulated_kernels(out_dir) -> ctypes.CDLL | None:
    """Every kernel the cuda backend loads (cuda_backend.KERNELS_OF; and the 32-row tensor-core GEMV
    that benchmarks/gemv.py measures beside its 16-row one, and benchmarks/persistent_step.py's
    skeleton of a persistent step), compiled from its .cu file
    with g++ for the CPU emulation of tests/cuda_on_cpu/emulate.h, as one library whose
    cpu_launch(name, grid x, y, z, threads, args) runs a kernel; None without g++ or CUDA headers.
    Built with the -fsanitize checks for what fails on a GPU and not on an x86 (a misaligned
    access, an index past a local array; launch.cpp reports each at the kernel's line)."""
    import shutil
    import subprocess
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from awq_edge import plugins
    from awq_edge.cuda_backend import KERNELS_OF

    cxx, include = shutil.which("g++"), plugins.cuda_include_dir()
    if cxx is None or include is None:
        return None
    here, out = Path(__file__).parent / "cuda_on_cpu", Path(out_dir)
    # The checks for what would fail on a GPU and may pass on an x86: a misaligned access, an index
    # past a local array, a signed overflow, a float that does not fit an int; each reported by
    # launch.cpp's handlers (no libubsan: the launch returns 3 with the kernel's line).
    checks = ["-fsanitize=alignment,bounds,null,shift,signed-integer-overflow,integer-divide-by-zero,"
              "float-cast-overflow,bool,enum,vla-bound,return", "-fno-sanitize-recover=all"]
    flags = ["-std=c++20", "-O2", "-U_FORTIFY_SOURCE", "-pthread", "-fPIC", "-w", *checks,
             "-I", str(plugins.PLUGINS_DIR / "kernels"), "-isystem", str(include), "-include", str(here / "emulate.h")]
    sources = {"launch": here / "launch.cpp"}
    for module in {**KERNELS_OF, **BENCHMARK_KERNELS}:
        names = KERNELS_OF.get(module, []) + BENCHMARK_KERNELS.get(module, [])
        sources[module] = out / f"{module}.cpp"
        sources[module].write_text(f'#include "{module}.cu"\n' + "".join(f"AWQ_EMULATE({n})\n" for n in names))

    def compile_one(name):
        subprocess.run([cxx, *flags, "-c", "-o", str(out / f"{name}.o"), str(sources[name])], check=True)
        return out / f"{name}.o"

    with ThreadPoolExecutor(2) as pool:
        objects = list(pool.map(compile_one, sources))
    subprocess.run([cxx, "-shared", "-pthread", "-Wl,-z,defs", "-o", str(out / "kernels.so"), *map(str, objects)],
                   check=True)  # (-z defs: a check whose handler launch.cpp lacks fails here, by name)
    lib = ctypes.CDLL(str(out / "kernels.so"))
    lib.cpu_launch.argtypes = [ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                               ctypes.c_void_p]
    lib.cpu_schedule.argtypes = [ctypes.c_int]
    lib.cpu_fault.restype = ctypes.c_char_p
    lib.cpu_polls_not_ready.restype = ctypes.c_ulonglong
    lib.cpu_buffers.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.cpu_first_block.argtypes = [ctypes.c_ulonglong]
    lib.cpu_stale_memory.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    lib.cpu_shared_memory.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    # each kernel's __shared__ statics (its file's: a resident block's own copy in the concurrent schedule)
    statics, offsets = elf_static_objects((out / "kernels.so").read_bytes())
    base = ctypes.cast(lib.cpu_launch, ctypes.c_void_p).value - offsets["cpu_launch"]
    for module in sources.keys() - {"launch"}:
        ranges = statics.get(module, []) + statics.get("", [])
        for name in KERNELS_OF.get(module, []) + BENCHMARK_KERNELS.get(module, []):
            lib.cpu_shared_memory(name.encode(), len(ranges), c_array(ctypes.c_void_p, [base + at for at, _ in ranges]),
                                  c_array(ctypes.c_size_t, [size for _, size in ranges]))
    return lib


def c_array(ctype, items: list):
    """items as a C array for the emulation's entry points (one element at least: never a null pointer)."""
    return (ctype * max(len(items), 1))(*items)


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


class EmulatedDriver(RecordingDriver):
    """The cuda backend's driver over the kernels' own source on the CPU (build_emulated_kernels):
    device memory is host memory (a pointer is a host address), a launch runs the kernel, and a
    captured graph is its launches, run again at each replay (and not at the capture, as on a GPU).

    The stream is a queue, as on the GPU: launches, replays, async copies and event records wait in
    `pending` until the host waits for them (synchronize, wait on an event, download), so a host
    that reads a result it did not wait for reads stale memory here too. An async copy from
    pageable memory reads it at once (the driver stages it), from a host_array when it runs. A
    synchronous copy or memset while work is queued fails: on the GPU it would not wait for the
    stream (cuda_driver's stream does not sync with the legacy one), a race.

    adversarial=True runs each launch in emulate.h's adversarial schedule (threads and blocks in
    reverse, cp.async landed at issue, a block's writes to the buffers hidden from the other blocks
    until it fences), and a programmatic launch on the memory a programmatic
    dependent launch may still see before its wait_for_previous_kernel() (pdl.cuh): a chain of
    programmatic launches may all start as soon as its first does (each lets the next start first
    thing, before its own wait), so each block of a later one starts on the memory from before the
    chain's first kernel. A chain ends at anything that is not a kernel (a copy, an event, a
    stand-in cuBLAS) and at a graph launch, which waits for everything before it.

    concurrent=True runs the kernels whose blocks wait on each other's counts (BLOCKS_THAT_WAIT:
    the persistent decode step, the skeletons) in emulate.h's concurrent schedule: their blocks
    side by side, a few rounds of each in turn, so that a task runs while the ones it waits for are
    under way (in the other two, one block takes every task in order). The other kernels' blocks
    never wait on another: they run one after another, as in the plain schedule."""

    launched: set[str] = set()  # every kernel any EmulatedDriver ran in this process

    def __init__(self, lib, adversarial: bool = False, concurrent: bool = False):
        super().__init__()
        assert not (adversarial and concurrent), "the adversarial schedule runs one block at a time"
        self.lib, self.buffers, self.capturing, self.pending, self.page_locked = lib, {}, None, [], []
        self.adversarial, self.chain_start = adversarial, None  # (the buffers before a chain's first kernel)
        self.concurrent = concurrent

    def alloc(self, nbytes: int) -> int:
        """Zeroed memory, 256-byte aligned as cuMemAlloc's, beside a page no access may touch: it
        ends where that page begins (an adversarial driver's: starts where it ends), so a kernel
        reading or writing past the end of a buffer (beyond its rounding up to 256 bytes; or
        before its start) fails its launch (emulate.h's launch.cpp: the block, thread, address),
        not with a wrong number."""
        self.allocated += int(nbytes)
        size, page = -(-max(int(nbytes), 1) // 256) * 256, mmap.PAGESIZE
        pages = -(-size // page) * page
        memory = mmap.mmap(-1, pages + page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        start = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        guard = start if self.adversarial else start + pages
        assert _libc().mprotect(ctypes.c_void_p(guard), page, 0) == 0, "mprotect"  # PROT_NONE
        # (the usable bytes only; the array keeps the mapping, unmapped once free drops it)
        buffer = np.frombuffer(memory, np.uint8, size, page if self.adversarial else pages - size)
        self.buffers[buffer.ctypes.data] = buffer
        return buffer.ctypes.data

    def free(self, device_ptr: int) -> None:
        self.buffers.pop(device_ptr, None)

    def array_at(self, address: int, dtype, shape) -> np.ndarray:
        """A numpy view of device (here host) memory."""
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(address)).view(dtype).reshape(shape)

    def host_array(self, count, dtype):
        array = np.zeros(count, dtype)
        self.page_locked.append(array)
        return array

    def enqueue(self, work) -> None:
        """work (a callable, or a launch's (fn, grid, block, args)) into the graph being captured, or on the stream."""
        (self.capturing if self.capturing is not None else self.pending).append(work)

    def run_pending(self, count: int) -> None:
        work, self.pending = self.pending[:count], self.pending[count:]
        for item in work:
            kernel = not callable(item) and len(item) == 5
            if not kernel:  # ends a chain of programmatic launches
                self.chain_start = None
            if callable(item):
                item()
            elif item[0] == "event":
                item[1].time = self.clock
            elif kernel:
                self.run(*item)

    def synchronize(self):
        self.run_pending(len(self.pending))

    def record(self, event):
        self.pending.append(("event", event))

    def wait(self, event):
        marks = [i for i, item in enumerate(self.pending) if item == ("event", event)]
        self.run_pending(marks[-1] + 1 if marks else 0)

    def upload(self, device_ptr, array):
        assert not self.pending, "a synchronous copy while the stream has work queued (on the GPU: a race)"
        array = np.ascontiguousarray(array)
        ctypes.memmove(device_ptr, array.ctypes.data, array.nbytes)

    def upload_async(self, device_ptr, array):
        locked = any(array is a or array.base is a for a in self.page_locked)
        source = array if locked else np.array(array, copy=True)
        self.pending.append(lambda: ctypes.memmove(device_ptr, source.ctypes.data, source.nbytes))

    def download_async(self, array, device_ptr):
        assert array.flags.c_contiguous
        self.pending.append(lambda: ctypes.memmove(array.ctypes.data, device_ptr, array.nbytes))

    def download(self, array, device_ptr):
        self.download_async(array, device_ptr)
        self.synchronize()

    def copy(self, dst, src, nbytes):
        self.pending.append(lambda: ctypes.memmove(dst, src, nbytes))

    def zero(self, device_ptr, nbytes):
        assert not self.pending, "a synchronous memset while the stream has work queued (on the GPU: a race)"
        ctypes.memset(device_ptr, 0, nbytes)

    def fill32(self, device_ptr, count, word):
        assert not self.pending, "a synchronous memset while the stream has work queued (on the GPU: a race)"
        np.ctypeslib.as_array((ctypes.c_uint32 * count).from_address(device_ptr))[:] = word

    def launch(self, fn, grid, block, args, shared_bytes=0, programmatic=False):
        super().launch(fn, grid, block, args, shared_bytes, programmatic)
        self.enqueue((fn, grid, block, args, programmatic))

    def run(self, fn, grid, block, args, programmatic=False):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        assert all(b == 1 for b in tuple(block)[1:]), "the kernels' blocks are 1-D"
        values = c_array(ctypes.c_void_p, [ctypes.addressof(a) for a in args])
        self.lib.cpu_schedule(1 if self.adversarial else 2 if self.concurrent and fn.startswith(BLOCKS_THAT_WAIT)
                              else 0)
        if self.adversarial and programmatic and self.chain_start is not None:
            stale = [(b, self.chain_start[a]) for a, b in self.buffers.items()
                     if a in self.chain_start and not np.array_equal(b, self.chain_start[a])]
            self.lib.cpu_stale_memory(len(stale), c_array(ctypes.c_void_p, [b.ctypes.data for b, _ in stale]),
                                      c_array(ctypes.c_size_t, [b.nbytes for b, _ in stale]),
                                      c_array(ctypes.c_void_p, [old.ctypes.data for _, old in stale]))
        elif self.adversarial:
            self.chain_start = {a: b.copy() for a, b in self.buffers.items()}
        if self.adversarial:  # (each block's writes hidden from the others until it fences)
            self.lib.cpu_buffers(len(self.buffers), c_array(ctypes.c_void_p, list(self.buffers)),
                                 c_array(ctypes.c_size_t, [b.nbytes for b in self.buffers.values()]))
        EmulatedDriver.launched.add(fn)
        status = self.lib.cpu_launch(fn.encode(), *grid, block[0], values)
        assert status == 0, f"{fn}: " + (self.lib.cpu_fault().decode() if status == 3 else "see its error above")
        self.clock += self.cost(fn, grid, args)

    def capture(self, launches):
        self.captures += 1
        self.capturing = []
        try:
            launches()
            return self.capturing
        finally:
            self.capturing = None

    def replay(self, executable):
        self.replays += 1
        self.pending.append(("graph launch",))  # (waits for all before it: a chain of programmatic launches ends)
        self.pending.extend(executable)  # kernels' launches, or a stand-in cuBLAS's GEMMs (RecordingCublas)
