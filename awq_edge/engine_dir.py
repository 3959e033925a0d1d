"""Engine and export folders, read as untrusted input (docs/runtime.md, "The engine directory").

    manifest = read_manifest(path)                        # format, version, backend, device, plan
    files = check_files(path, manifest["files"], ...)     # every listed file: plain name, size, hash
    info = read_export_info(path, files)                  # export.json, checked against itself,
                                                          # the ONNX graph and the files

Every number the memory plan and the backends use comes out of here checked: a type and a
range, and agreement with the other fields and with the files (weight_bytes is what the
graph's initializers and the exact lm_head table hold, kv_bytes_per_token is 2 x layers x
kv_heads x head_dim x itemsize, the vocabulary and hidden size are the embedding table's
shape, ...). So an edited number cannot make the memory cap meaningless, and a file name
cannot point outside the folder.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import UserError
from .packing import is_permutation
from .untrusted import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS,
                        MAX_VOCAB, Fields, check_file_records, plain_name, read_json)

MANIFEST = "manifest.json"
EXPORT_INFO = "export.json"
MODEL_FILE = "model.onnx"
ENGINE_FORMAT = "awq-edge-engine"
TRT_ENGINE_FORMAT = "awq-edge-trt-engine"   # written by awq_edge.trt_build
ENGINE_FORMAT_VERSION = 2                   # 2: sampled hashes of large files, checked export.json
EXPORT_FORMAT = "awq-edge-export"
EXPORT_FORMAT_VERSION = 2
ACT_DTYPES = {"float32": 4, "float16": 2}
REBUILD = "rebuild the engine with `awq-edge build`"
REEXPORT = "export the checkpoint again with `awq-edge export`"


def read_manifest(path: Path) -> dict:
    """manifest.json of an engine dir, its fields checked, or a one-line error saying what PATH is instead."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"engine not found: {path}; build one with `awq-edge build MODEL --output {path}`")
    if not path.is_dir():
        raise UserError(f"{path} is a file, not an engine directory; build one with `awq-edge build`")
    if not (path / MANIFEST).exists():
        if (path / EXPORT_INFO).exists():
            raise UserError(f"{path} is an ONNX export, not an engine; run `awq-edge build {path} --output ENGINE`")
        raise UserError(f"{path} is not an awq-edge engine (no {MANIFEST}); build one with `awq-edge build`")
    manifest = read_json(path / MANIFEST, REBUILD)
    f = Fields(manifest, str(path / MANIFEST), REBUILD)
    if manifest.get("format") not in (ENGINE_FORMAT, TRT_ENGINE_FORMAT):
        raise UserError(f"{path} is not an awq-edge engine (unknown manifest format); {REBUILD}")
    if manifest.get("format_version") != ENGINE_FORMAT_VERSION:
        raise UserError(f"{path} was built by an incompatible awq-edge (engine format "
                        f"{str(manifest.get('format_version'))[:20]}, this awq-edge reads {ENGINE_FORMAT_VERSION}); "
                        f"{REBUILD}")
    default_backend = "trt" if manifest["format"] == TRT_ENGINE_FORMAT else "ort"
    manifest["backend"] = f.str("backend", ("ort", "trt", "cuda"), default=default_backend)
    f.str("device")
    plan = f.obj("memory_plan")
    plan.int("cap", 1, 1 << 50)
    plan.int("context", 1, MAX_POSITIONS)
    if manifest["backend"] == "cuda":  # its kernels: a cubin per plugins.CUBIN_SOURCES module, listed files
        from .plugins import CUBIN_SOURCES

        arch = f.str("gpu_arch")
        kernels = f.obj("kernels")
        if not re.fullmatch(r"sm_\d{2,3}", arch) or set(kernels.raw) != set(CUBIN_SOURCES):
            raise UserError(f"{path / MANIFEST}: gpu_arch or kernels are not what a cuda engine has; {REBUILD}")
        if not re.fullmatch(r"\d{1,3}\.\d{1,3}", f.str("kernels_cuda", default="0.0")):  # (absent: built before)
            raise UserError(f"{path / MANIFEST}: kernels_cuda is not a CUDA version like 12.6; {REBUILD}")
        for module in CUBIN_SOURCES:
            name = plain_name(kernels.str(module), f"{path / MANIFEST} kernels", REBUILD)
            if name not in manifest.get("files", {}):
                raise UserError(f"{path / MANIFEST}: kernels {name} is not among the engine's listed files; {REBUILD}")
    if manifest["format"] == TRT_ENGINE_FORMAT:  # a GPU engine carries code: it must be its own, listed file
        for key in ("engine", "plugin_library"):
            name = plain_name(f.str(key), f"{path / MANIFEST} {key}", REBUILD)
            if name not in manifest.get("files", {}):
                raise UserError(f"{path / MANIFEST}: {key} {name} is not among the engine's listed files; {REBUILD}")
    return manifest


