"""Our own CPU kernels (plugins/cpu/), built on the machine that runs them and called through ctypes.

    lib = load_library()                      # cc -O3 -march=native -fopenmp, cached by source hash
    y = gemv_q4(lib, t["B"], t["scales"], t["zero_points"], x, K, G)   # one MatMulNBits product

The first of the kernels of a native CPU decode step (issue 22: ONNX Runtime spends about as
long between its ~350 nodes per token as reading the weights). They read the weights in ORT's
MatMulNBits layout (packing.to_matmul_nbits), so an engine needs no second copy of them in
another format. Every kernel has a numpy twin here (`*_reference`) that computes the same
integers; tests compare the two, and the C against ORT's own MatMulNBits.

Built with the system C compiler (`CC`, else cc/gcc/clang) at first use into
<cache_dir>/plugins/cpu-<hash>-<machine>/; -march=native (-mcpu=native on Arm) picks the SIMD
path (cpu_ops.h).
"""
from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import UserError
from .packing import is_permutation
from .plugins import PLUGINS_DIR, _cache_root, _publish, _run

CPU_SOURCES = PLUGINS_DIR / "cpu"
CPU_LIBRARY = "libawq_edge_cpu.so"
# -march=native picks the SIMD path; on Arm, -mcpu=native (the Arm compilers' spelling: the core's
# features and its tuning, e.g. an Orin's Cortex-A78AE with the dot product)
NATIVE_CPU = "-mcpu=native" if platform.machine() in ("aarch64", "arm64") else "-march=native"
DEFAULT_FLAGS = ("-O3", NATIVE_CPU, "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=fast",
                 "-shared", "-fPIC", "-std=c11")
KEY_BLOCK = 32  # decode_step.c's key tile: keys per tile of the bf16 cache copy


def find_cc() -> str | None:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def source_files() -> list[Path]:
    return sorted(p for pattern in ("*.c", "*.h") for p in CPU_SOURCES.glob(pattern))


def build_library(flags: tuple[str, ...] = DEFAULT_FLAGS) -> Path:
    """The shared library of plugins/cpu/*.c for this machine (cached by sources, flags, machine)."""
    sources = source_files()
    if not sources:
        raise UserError(f"CPU kernel sources not found in {CPU_SOURCES}; the native CPU kernels need an "
                        "awq-edge source checkout")
    digest = hashlib.sha256(" ".join(flags).encode() + b"\0")
    for path in sources:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    final = _cache_root() / f"cpu-{digest.hexdigest()[:16]}-{platform.machine()}"
    library = final / CPU_LIBRARY
    if library.is_file():
        return library
    cc = find_cc()
    if cc is None:
        raise UserError("no C compiler found (cc, gcc or clang); install one or set CC to build the native CPU kernels")
    final.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=final.parent))
    try:
        _run([cc, *flags, "-I", str(CPU_SOURCES), "-o", str(build / CPU_LIBRARY),
              *[str(p) for p in sources if p.suffix == ".c"], "-lm"], "building the native CPU kernels")
        _publish(build, final)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return library