def check_files(path: Path, files, full_hash: bool = False, fix: str = REBUILD) -> dict[str, dict]:
    """Every file of FILES (name -> size and hashes) is in PATH, whole; returns the checked records."""
    where = str(Path(path) / (MANIFEST if fix == REBUILD else EXPORT_INFO))
    return check_file_records(Path(path), files, where, fix, full_hash)


@dataclass(frozen=True)
class ExportInfo:
    """export.json, checked (docs/graph.md). Only what the runtime and the memory plan use."""
    target: str                  # ort | onnx | trt (| trt_cpu_standin: tests, export/cpu_standin.py)
    kv_mode: str                 # shared_buffer | concat
    act_dtype: str               # float32 | float16
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    all_logits: bool
    matmul_accuracy_level: int
    weight_bytes: int
    kv_bytes_per_token: int
    lm_head_exact: dict | None   # {"top_k", "table"}: the graph outputs top_ids / top_logits
    config: dict                 # the model's config.json as exported (tokenizer: eos ids)
    quantization: dict           # the checkpoint's quantization_config and the quantizer's settings
    files: dict                  # the folder's checked file records (name -> size, sha256)
    # LFM2: the layers that are short convolutions (inputs conv_state.{i}, outputs conv_new.{i}: no KV)
    # and the tokens each convolves
    conv_layers: tuple = ()
    conv_kernel: int = 0
    # Qwen3.5: its gated delta nets (export.spec.DeltaNet; inputs delta_conv.{i} and delta_state.{i}, outputs
    # delta_conv_new.{i} and delta_state_new.{i}: no KV), or None
    delta_net: object = None

    @property
    def delta_layers(self) -> tuple:
        return self.delta_net.layers if self.delta_net else ()

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.conv_layers and i not in self.delta_layers]

    @functools.cached_property
    def mlp_width(self) -> int:
        """The MLP activations' width of a prefill token: intermediate_size, or a mixture of experts' experts a
        token runs together, where wider (read from the config once: the memory plan asks at every context
        it tries)."""
        from .export.spec import model_spec
        from .families import find_family

        family = find_family(self.config.get("model_type"), self.config)
        if family is None or not family.experts_key:
            return self.intermediate_size
        spec = model_spec(self.config)
        return max(self.intermediate_size, spec.experts_per_token * spec.expert_width, spec.shared_width)

    def workspace(self, context: int) -> int:
        """Bytes of one prefill chunk's activations in ONNX Runtime (memory.workspace_bytes)."""
        from .memory import workspace_bytes

        mamba = self.delta_net is not None and self.delta_net.rule == "mamba2"
        return workspace_bytes(self.hidden_size, self.mlp_width, self.vocab_size, self.num_heads, context,
                               self.all_logits, self.delta_net.v_heads if mamba else 0)


def read_export_info(folder: Path, listed: dict[str, dict] | None = None, graph: bool = True) -> ExportInfo:
    """export.json of an export or engine dir, checked against itself and (graph=True) model.onnx.

    listed: the checked file records of the folder (an engine's manifest); None for an export
    dir, whose own export.json lists its files (checked here, sizes and hashes)."""
    folder = Path(folder)
    fix = REBUILD if listed is not None else REEXPORT
    path = folder / EXPORT_INFO
    raw = read_json(path, fix)
    f = Fields(raw, str(path), fix)
    if raw.get("format") != EXPORT_FORMAT or raw.get("format_version") != EXPORT_FORMAT_VERSION:
        raise UserError(f"{path} was written by an incompatible awq-edge (export format "
                        f"{str(raw.get('format_version'))[:20]}, this awq-edge reads {EXPORT_FORMAT_VERSION}); {fix}")
    if listed is None:
        listed = check_files(folder, raw.get("files"), full_hash=False, fix=fix)
    layers = f.int("num_layers", 1, MAX_LAYERS)
    heads = f.int("num_heads", 1, MAX_HEADS)
    kv_heads = f.int("num_kv_heads", 1, heads)
    head_dim = f.int("head_dim", 1, MAX_HEAD_DIM)
    act_dtype = f.str("act_dtype", tuple(ACT_DTYPES))
    if heads % kv_heads:
        raise UserError(f"{path}: num_heads {heads} is not a multiple of num_kv_heads {kv_heads}; {fix}")
    hidden = f.int("hidden_size", 1, MAX_HIDDEN)
    conv_layers, conv_kernel = _read_conv_layers(f, layers)
    delta = _read_delta_net(f, layers, conv_layers)
    attention = layers - len(conv_layers) - (len(delta.layers) if delta else 0)
    kv_bytes = f.int("kv_bytes_per_token", 1, 1 << 40)
    if kv_bytes != (2 * attention * kv_heads * head_dim + len(conv_layers) * hidden) * ACT_DTYPES[act_dtype]:
        raise UserError(f"{path}: kv_bytes_per_token {kv_bytes} is not (2 x {attention} attention layers x {kv_heads} "
                        f"KV heads x {head_dim} + {len(conv_layers)} conv layers x {hidden}) x "
                        f"{ACT_DTYPES[act_dtype]} bytes; {fix}")
    config = f.obj("config")
    info = ExportInfo(
        target=f.str("target", ("ort", "onnx", "trt", "trt_cpu_standin")),
        kv_mode=f.str("kv_mode", ("shared_buffer", "concat")),
        act_dtype=act_dtype, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=f.int("intermediate_size", 1, MAX_INTERMEDIATE),
        vocab_size=f.int("vocab_size", 1, MAX_VOCAB),
        max_position_embeddings=f.int("max_position_embeddings", 1, MAX_POSITIONS),
        all_logits=f.bool("all_logits"),
        matmul_accuracy_level=f.int("matmul_accuracy_level", 0, 4),
        weight_bytes=f.int("weight_bytes", 1, 1 << 50),
        kv_bytes_per_token=kv_bytes,
        lm_head_exact=_read_exact_head(f),
        config=config.raw, quantization=raw["quantization"] if isinstance(raw.get("quantization"), dict) else {},
        files=listed, conv_layers=conv_layers, conv_kernel=conv_kernel, delta_net=delta)
    if info.lm_head_exact and info.lm_head_exact["top_k"] > info.vocab_size:
        raise UserError(f"{path}: lm_head_exact top_k {info.lm_head_exact['top_k']} is more than the vocabulary; {fix}")
    if graph:
        check_graph(folder, info, listed, fix)
    return info


def _read_conv_layers(f: Fields, layers: int) -> tuple[tuple, int]:
    """(conv_layers, conv_kernel) of an LFM2 export: distinct layer numbers below `layers`, not all of
    them (the rest are attention), and the kernel; ((), 0) where export.json names none."""
    listed = f.raw.get("conv_layers")
    if listed is None:
        return (), 0
    from .export.spec import MAX_CONV_KERNEL

    return _layer_numbers(listed, "conv_layers", layers, f), f.int("conv_kernel", 2, MAX_CONV_KERNEL)


def _layer_numbers(listed, what: str, layers: int, f: Fields, taken: tuple = ()) -> tuple:
    """export.json's list `what` of the layers of one kind, sorted: distinct layer numbers below `layers`,
    none of `taken` (another kind's), not all of them (the rest are attention); else one line."""
    if (not isinstance(listed, list) or not 0 < len(listed) < layers or len(set(map(str, listed))) != len(listed)
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers and i not in taken
                       for i in listed)):
        raise UserError(f"{f.where}: {what} must list distinct layer numbers below {layers}, not all of them; {f.fix}")
    return tuple(sorted(listed))