def load_library(flags: tuple[str, ...] = DEFAULT_FLAGS) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build_library(flags)))
    ptr, i32 = ctypes.c_void_p, ctypes.c_int
    lib.quantize_act_q8.argtypes = [ptr, i32, i32, ptr, ptr, ptr]
    lib.quantize_act_q8.restype = None
    lib.gemv_q4.argtypes = [ptr, ptr, ptr, i32, i32, i32, ptr, ptr, ptr, ptr]
    lib.gemv_q4.restype = None
    lib.gemv_q4_chain.argtypes = [i32, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
    lib.gemv_q4_chain.restype = None
    lib.cpu_kernels_simd.argtypes = []
    lib.cpu_kernels_simd.restype = ctypes.c_char_p
    return lib


def simd_path(lib: ctypes.CDLL) -> str:
    return lib.cpu_kernels_simd().decode()


def has_simd_kernel() -> bool:
    """Whether this CPU gets a SIMD GEMV (AVX2 or better, Arm dotprod). The plain C path is ~18x
    slower than ONNX Runtime's MLAS (results/cpu_native_gemv-20261204-000753.json), so native
    decode is not the default without one. Builds (or finds) the library: raises as load_library."""
    return simd_path(load_library()) != "scalar"


# ---------------------------------------------------------------- activations to int8

def _blocks(k: int, group: int) -> int:
    return -(-k // group)


def act_bytes(k: int, group: int) -> int:
    """Length of the int8 activation row: blocks * G rounded up to whole 128-chunks (cpu_ops.h)."""
    return -(-_blocks(k, group) * group // 128) * 128


def quantize_act_q8(lib: ctypes.CDLL, x: np.ndarray, group: int):
    """-> (x8 int8 [act_bytes] deinterleaved per 128-chunk, scale float32 [blocks], sum int32 [blocks])."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    blocks = _blocks(x.size, group)
    x8 = np.empty(act_bytes(x.size, group), np.int8)
    scale = np.empty(blocks, np.float32)
    total = np.empty(blocks, np.int32)
    lib.quantize_act_q8(x.ctypes.data, x.size, group, x8.ctypes.data, scale.ctypes.data, total.ctypes.data)
    return x8, scale, total


def quantize_act_q8_reference(x: np.ndarray, group: int):
    """numpy twin of quantize_act_q8 (round half to even, as lrintf in the default rounding mode)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    blocks = _blocks(x.size, group)
    padded = np.zeros(act_bytes(x.size, group), np.float32)
    padded[:x.size] = x
    xb = padded[:blocks * group].reshape(blocks, group)
    scale = (np.abs(xb).max(axis=1) / np.float32(127)).astype(np.float32)
    inv = np.divide(np.float32(1), scale, out=np.zeros_like(scale), where=scale > 0).astype(np.float32)
    q = np.zeros(padded.size, np.int32)
    q[:blocks * group] = np.rint(xb * inv[:, None]).reshape(-1)
    chunks = q.reshape(-1, 64, 2)  # per 128-chunk: the 64 even k, then the 64 odd k
    x8 = np.concatenate([chunks[:, :, 0], chunks[:, :, 1]], axis=1).astype(np.int8).reshape(-1)
    return x8, scale, q[:blocks * group].reshape(blocks, group).sum(axis=1).astype(np.int32)


# ---------------------------------------------------------------- the 4-bit GEMV

def gemv_q4(lib: ctypes.CDLL, b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, x: np.ndarray,
            k: int, group: int) -> np.ndarray:
    """y [N] float32 = x [K] times the MatMulNBits weight (B, scales, zero_points) with int8 activations."""
    n = b.shape[0]
    blocks = _blocks(k, group)
    _check_layout(b, scales, zero_points, n, blocks, group)
    x8, x_scale, x_sum = quantize_act_q8(lib, x, group)
    y = np.empty(n, np.float32)
    lib.gemv_q4(b.ctypes.data, scales.ctypes.data, zero_points.ctypes.data, n, k, group,
                x8.ctypes.data, x_scale.ctypes.data, x_sum.ctypes.data, y.ctypes.data)
    return y


def gemv_q4_reference(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray, x: np.ndarray,
                      k: int, group: int) -> np.ndarray:
    """numpy twin of gemv_q4: the same int8 activations and integer block dots, float64 sums."""
    from .packing import from_matmul_nbits

    n = b.shape[0]
    blocks = _blocks(k, group)
    q, s, z = from_matmul_nbits(b.reshape(n, blocks, group // 2), scales.reshape(n, blocks),
                                zero_points.reshape(n, -1), k)
    x8, x_scale, x_sum = quantize_act_q8_reference(x, group)
    xq = x8.reshape(-1, 2, 64).transpose(0, 2, 1).reshape(-1)[:blocks * group].reshape(blocks, group)  # k order
    padded = np.zeros((n, blocks * group), np.int64)
    padded[:, :k] = q
    dots = np.einsum("nbg,bg->nb", padded.reshape(n, blocks, group), xq.astype(np.int64))
    ints = dots - z.astype(np.int64) * x_sum.astype(np.int64)[None, :]
    return (ints * (x_scale.astype(np.float64)[None, :] * s.astype(np.float64))).sum(axis=1)


def to_bf16_reference(x: np.ndarray) -> np.ndarray:
    """numpy twin of decode_step.c's to_bf16: a float32's top half, rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where((u & 0x7FFFFFFF) > 0x7F800000, ((u >> 16) | 0x40).astype(np.uint16), rounded)


def mirror_reference(k: np.ndarray, v: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of the step's bf16 copy of one layer's cache (cpu_ops.h), from ORT's float32 rows
    k, v [Hkv, n, D]: keys in tiles [Hkv, rows / KEY_BLOCK, D, KEY_BLOCK], values [Hkv, rows, D],
    the rows past n zero; both returned flat, in memory order."""
    hkv, n, d = k.shape
    keys, values = np.zeros((hkv, rows, d), np.uint16), np.zeros((hkv, rows, d), np.uint16)
    keys[:, :n], values[:, :n] = to_bf16_reference(k), to_bf16_reference(v)
    return keys.reshape(hkv, rows // KEY_BLOCK, KEY_BLOCK, d).transpose(0, 1, 3, 2).ravel(), values.ravel()


def _check_layout(b, scales, zero_points, n, blocks, group) -> None:
    if group < 16 or group & (group - 1):
        raise ValueError(f"block size must be a power of two >= 16, got {group}")
    for name, a, size, dtype in (("B", b, n * blocks * group // 2, np.uint8), ("scales", scales, n * blocks, np.float32),
                                 ("zero_points", zero_points, n * ((blocks + 1) // 2), np.uint8)):
        if a.dtype != dtype or a.size != size or not a.flags.c_contiguous:
            raise ValueError(f"{name}: expected {size} contiguous {np.dtype(dtype).name}, got {a.size} {a.dtype}")


# ---------------------------------------------------------------- the decode step

class CpuOp(ctypes.Structure):
    """struct cpu_op (cpu_ops.h): the same fields in the same order."""
    _fields_ = [(name, ctypes.c_int32) for name in ("kind", "n", "k", "group", "offset", "layer", "window",
                                                      "kind_arg")] + \
               [("scale", ctypes.c_float), ("softcap", ctypes.c_float)] + \
               [(name, ctypes.c_void_p) for name in ("x", "out", "residual", "w0", "w1", "w2", "bias", "w_norm",
                                                      "table", "cos", "sin", "order", "positions", "w3", "w4", "w5",
                                                      "router", "expert_bias", "scratch")] + \
               [(name, ctypes.c_int32) for name in ("experts", "top_k", "normalize", "sigmoid")] + \
               [(name, ctypes.c_void_p) for name in ("fc1_bias", "fc2_bias")] + \
               [(name, ctypes.c_float) for name in ("swiglu_alpha", "swiglu_limit")] + \
               [(name, ctypes.c_void_p) for name in ("sinks", "shared_gate", "state", "normed", "delta_b", "delta_a",
                                                      "dt_bias", "rate")] + \
               [(name, ctypes.c_int32) for name in ("k_heads", "v_heads", "k_dim", "v_dim")] + \
               [("skip", ctypes.c_void_p), ("dt_min", ctypes.c_float), ("dt_max", ctypes.c_float)]


class CpuModel(ctypes.Structure):
    """struct cpu_model (cpu_ops.h)."""
    _fields_ = [(name, ctypes.c_int32) for name in ("heads", "kv_heads", "head_dim", "max_context", "top_k")] + \
               [("eps", ctypes.c_float)] + \
               [(name, ctypes.c_void_p) for name in ("k_cache", "v_cache", "x8", "x_scale", "x_sum", "scores",
                                                      "top_ids", "top_logits", "k_mirror", "v_mirror")] + \
               [("mirror_rows", ctypes.c_int32), ("top_slots", ctypes.c_int32), ("x_ordered", ctypes.c_void_p)]


# decode_step.c's attention: its key tiles and value walk built for these sizes (64 dimensions a block,
# then 80's and 96's last 16 or 32)
NATIVE_HEAD_DIMS = (64, 80, 96, 128, 256)
OP_KINDS = {"embed": 1, "norm": 2, "add_norm": 3, "linear": 4, "head_norm": 5, "attention": 6, "act": 7, "lm_head": 8,
            "add": 9, "rope": 10, "short_conv": 11, "clamp": 12, "moe": 13, "head_gate": 14,
            "output_gate": 15, "delta_conv": 16, "delta_rule": 17, "mamba_rule": 18, "group_norm": 19}
ACT_KINDS = {"silu": 0, "gelu_tanh": 1, "relu2": 2, "xielu": 3, "gelu": 4, "relu": 5}  # cpu_ops.h's ACT_*
ACT_UNGATED = 8  # added for act(x), not act(gate) * up (an MLP without a gate)


class Unsupported(Exception):
    """This engine cannot run on the native step (ONNX Runtime runs it instead); the message says why."""


def graph_weights(export_dir: Path):
    """(initializers: name -> array, a read-only view of model.onnx.data or the proto's own bytes;
    MatMulNBits and QMoE attributes: weight prefix -> {K, N, bits, block_size} or {k, block_size, ...},
    `inputs` too) of an engine's graph."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(Path(export_dir) / "model.onnx"), load_external_data=False)
    data_path = Path(export_dir) / "model.onnx.data"
    data = np.memmap(data_path, dtype=np.uint8, mode="r") if data_path.is_file() else None
    arrays = {}
    for t in model.graph.initializer:
        where = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        shape = tuple(int(d) for d in t.dims)
        if not where:
            arrays[t.name] = numpy_helper.to_array(t)
            continue
        if where.get("location") != data_path.name or data is None:
            raise Unsupported(f"initializer {t.name[:80]} lives outside model.onnx.data")
        offset, length = int(where.get("offset", 0)), int(where.get("length", -1))
        count = int(np.prod(shape, dtype=np.int64))
        if length != count * dtype.itemsize or offset < 0 or offset + length > data.size:
            raise Unsupported(f"initializer {t.name[:80]} does not fit model.onnx.data")
        arrays[t.name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
    matmuls = {}
    for node in model.graph.node:
        if node.op_type in ("MatMulNBits", "QMoE"):  # (QMoE's experts: {layer}.mlp.experts.fc1.B)
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            key = node.input[1 if node.op_type == "MatMulNBits" else 2].removesuffix(".B").removesuffix(".fc1")
            matmuls[key] = {**attrs, "op": node.op_type, "inputs": list(node.input)}
    return arrays, matmuls


class NativeDecoder:
    """One decode token of an ORT engine with our kernels (decode_step.c): the same weights
    (model.onnx.data, memory-mapped), the same KV buffers as ONNX Runtime's session, so ORT
    prefills and this decodes. Raises Unsupported for what it does not run."""

    def __init__(self, export_dir: Path, info, k_caches: list[int], v_caches: list[int], max_context: int,
                 threads: int, conv_rows: dict[int, np.ndarray] | None = None,
                 delta_states: dict[int, list[np.ndarray]] | None = None):
        """k_caches, v_caches: ORT's KV buffers of each layer (0 for an LFM2 short convolution's, a delta net's);
        conv_rows: each short convolution's B * x by position, ORT's arrays (OrtBackend); delta_states: each
        Qwen3.5 delta net's [convolution inputs, S], float32, ORT's arrays (which the step updates in place)."""
        from .decoder import buffer_shapes, decode_ops, decoder_spec
        from .export.spec import model_spec

        if info.target != "ort" or info.kv_mode != "shared_buffer" or info.act_dtype != "float32" or info.all_logits:
            raise Unsupported("only float32 ort engines with in-place KV buffers")
        if not info.lm_head_exact:
            raise Unsupported("only a quantized lm_head with exact re-scoring (the default)")
        self.arrays, self.matmuls = graph_weights(export_dir)
        groups = {m["block_size"] for name, m in self.matmuls.items() if name != "lm_head.q4"}
        if len(groups) != 1:
            raise Unsupported(f"one block size for the body's linears, got {sorted(groups)}")
        try:
            model = model_spec(info.config)

            def biased(*names) -> bool:
                return any(f"{p}.bias" in self.arrays for p in self.matmuls if p.endswith(names))
            spec = decoder_spec(model, groups.pop(), biased("qkv_proj"),
                                out_bias=biased("o_proj", "gate_up_proj", "up_proj", "down_proj"),
                                positions=info.max_position_embeddings,  # (the graph's RoPE rows: build --max-context)
                                experts=True)
        except UserError as e:
            raise Unsupported(str(e)) from None
        if spec.head_dim not in NATIVE_HEAD_DIMS:
            raise Unsupported(f"head_dim {spec.head_dim} (the native attention takes "
                              f"{', '.join(map(str, NATIVE_HEAD_DIMS))})")
        self.spec = spec
        self.lib = load_library()
        self.lib.decode_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int,
                                         ctypes.c_void_p]
        self.lib.decode_step.restype = None
        self.lib.cpu_set_threads.argtypes = [ctypes.c_int]
        self.lib.cpu_set_threads(int(threads))
        self.buffers = {name: np.zeros(shape[-1], np.float32) for name, shape in buffer_shapes(spec, 1).items()}
        self.top_k = info.lm_head_exact["top_k"]
        self.exact_table = info.lm_head_exact["table"]
        # (the largest input a product quantizes: a linear's K, or an expert's down's, its width)
        kmax = max([m["K"] for m in self.matmuls.values() if m["op"] == "MatMulNBits"] + [spec.expert_width])
        gmin = min(m["block_size"] for m in self.matmuls.values())
        self.scratch = {"x8": np.zeros(act_bytes(kmax, gmin) + 256, np.int8),
                        "x_scale": np.zeros(kmax // gmin + 2, np.float32), "x_sum": np.zeros(kmax // gmin + 2, np.int32),
                        "scores": np.zeros((spec.heads, max_context), np.float32),
                        "x_ordered": np.zeros(kmax, np.float32),
                        "top_ids": np.zeros((threads + 1, self.top_k), np.int64),
                        "top_logits": np.zeros((threads + 1, self.top_k), np.float32)}
        self.caches = ((ctypes.c_void_p * spec.layers)(*k_caches), (ctypes.c_void_p * spec.layers)(*v_caches))
        self.conv_rows = conv_rows or {}
        if sorted(self.conv_rows) != list(spec.conv_layers) or any(
                r.dtype != np.float32 or r.shape != (spec.conv_kernel - 1 + max_context, spec.hidden)
                for r in self.conv_rows.values()):
            raise Unsupported("the short convolutions' arrays do not fit the model")
        self.delta_states = delta_states or {}
        shapes = spec.delta.state_shapes if spec.delta else ()
        if sorted(self.delta_states) != list(spec.delta_layers) or any(
                [(a.dtype, a.shape, a.flags.c_contiguous) for a in arrays] != [(np.float32, shape, True)
                                                                               for shape in shapes]
                for arrays in self.delta_states.values()):
            raise Unsupported("the delta nets' state arrays do not fit the model")
        # the step's bf16 copy of the cache (decode_step.c): keys in tiles of KEY_BLOCK, values in rows
        rows = -(-max_context // KEY_BLOCK) * KEY_BLOCK
        self.mirrors = [np.zeros((spec.kv_heads, rows if i // 2 in spec.attention_layers else 0, spec.head_dim),
                                 np.uint16) for i in range(2 * spec.layers)]
        self.mirror_pointers = tuple((ctypes.c_void_p * spec.layers)(*(m.ctypes.data for m in self.mirrors[i::2]))
                                     for i in (0, 1))
        self.lib.cpu_mirror_rows.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.cpu_mirror_rows.restype = None
        self.model = CpuModel(heads=spec.heads, kv_heads=spec.kv_heads, head_dim=spec.head_dim,
                              max_context=max_context, top_k=self.top_k, eps=spec.eps,
                              k_cache=ctypes.cast(self.caches[0], ctypes.c_void_p),
                              v_cache=ctypes.cast(self.caches[1], ctypes.c_void_p),
                              k_mirror=ctypes.cast(self.mirror_pointers[0], ctypes.c_void_p),
                              v_mirror=ctypes.cast(self.mirror_pointers[1], ctypes.c_void_p), mirror_rows=rows,
                              top_slots=threads + 1,
                              **{k: v.ctypes.data for k, v in self.scratch.items()})
        # the unfused list: decode_step.c runs one op per record, and ORT's fused gate/up weight has
        # gate and up side by side (not interleaved as in a cuda engine), which its act op reads
        self.act_params: list[np.ndarray] = []
        self.zero_biases: list[np.ndarray] = []  # a linear's where the op list adds one and the graph has none
        self.ops = [self._op(op) for op in decode_ops(spec, fused=False)]
        self.program = (CpuOp * len(self.ops))(*self.ops)

    # ------------------------------------------------------------ the op list -> records
    def _tensor(self, name: str, dtype, size: int) -> np.ndarray:
        a = self.arrays.get(name)
        if a is None or a.dtype != dtype or a.size != size:
            raise Unsupported(f"graph tensor {name[:80]} is missing or not {size} x {np.dtype(dtype).name}")
        return a

    def _linear(self, rec: CpuOp, prefix: str, n: int, k: int) -> None:
        m = self.matmuls.get(prefix)
        if m is None or m.get("bits", 4) != 4 or m["K"] != k or m["N"] != n or len(m["inputs"]) > 4 and m["inputs"][4]:
            raise Unsupported(f"{prefix}: not a plain 4-bit MatMulNBits of {n} x {k}")
        g = m["block_size"]
        blocks = _blocks(k, g)
        rec.n, rec.k, rec.group = n, k, g
        rec.w0 = self._tensor(m["inputs"][1], np.uint8, n * blocks * g // 2).ctypes.data
        rec.w1 = self._tensor(m["inputs"][2], np.float32, n * blocks).ctypes.data
        rec.w2 = self._tensor(m["inputs"][3], np.uint8, n * ((blocks + 1) // 2)).ctypes.data
        if f"{prefix}.input_order" in self.arrays:  # GPTQ act-order: x gathered first, as the graph's Gather
            order = self._tensor(f"{prefix}.input_order", np.int64, k)
            if not is_permutation(order, k):
                raise Unsupported(f"{prefix}.input_order is not a permutation of its {k} inputs")
            rec.order = order.ctypes.data

    def _experts(self, rec: CpuOp, a: dict) -> None:
        """A moe op's record: the layer's QMoE node as the graph holds it (ORT's prefill runs that node: the
        native step must read the same weights the same way), its router transposed back to rows."""
        e, width, hidden, count = a["experts"], a["n"], a["k"], a["count"]
        m = self.matmuls.get(e)
        if m is None or m["op"] != "QMoE":
            raise Unsupported(f"{e}: not one QMoE node (a ragged or act-order engine's experts)")
        g = m["block_size"]
        alpha, limit = a["swiglu"] or (1.0, None)  # (gpt-oss's clamped SwiGLU: its alpha, beta 1 and limit)
        want = {"k": a["top_k"], "normalize_routing_weights": int(a["normalize"]), "activation_type": b"swiglu",
                "swiglu_fusion": 1, "expert_weight_bits": 4, "activation_alpha": np.float32(alpha),
                "activation_beta": 0.0 if limit is None else 1.0,
                "swiglu_limit": None if limit is None else np.float32(limit)}
        biases = [m["inputs"][i] for i in (4, 7)]  # (gpt-oss's experts': fc1's and fc2's, else none)
        if (any(m.get(key) != value for key, value in want.items()) or len(m["inputs"]) != 15
                or any(m["inputs"][i] for i in (8, 13))
                or biases not in ([f"{e}.fc1.bias", f"{e}.fc2.bias"], ["", ""])):
            raise Unsupported(f"{e}: a QMoE node other than the exporter's (export/graph.py experts)")
        tensors = []
        for part, (n, k) in (("fc1", (2 * width, hidden)), ("fc2", (hidden, width))):
            blocks = _blocks(k, g)
            tensors += [self._tensor(f"{e}.{part}.B", np.uint8, count * n * blocks * g // 2),
                        self._tensor(f"{e}.{part}.scales", np.float32, count * n * blocks),
                        self._tensor(f"{e}.{part}.zero_points", np.uint8, count * n * ((blocks + 1) // 2))]
        if [m["inputs"][i] for i in (2, 3, 5, 6, 11, 12)] != [f"{e}.{part}.{kind}" for part, kinds in (
                ("fc1", ("B", "scales")), ("fc2", ("B", "scales")), ("fc1", ("zero_points",)),
                ("fc2", ("zero_points",))) for kind in kinds]:
            raise Unsupported(f"{e}: the QMoE node reads other weights than its experts'")
        router = np.ascontiguousarray(self._tensor(a["router"], np.float32, hidden * count).reshape(hidden, count).T)
        scratch = np.zeros(a["top_k"] * 2 * width + width + hidden + 2 * count + 2 * a["top_k"],
                           np.float32)  # (cpu_ops.h: scratch)
        self.act_params += [router, scratch]  # (alive as long as the op)
        if a["bias"]:  # (LFM2-MoE's, ERNIE 4.5's, which the graph adds to the scores it chooses by)
            rec.expert_bias = self._tensor(a["bias"], np.float32, count).ctypes.data
        rec.n, rec.k, rec.group, rec.scale = width, hidden, g, a["scale"]
        rec.experts, rec.top_k, rec.normalize, rec.sigmoid = count, a["top_k"], a["normalize"], a["sigmoid"]
        if biases[0]:
            rec.fc1_bias = self._tensor(biases[0], np.float32, count * 2 * width).ctypes.data
            rec.fc2_bias = self._tensor(biases[1], np.float32, count * hidden).ctypes.data
        if a["router_bias"]:  # (gpt-oss's: on the logits)
            rec.bias = self._tensor(a["router_bias"], np.float32, count).ctypes.data
        rec.swiglu_alpha, rec.swiglu_limit = alpha, limit or 0.0
        if a["shared"]:  # (Qwen2-MoE's shared expert's output, which the ops before wrote; its gate's row)
            rec.residual = self.buffers[a["shared"]].ctypes.data
            if a["shared_gate"]:
                rec.shared_gate = self._tensor(a["shared_gate"], np.float32, hidden).ctypes.data
        rec.w0, rec.w1, rec.w2, rec.w3, rec.w4, rec.w5 = (t.ctypes.data for t in tensors)
        rec.router, rec.scratch = router.ctypes.data, scratch.ctypes.data

    def _op(self, op) -> CpuOp:
        a, spec, buf = op.args, self.spec, self.buffers
        rec = CpuOp(kind=OP_KINDS[op.kind])
        ptr = lambda name: buf[name].ctypes.data  # noqa: E731
        if op.kind == "embed":
            rec.n, rec.out, rec.scale = spec.hidden, ptr(a["out"]), float(a["scale"] or 0.0)
            # the graph's fp16 table (the op names the cuda engine's, int8 rows: decoder.embed_table)
            rec.table = self._tensor("model.embed_tokens.weight", np.float16, spec.vocab * spec.hidden).ctypes.data
            if a["positions"]:  # (GPT-2's learned positions: the graph's table, rows by position)
                rec.positions = self._tensor(a["positions"], np.float32, spec.max_positions * spec.hidden).ctypes.data
        elif op.kind in ("norm", "add_norm"):
            rec.n, rec.x, rec.out = spec.hidden, ptr(a["x"]), ptr(a["out"])
            rec.w_norm = self._tensor(a["weight"], np.float32, spec.hidden).ctypes.data
            if a["bias"]:  # a LayerNorm's
                rec.bias = self._tensor(a["bias"], np.float32, spec.hidden).ctypes.data
            if op.kind == "add_norm":
                rec.residual = ptr(a["residual"])
        elif op.kind == "linear":
            if a["norm"] or a["epilogue"] != "store":  # a fused op: its output would not fit its buffer
                raise Unsupported(f"{a['weight']}: a fused linear ({a['epilogue']}), which decode_step.c does not run")
            rec.x, rec.out = ptr(a["x"]), ptr(a["out"])
            self._linear(rec, a["weight"], a["N"], a["K"])
            if a["bias"] and f"{a['weight']}.bias" not in self.arrays:  # (GPT-J's o_proj beside its MLP's biases)
                self.zero_biases.append(np.zeros(a["N"], np.float32))  # (kept alive: the record points at it)
                rec.bias = self.zero_biases[-1].ctypes.data
            elif a["bias"]:
                rec.bias = self._tensor(f"{a['weight']}.bias", np.float32, a["N"]).ctypes.data
            elif f"{a['weight']}.bias" in self.arrays:
                raise Unsupported(f"{a['weight']} has a bias the op list does not expect")
        elif op.kind == "add":
            rec.n, rec.x, rec.residual = spec.hidden, ptr(a["x"]), ptr(a["residual"])
        elif op.kind == "head_norm":
            rec.n, rec.k, rec.offset, rec.x = a["heads"], a["size"], a["offset"], ptr(a["x"])
            rec.w_norm = self._tensor(a["weight"], np.float32, a["size"]).ctypes.data
        elif op.kind in ("attention", "rope"):
            rec.x = ptr(a["qkv"])
            if op.kind == "attention":
                rec.out, rec.layer, rec.window = ptr(a["out"]), a["layer"], a["window"]
                rec.scale, rec.softcap = spec.attn_scale, spec.attn_softcap
                if a["sinks"]:  # (gpt-oss's: the graph's, one logit a head)
                    rec.sinks = self._tensor(a["sinks"], np.float32, spec.heads).ctypes.data
            else:
                rec.n = a["heads"]
            if a["rope"] is not None:  # (None: q and k rotated by a rope op already)
                half = spec.max_positions * (spec.head_dim // 2)
                rec.cos = self._tensor(f"rope.{a['rope']}.cos", np.float32, half).ctypes.data
                rec.sin = self._tensor(f"rope.{a['rope']}.sin", np.float32, half).ctypes.data
        elif op.kind == "act":
            rec.n, rec.x, rec.out = a["n"], ptr(a["x"]), ptr(a["out"])
            rec.kind_arg = ACT_KINDS[a["kind"]] | (0 if a["gated"] else ACT_UNGATED)
            if a["params"]:  # (Apertus's xIELU: the layer's four, the graph's scalars, in w_norm)
                from .export.spec import XIELU_PARAMS

                params = np.array([self._tensor(f"{a['params']}.{n}", np.float32, 1)[()] for n in XIELU_PARAMS],
                                  np.float32)
                self.act_params.append(params)  # (alive as long as the op)
                rec.w_norm = params.ctypes.data
        elif op.kind == "head_gate":  # (LFM3's) the gates' weight as the graph's MatMul holds it, [hidden, heads]
            rec.n, rec.k, rec.x, rec.out = a["heads"], spec.hidden, ptr(a["x"]), ptr(a["ctx"])
            rec.w_norm = self._tensor(a["weight"], np.float32, spec.hidden * a["heads"]).ctypes.data
        elif op.kind == "output_gate":  # (AFMoE's)
            rec.n, rec.x, rec.out = a["n"], ptr(a["x"]), ptr(a["ctx"])
        elif op.kind == "clamp":  # (OLMo 1's clip_qkv)
            rec.n, rec.x, rec.scale = a["n"], ptr(a["x"]), a["limit"]
        elif op.kind == "short_conv":  # (LFM2's) its taps as [hidden, kernel]: the graph holds one [hidden] each
            rec.n, rec.k, rec.x, rec.out = spec.hidden, spec.conv_kernel, ptr(a["x"]), ptr(a["out"])
            rec.residual = self.conv_rows[a["layer"]].ctypes.data
            taps = np.ascontiguousarray(np.stack([self._tensor(f"{a['weight']}.{j}", np.float32, spec.hidden)
                                                  for j in range(spec.conv_kernel)], axis=1))
            self.act_params.append(taps)  # (alive as long as the op)
            rec.w_norm = taps.ctypes.data
            if a["bias"]:
                rec.bias = self._tensor(a["bias"], np.float32, spec.hidden).ctypes.data
        elif op.kind == "delta_conv":  # (Qwen3.5's) its taps as [conv_dim, kernel]: the graph holds one [conv_dim] each
            d = spec.delta
            rec.n, rec.k, rec.x = d.conv_dim, d.kernel, ptr(a["x"])
            rec.residual = self.delta_states[a["layer"]][0].ctypes.data
            taps = np.ascontiguousarray(np.stack([self._tensor(f"{a['weight']}.{j}", np.float32, d.conv_dim)
                                                  for j in range(d.kernel)], axis=1))
            self.act_params.append(taps)  # (alive as long as the op)
            rec.w_norm = taps.ctypes.data
            if a["bias"]:  # (a Mamba-2's)
                rec.bias = self._tensor(a["bias"], np.float32, d.conv_dim).ctypes.data
        elif op.kind in ("delta_rule", "mamba_rule"):  # b and a as [v_heads, hidden]: the graph's are [hidden, v_heads]
            d, hidden = spec.delta, spec.hidden
            rec.x, rec.out, rec.normed, rec.k = ptr(a["x"]), ptr(a["out"]), ptr(a["normed"]), hidden
            rec.state = self.delta_states[a["layer"]][1].ctypes.data
            for key in ("b", "a") if op.kind == "delta_rule" else ("a",):
                rows = np.ascontiguousarray(self._tensor(a[key], np.float32, hidden * d.v_heads).reshape(hidden, -1).T)
                self.act_params.append(rows)
                setattr(rec, f"delta_{key}", rows.ctypes.data)
            rec.dt_bias = self._tensor(a["dt_bias"], np.float32, d.v_heads).ctypes.data
            rec.rate = self._tensor(a["rate"], np.float32, d.v_heads).ctypes.data
            if op.kind == "delta_rule":
                rec.w_norm = self._tensor(a["norm"], np.float32, d.v_dim).ctypes.data
            else:  # (Granite 4.0-H's: its D, dt's bounds)
                rec.skip = self._tensor(a["skip"], np.float32, d.v_heads).ctypes.data
                rec.dt_min, rec.dt_max = d.dt_min, math.inf if d.dt_max is None else d.dt_max
            rec.k_heads, rec.v_heads, rec.k_dim, rec.v_dim = d.k_heads, d.v_heads, d.k_dim, d.v_dim
        elif op.kind == "group_norm":  # (a Mamba-2's, by group)
            d = spec.delta
            rec.n, rec.k, rec.x = d.value_dim, a["groups"], ptr(a["x"])
            rec.w_norm = self._tensor(a["weight"], np.float32, d.value_dim).ctypes.data
        elif op.kind == "moe":
            if a["norm"]:
                raise Unsupported(f"{a['experts']}: a fused norm, which decode_step.c does not run")
            rec.x, rec.out = ptr(a["x"]), ptr(a["out"])
            self._experts(rec, a)
        elif op.kind == "lm_head":
            rec.x, rec.out, rec.softcap = ptr(a["x"]), ptr(a["out"]), a["softcap"]
            self._linear(rec, "lm_head.q4", spec.vocab, spec.hidden)
            rec.table = self._tensor(self.exact_table, np.float16, spec.vocab * spec.hidden).ctypes.data
            if a["bias"]:  # (Phi's: on every logit before the top_k, and on their exact values)
                rec.bias = self._tensor(a["bias"], np.float32, spec.vocab).ctypes.data
        return rec

    def mirror(self, first: int, count: int) -> None:
        """Copy cache rows [first, first + count), which ONNX Runtime just wrote, into the step's bf16 copy."""
        if count > 0:
            self.lib.cpu_mirror_rows(ctypes.byref(self.model), self.spec.layers, int(first), int(count))

    # ------------------------------------------------------------ one token
    def step(self, token: int, position: int) -> np.ndarray:
        """Logits float32 [V] after `token` at `position` (a fresh array), the top_k re-scored in place."""
        self.lib.decode_step(ctypes.byref(self.model), self.program, len(self.ops), int(token), int(position), None)
        logits = self.buffers["logits"].copy()
        logits[self.scratch["top_ids"][0]] = self.scratch["top_logits"][0]
        return logits