def _read_delta_net(f: Fields, layers: int, conv_layers: tuple):
    """export.spec.DeltaNet of a Qwen3.5 or Granite 4.0-H export (export.json `delta_net`), each number bounded and
    its state (the runtime allocates it) at most MAX_DELTA_STATE bytes a layer; None where export.json names none."""
    from .export.spec import MAX_CONV_KERNEL, MAX_DELTA_STATE, DeltaNet

    d = f.obj("delta_net", optional=True)
    if d is None:
        return None
    delta = DeltaNet(layers=_layer_numbers(d.raw.get("layers"), "delta_net layers", layers, f, conv_layers),
                     k_heads=d.int("k_heads", 1, MAX_HEADS),
                     v_heads=d.int("v_heads", 1, MAX_HEADS), k_dim=d.int("k_dim", 1, MAX_HEAD_DIM),
                     v_dim=d.int("v_dim", 1, MAX_HEAD_DIM), kernel=d.int("kernel", 2, MAX_CONV_KERNEL),
                     rule=d.str("rule", ("gated", "mamba2"), default="gated"),
                     conv_bias=d.bool("conv_bias", default=False), dt_min=d.float("dt_min", 0, 1e30, default=0.0),
                     dt_max=d.float("dt_max", 0, 1e30, default=None))
    if delta.v_heads % delta.k_heads or delta.state_elems * 4 > MAX_DELTA_STATE or (
            delta.dt_max is not None and delta.dt_max < delta.dt_min):
        raise UserError(f"{f.where}: delta_net's heads do not group ({delta.v_heads} value heads, {delta.k_heads} key "
                        f"heads), its state is over {MAX_DELTA_STATE >> 20} MiB a layer or dt_max is below dt_min; "
                        f"{f.fix}")
    return delta


def _read_exact_head(f: Fields) -> dict | None:
    head = f.obj("lm_head_exact", optional=True)
    if head is None:
        return None
    return {"top_k": head.int("top_k", 1, MAX_VOCAB), "table": head.str("table")}


# ---------------------------------------------------------------- the graph against export.json

def check_graph(folder: Path, info: ExportInfo, listed: dict[str, dict], fix: str) -> None:
    """model.onnx (its structure: the weights stay on disk) agrees with export.json and the files.

    Its external data must be listed files of the folder and lie inside them; the initializers'
    bytes are weight_bytes; the inputs, outputs, the embedding table and the exact lm_head
    table have the shapes export.json gives."""
    import onnx
    from onnx import TensorProto

    where = folder / MODEL_FILE
    if MODEL_FILE not in listed:
        raise UserError(f"{folder} has no listed {MODEL_FILE}; {fix}")
    try:
        model = onnx.load(str(where), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends: a corrupt file
        raise UserError(f"{where} is not a readable ONNX graph ({type(e).__name__}); {fix}") from None
    graph = model.graph
    weight_bytes, shapes, types = 0, {}, {}
    for tensor in graph.initializer:
        nbytes = _tensor_bytes(tensor, where, fix)
        shapes[tensor.name], types[tensor.name] = list(tensor.dims), tensor.data_type
        if tensor.data_location == TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in tensor.external_data}
            name = plain_name(ext.get("location"), f"{where} initializer {tensor.name}", fix)
            offset, length = _int_text(ext.get("offset", "0")), _int_text(ext.get("length", str(nbytes)))
            if name not in listed or offset < 0 or length != nbytes or offset + length > listed[name]["size"]:
                raise UserError(f"{where}: initializer {tensor.name} points at bytes {offset}..{offset + length} of "
                                f"{name}, which is not a listed file holding them; {fix}")
        weight_bytes += nbytes
    if weight_bytes != info.weight_bytes:
        raise UserError(f"{folder / EXPORT_INFO}: weight_bytes {info.weight_bytes} is not what the files hold "
                        f"({weight_bytes}); {fix}")
    if shapes.get("model.embed_tokens.weight") != [info.vocab_size, info.hidden_size]:
        raise UserError(f"{folder / EXPORT_INFO}: vocab_size x hidden_size {info.vocab_size} x {info.hidden_size} "
                        f"is not the embedding table's {shapes.get('model.embed_tokens.weight')}; {fix}")
    rope = shapes.get("rope.0.cos")
    if not rope or rope[0] < info.max_position_embeddings:
        raise UserError(f"{folder / EXPORT_INFO}: max_position_embeddings {info.max_position_embeddings} is more "
                        f"than the graph's RoPE table holds; {fix}")
    act = TensorProto.FLOAT if info.act_dtype == "float32" else TensorProto.FLOAT16
    kv = {"elem": act, "dims": [1, info.num_kv_heads, None, info.head_dim]}
    expected_inputs = {"input_ids": None, "past_length": None}
    expected_inputs.update({f"past_{kind}.{i}": kv for i in info.attention_layers for kind in ("key", "value")})
    expected_inputs.update({f"conv_state.{i}": {"elem": act, "dims": [1, info.conv_kernel - 1, info.hidden_size]}
                            for i in info.conv_layers})
    delta_outputs = {}
    if info.delta_net:  # (Qwen3.5's) float32 whatever the activations' dtype
        from .export.delta_net import state_names

        conv, state = ({"elem": TensorProto.FLOAT, "dims": list(shape)} for shape in info.delta_net.state_shapes)
        for i in info.delta_layers:
            conv_in, state_in, conv_out, state_out = state_names(i)
            expected_inputs.update({conv_in: conv, state_in: state})
            delta_outputs.update({conv_out: conv, state_out: state})
    expected_outputs = {"logits": {"elem": TensorProto.FLOAT,
                                   "dims": [1, None, info.vocab_size] if info.all_logits else [1, info.vocab_size]}}
    if info.lm_head_exact:
        k, table = info.lm_head_exact["top_k"], info.lm_head_exact["table"]
        if shapes.get(table) != [info.vocab_size, info.hidden_size] or types.get(table) != TensorProto.FLOAT16:
            raise UserError(f"{folder / EXPORT_INFO}: lm_head_exact table {table[:80]!r} is not a {info.vocab_size} x "
                            f"{info.hidden_size} fp16 table of the graph; {fix}")
        expected_outputs["top_ids"] = {"elem": TensorProto.INT64, "dims": [1, k]}
        expected_outputs["top_logits"] = {"elem": TensorProto.FLOAT, "dims": [1, k]}
    if info.target != "trt":
        expected_outputs.update({f"present_{kind}.{i}": kv for i in info.attention_layers for kind in ("key", "value")})
    expected_outputs.update({f"conv_new.{i}": {"elem": act, "dims": [1, None, info.hidden_size]}
                             for i in info.conv_layers})
    expected_outputs.update(delta_outputs)
    for kind, values, expected in (("inputs", graph.input, expected_inputs), ("outputs", graph.output, expected_outputs)):
        found = {v.name: v for v in values if v.name not in shapes}
        if set(found) != set(expected):
            odd = sorted(set(found) ^ set(expected))[:3]
            raise UserError(f"{where}: the graph's {kind} do not match export.json ({', '.join(odd)}); {fix}")
        for name, want in expected.items():
            if want and not _value_matches(found[name], want):
                raise UserError(f"{where}: {kind[:-1]} {name} does not have the type and shape export.json "
                                f"implies; {fix}")
    for node in graph.node:  # the attention's head counts, where the op carries them
        for attr in node.attribute:
            want = {"num_heads": info.num_heads, "kv_num_heads": info.num_kv_heads,
                    "kv_heads": info.num_kv_heads}.get(attr.name)
            if want is not None and attr.i != want:
                raise UserError(f"{folder / EXPORT_INFO}: num_heads/num_kv_heads disagree with the graph's "
                                f"{node.op_type} ({attr.name} {attr.i}); {fix}")
    # The MLP's width from the exporter's names (export/graph.py): gate_proj's and up_proj's N, or half
    # of the fused gate_up_proj's (target ort), or DequantizeLinear's [K, N] weights (target onnx), in the
    # first layer with a dense MLP (a mixture of experts' have none: mlp.experts.*)
    matmuls = {n.name: a.i for n in graph.node for a in n.attribute if a.name == "N"}
    widths = []
    for mlp in (f"model.layers.{i}.mlp" for i in range(info.num_layers)):
        names = [f"{mlp}.{n}" for n in ("gate_proj", "up_proj")]
        widths = [matmuls[n] for n in names if n in matmuls]
        widths += [matmuls[f"{mlp}.gate_up_proj"] // 2] if f"{mlp}.gate_up_proj" in matmuls else []
        widths += [shapes[f"{n}.weight_uint4"][1] for n in names if len(shapes.get(f"{n}.weight_uint4", ())) == 2]
        if widths:
            break
    if not widths and any(".mlp.experts." in name for name in shapes):  # (every layer's a mixture of experts)
        return
    if not widths or set(widths) != {info.intermediate_size}:
        odd = sorted(set(widths) - {info.intermediate_size})[:1] or "none found"
        raise UserError(f"{folder / EXPORT_INFO}: intermediate_size {info.intermediate_size} is not the width of "
                        f"the graph's MLP ({odd}); {fix}")


_ELEMENT_BITS = {1: 32, 2: 8, 3: 8, 4: 16, 5: 16, 6: 32, 7: 64, 9: 8, 10: 16, 11: 64, 12: 32, 13: 64, 16: 16,
                 21: 4, 22: 4}  # onnx TensorProto element types -> bits (21/22: uint4/int4)


def _tensor_bytes(tensor, where: Path, fix: str) -> int:
    """Bytes of an initializer's data from its type and shape (the exporter stores raw data)."""
    bits = _ELEMENT_BITS.get(tensor.data_type)
    count = 1
    for d in tensor.dims:
        if d < 0:
            bits = None
        count *= max(d, 0)
    if bits is None or count > 1 << 44:
        raise UserError(f"{where}: initializer {tensor.name} has an unsupported type or shape; {fix}")
    return (count * bits + 7) // 8


def _int_text(text) -> int:
    """An external-data offset or length (decimal text); -1 when it is not one."""
    return int(text) if isinstance(text, str) and text.isdigit() and len(text) < 20 else -1


def _value_matches(value, want: dict) -> bool:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return t.elem_type == want["elem"] and len(dims) == len(want["dims"]) and all(
        w is None or d == w for d, w in zip(dims, want["dims"]))


# ---------------------------------------------------------------- native (cuda) engines

DECODER_INFO = "decoder.json"
DECODER_FORMAT = "awq-edge-decoder"
DECODER_FORMAT_VERSION = 3  # 2: gate/up rows interleaved (2026-12-04); 3: int8 embedding rows (2026-12-06)
TENSOR_ALIGN = 256  # every tensor of weights.bin starts at a multiple of this (the GPU's alignment)
DTYPE_BYTES = {"float16": 2, "float32": 4, "int32": 4, "int8": 1}


def tensor_nbytes(dtype: str, shape) -> int:
    return DTYPE_BYTES[dtype] * int(np.prod(shape, dtype=np.int64))


@dataclass(frozen=True)
class DecoderInfo:
    """decoder.json of a native engine, checked: the DecoderSpec (recomputed from config.json),
    and the index of weights.bin (every tensor the spec needs, with its dtype, shape and offset)."""
    spec: object                 # awq_edge.decoder.DecoderSpec
    weights_file: str
    tensors: dict                # name -> (dtype, shape, offset)
    weight_bytes: int
    config: dict
    lm_head: str                 # int8 | int4 | fp16 (decoder.LM_HEADS)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.spec.kv_bytes_per_token

    @property
    def max_position_embeddings(self) -> int:
        return self.spec.max_positions

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab

    def workspace(self, context: int) -> int:
        """Device bytes besides weights and KV: one prefill chunk's fp16 activations and RoPE
        scratch, decode attention's per-split state, the logits and the sampler's scratch, the
        ids fed and the sampled history, the cuBLAS prefill's slab and workspace, an int4 head's
        candidates, the split-K GEMM's partials, the persistent step's table (what
        cuda_backend._allocate allocates)."""
        from .cuda_backend import (ATTEND_SPLIT_KEYS, GEMM_SPLIT_MAX_TILES, GEMM_SPLIT_WORKSPACE_BYTES,
                                   cublas_prefill_bytes, head_candidate_bytes, step_table_bytes)
        from .decoder import buffer_shapes
        from .memory import PREFILL_CHUNK

        shapes = buffer_shapes(self.spec, PREFILL_CHUNK)
        activations = sum(2 * rows * width for rows, width in (s for s in shapes.values() if len(s) == 2))
        spec = self.spec
        q_rot = 2 * PREFILL_CHUNK * spec.heads * spec.head_dim
        splits = -(-context // ATTEND_SPLIT_KEYS)  # decode attention's partial results and counters
        attention = 4 * spec.heads * (splits * (2 + spec.head_dim) + 1)
        gemm_splits = GEMM_SPLIT_WORKSPACE_BYTES + 4 * GEMM_SPLIT_MAX_TILES  # the split-K GEMM's partials, counters
        return (activations + q_rot + attention + 3 * 4 * spec.vocab + 4 * (PREFILL_CHUNK + context)
                + cublas_prefill_bytes(spec) + head_candidate_bytes(spec) + gemm_splits + step_table_bytes(spec)
                + (1 << 20))


def check_input_orders(weights: Path, tensors: dict, where: Path) -> None:
    """Each act-order linear's `.input_order` a permutation of its inputs: the kernels index x by it."""
    for name, (dtype, shape, offset) in tensors.items():
        if name.endswith(".input_order"):
            order = np.fromfile(weights, dtype=np.int32, count=shape[0], offset=offset)
            if not is_permutation(order, shape[0]):
                raise UserError(f"{where}: {name} is not a permutation of its {shape[0]} inputs; {REBUILD}")


def read_decoder_info(folder: Path, listed: dict[str, dict]) -> DecoderInfo:
    """decoder.json of a native engine, checked against its config.json, the op list's tensor
    layout and the size of weights.bin."""
    from .decoder import LM_HEADS, decoder_spec, tensor_layout
    from .export.spec import model_spec

    folder = Path(folder)
    path = folder / DECODER_INFO
    if DECODER_INFO not in listed or "config.json" not in listed:
        raise UserError(f"{folder} lists no {DECODER_INFO} or config.json; {REBUILD}")
    raw = read_json(path, REBUILD)
    f = Fields(raw, str(path), REBUILD)
    if raw.get("format") != DECODER_FORMAT or raw.get("format_version") != DECODER_FORMAT_VERSION:
        raise UserError(f"{path} was written by an incompatible awq-edge; {REBUILD}")
    group_size = f.int("group_size", 32, 128)
    if group_size not in (32, 64, 128):
        raise UserError(f"{path}: group_size {group_size} is not 32, 64 or 128; {REBUILD}")
    lm_head = f.str("lm_head", LM_HEADS)
    weights = plain_name(f.str("weights"), f"{path} weights", REBUILD)
    if weights not in listed:
        raise UserError(f"{path}: weights {weights} is not a listed file; {REBUILD}")
    config = read_json(folder / "config.json", REBUILD)
    model = model_spec(config, str(folder / "config.json"), REBUILD)
    spec = decoder_spec(model, group_size, f.bool("qkv_bias"), lm_head, f.bool("act_order", False),
                        f.bool("out_bias", False), f.int("rope_positions", 1, model.max_positions, default=None))
    layout = tensor_layout(spec)
    index = f.obj("tensors")
    if set(index.raw) != set(layout):
        odd = sorted(set(index.raw) ^ set(layout))[:2]
        raise UserError(f"{path}: its tensors are not the ones config.json implies ({', '.join(odd)}); {REBUILD}")
    size, tensors = listed[weights]["size"], {}
    for name, (dtype, shape) in layout.items():
        entry = index.obj(name)
        offset = entry.int("offset", 0, size)
        if entry.str("dtype") != dtype or entry.raw.get("shape") != list(shape) or offset % TENSOR_ALIGN:
            raise UserError(f"{path}: tensor {name} is not {dtype} {list(shape)} at an aligned offset; {REBUILD}")
        tensors[name] = (dtype, shape, offset)
    end = 0
    for name, (dtype, shape, offset) in sorted(tensors.items(), key=lambda item: item[1][2]):
        if offset < end or offset + tensor_nbytes(dtype, shape) > size:
            raise UserError(f"{path}: tensor {name} overlaps another or ends past {weights}; {REBUILD}")
        end = offset + tensor_nbytes(dtype, shape)
    check_input_orders(folder / weights, tensors, path)
    return DecoderInfo(spec=spec, weights_file=weights, tensors=tensors, weight_bytes=size, config=config,
                       lm_head=lm_head)
