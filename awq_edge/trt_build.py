"""`awq-edge build SRC --device orin|rtx4090|rtx4070-laptop`: a TensorRT engine from the exported `trt` ONNX graph.

Order of work (every failure is a one-line UserError naming what was found and what is needed):
  1. the source: an exported graph with AwqMatMulW4A16 nodes (export --target trt);
  2. the machine: an NVIDIA GPU whose arch equals the device profile's (an engine only runs
     on the arch it was built on), and TensorRT >= 10.0 importable from Python;
  3. the plugin library for that arch: built with cmake when missing, cached by a hash of
     plugins/ (awq_edge.plugins), loaded with IPluginRegistry.load_library;
  4. the build: strongly typed network (the graph is fp16), two optimization profiles
     (0 = prefill up to the max input length, 1 = decode with one new token), workspace
     limit from the memory plan, builder optimization level, a timing cache kept per
     arch and TensorRT version in the cache dir;
  5. the output, written into a temp dir next to OUTPUT and renamed at the end, so a failed
     build leaves nothing behind: engine.plan, manifest.json, the plugin library and the
     tokenizer/config files of SRC.

Host memory: the ONNX parser reads weights from the external-data file into one host copy;
the plan is streamed to disk (build_serialized_network_to_stream, where the installed TensorRT has it) instead
of being held in memory next to the weights. This keeps the build near 1x the weight size
plus TensorRT's own working memory; it has not been measured on a device yet.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import plugins
from .checkpoint import commit_staging, output_staging
from .engine_dir import ENGINE_FORMAT_VERSION, EXPORT_INFO, MANIFEST, TRT_ENGINE_FORMAT, read_export_info
from .errors import UserError
from .memory import PREFILL_CHUNK
from .untrusted import file_record

MIN_TENSORRT = (10, 0)
ENGINE_FILE = "engine.plan"
BUILDER_OPTIMIZATION_LEVEL = 3  # TensorRT's default; higher levels mostly add build time
PREFILL_PROFILE, DECODE_PROFILE = 0, 1
# Files of the export copied next to the engine (tokenizer, chat template, model config).
COPIED_SUFFIXES = {".json", ".txt", ".jinja", ".model", ".tiktoken"}  # export.json included

# Shape rules for the dynamic dims of the graph inputs, by ONNX dim_param name:
# name -> ((prefill min, opt, max), (decode min, opt, max)) as functions of (max_input, max_context).
_DIM_RULES = {
    "batch": lambda i, c: ((1, 1, 1), (1, 1, 1)),
    "sequence": lambda i, c: ((1, max(1, i // 2), i), (1, 1, 1)),
    "past_sequence": lambda i, c: ((0, 0, c - 1), (0, c // 2, c - 1)),
    "total_sequence": lambda i, c: ((1, max(1, i // 2), c), (1, c // 2, c)),
}
_DIM_ALIASES = {
    "batch_size": "batch", "sequence_length": "sequence", "seq_len": "sequence", "input_length": "sequence",
    "past_sequence_length": "past_sequence", "past_length": "past_sequence",
    "total_sequence_length": "total_sequence", "context_length": "total_sequence", "kv_length": "total_sequence",
}


# ---------------------------------------------------------------- checks

def find_onnx(src: Path) -> Path:
    """The exported trt graph: SRC itself, SRC/trt/*.onnx or SRC/*.onnx (exactly one)."""
    src = Path(src)
    if src.is_file() and src.suffix == ".onnx":
        return src
    if not src.is_dir():
        raise UserError(f"{src} not found; give the directory written by `awq-edge export --target trt`")
    for folder in (src / "trt", src):
        graphs = sorted(folder.glob("*.onnx")) if folder.is_dir() else []
        if len(graphs) == 1:
            target = read_export_info(folder, graph=False).target
            if target != "trt":
                raise UserError(f"{folder} was exported for target {target!r}; TensorRT needs "
                                "`awq-edge export ... --target trt`")
            return graphs[0]
        if len(graphs) > 1:
            raise UserError(f"{folder} holds several ONNX graphs ({', '.join(g.name for g in graphs)}); "
                            "point SRC at one .onnx file")
    raise UserError(f"no .onnx graph in {src}; export one first with `awq-edge export ... --target trt`")


def check_gpu(device):
    """The GPU this build will run on; it must have the device profile's arch."""
    from .cuda_runtime import find_gpus
    from .devices import all_devices

    gpus = find_gpus()
    if not gpus:
        raise UserError(f"no NVIDIA GPU found (no CUDA driver / nvidia-smi); building for --device {device.name} "
                        f"needs the {device.title} ({device.gpu_arch}) itself: TensorRT engines are built on "
                        "the GPU they run on")
    for gpu in gpus:
        if gpu.arch == device.gpu_arch:
            return gpu
    found = ", ".join(f"{g.name} ({g.arch})" for g in gpus)
    same_arch = [d.name for d in all_devices().values() if d.gpu_arch == gpus[0].arch]
    hint = f"; this GPU matches --device {' / '.join(same_arch)}" if same_arch else ""
    raise UserError(f"--device {device.name} needs a {device.gpu_arch} GPU ({device.title}) but this machine has "
                    f"{found}{hint}")


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - optional, imported only when building/running engines
    except ImportError as e:
        raise UserError(f"TensorRT for Python not found ({e}); need tensorrt >= {'.'.join(map(str, MIN_TENSORRT))} "
                        "(JetPack: apt install python3-libnvinfer; x86: pip install tensorrt)") from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_TENSORRT:
        raise UserError(f"TensorRT {trt.__version__} found; need >= {'.'.join(map(str, MIN_TENSORRT))} "
                        "(IPluginV3 plugins)")
    return trt


def load_plugin_library(trt, library: Path):
    if not Path(library).is_file():
        raise UserError(f"plugin library {library} missing; rebuild the engine with `awq-edge build`")
    handle = trt.get_plugin_registry().load_library(str(library))
    if handle is None:
        raise UserError(f"TensorRT could not load the plugin library {library}")
    return handle


# ---------------------------------------------------------------- planning

def _onnx_inputs(onnx_path: Path) -> list[tuple[str, list]]:
    """(name, dims) of the graph inputs; a dim is an int or its dim_param name. Weights are not loaded."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_param if d.dim_param else d.dim_value for d in value.type.tensor_type.shape.dim]
        inputs.append((value.name, dims))
    return inputs


def profile_shapes(inputs: list[tuple[str, list]], max_input: int, max_context: int,
                   kv_mode: str = "concat") -> list[dict]:
    """Per profile, name -> (min, opt, max) shapes for every input with a dynamic dim.

    docs/graph.md: input_ids [1, S]; past_key.{i} / past_value.{i} [1, Hkv, C, D] where C is
    the past length (kv_mode concat) or the capacity of the KV buffers (kv_mode shared_buffer:
    up to the planned max context; the runtime may plan a smaller one at load).
    Other dynamic dims are matched by their ONNX dim_param name (_DIM_RULES).
    """
    profiles: list[dict] = [{}, {}]
    for name, dims in inputs:
        if all(isinstance(d, int) and d > 0 for d in dims):
            continue
        shapes = [([], [], []), ([], [], [])]
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                rule = ((d, d, d), (d, d, d))
            elif name == "input_ids" and axis == 1:
                rule = _DIM_RULES["sequence"](max_input, max_context)
            elif name.startswith(("past_key", "past_value")) and axis == 2:
                rule = (((1, max_context, max_context),) * 2 if kv_mode == "shared_buffer"
                        else _DIM_RULES["past_sequence"](max_input, max_context))
            else:
                key = _DIM_ALIASES.get(str(d), str(d))
                if key not in _DIM_RULES:
                    raise UserError(f"graph input {name} has a dynamic dim {d!r} with no shape rule (known: "
                                    f"{', '.join(sorted(set(_DIM_RULES) | set(_DIM_ALIASES)))}); re-export the graph")
                rule = _DIM_RULES[key](max_input, max_context)
            for p in (PREFILL_PROFILE, DECODE_PROFILE):
                for j in range(3):
                    shapes[p][j].append(rule[p][j])
        for p in (PREFILL_PROFILE, DECODE_PROFILE):
            profiles[p][name] = tuple(tuple(s) for s in shapes[p])
    return profiles


def plan_memory(info, device, max_memory: int | None, max_context: int | None) -> dict:
    """The engine's memory plan (awq_edge.engine.engine_plan, the one the runtime uses at load, with
    the same overhead figure), plus what the build needs: the prefill chunk and the KV mode."""
    from .engine import engine_plan

    plan = engine_plan({"device": device.name, "backend": "trt"}, info, max_memory, max_context, at_load=False)
    return {**plan.to_dict(), "max_input": PREFILL_CHUNK, "kv_mode": info.kv_mode}


# ---------------------------------------------------------------- build

def _timing_cache_path(trt, gpu_arch: str) -> Path:
    from .data import cache_dir

    return cache_dir() / "trt" / f"timing-{gpu_arch}-trt{trt.__version__}.cache"


def _build(trt, onnx_path: Path, plan: dict, gpu_arch: str, engine_path: Path) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)  # fp16 graph: keep its types
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # reads external data next to the graph
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise UserError(f"TensorRT could not parse {onnx_path.name}: {errors[:400]}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace"])
    config.builder_optimization_level = BUILDER_OPTIMIZATION_LEVEL
    for shapes in profile_shapes(_onnx_inputs(onnx_path), plan["max_input"], plan["context"], plan["kv_mode"]):
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)

    cache_path = _timing_cache_path(trt, gpu_arch)
    timing_cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(timing_cache, ignore_mismatch=False)

    if hasattr(builder, "build_serialized_network_to_stream"):
        # The plan goes straight to disk: no second host copy of the weights.
        class FileWriter(trt.IStreamWriter):
            def __init__(self, f):
                trt.IStreamWriter.__init__(self)
                self.f = f

            def write(self, data):
                return self.f.write(data)

        with open(engine_path, "wb") as f:
            ok = builder.build_serialized_network_to_stream(network, config, FileWriter(f))
    else:
        serialized = builder.build_serialized_network(network, config)
        ok = serialized is not None
        if ok:
            with open(engine_path, "wb") as f:
                f.write(memoryview(serialized))
        del serialized
    if not ok:
        raise UserError("TensorRT failed to build the engine (see the TensorRT messages above)")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))


def build_trt_engine(src_onnx_dir: Path, device, output: Path, *, max_memory: int | None = None,
                     max_context: int | None = None, force: bool = False) -> Path:
    """Build OUTPUT/engine.plan (+ manifest, plugin library, tokenizer files) for a GPU device profile."""
    from .devices import resolve

    if isinstance(device, str):
        device = resolve(device)
    if not device.is_gpu:
        raise UserError(f"--device {device.name} has no GPU; TensorRT engines are for orin, rtx4090, rtx4070-laptop")
    output = Path(output)
    if output.exists() and not force:
        raise UserError(f"{output} already exists; pass --force to replace it")
    onnx_path = find_onnx(Path(src_onnx_dir))
    gpu = check_gpu(device)
    trt = import_tensorrt()
    info = read_export_info(onnx_path.parent)  # the export is untrusted input: its files and graph checked
    plan = plan_memory(info, device, max_memory, max_context)
    plugin_library = plugins.build_trt_plugin_library(device.gpu_arch)
    load_plugin_library(trt, plugin_library)

    staging = output_staging(output, force)
    try:
        _build(trt, onnx_path, plan, device.gpu_arch, staging / ENGINE_FILE)
        shutil.copy2(plugin_library, staging / plugins.TRT_PLUGIN_LIBRARY)
        for name in [*info.files, EXPORT_INFO]:  # listed, plain names
            if Path(name).suffix in COPIED_SUFFIXES:
                shutil.copy2(onnx_path.parent / name, staging / name)
        manifest = {
            "format": TRT_ENGINE_FORMAT,
            "format_version": ENGINE_FORMAT_VERSION,
            "backend": "trt",
            "engine": ENGINE_FILE,
            "plugin_library": plugins.TRT_PLUGIN_LIBRARY,
            "plugin_hash": plugins.source_hash(),
            "tensorrt_version": trt.__version__,
            "gpu_arch": device.gpu_arch,
            "gpu_name": gpu.name,
            "device": device.name,
            "device_title": device.title,
            "profiles": {"prefill": PREFILL_PROFILE, "decode": DECODE_PROFILE},
            "builder_optimization_level": BUILDER_OPTIMIZATION_LEVEL,
            "memory_plan": plan,
            "source": str(onnx_path.resolve()),
        }
        # Sizes and hashes of everything in the engine dir (awq_edge.engine_dir.check_files reads them).
        manifest["files"] = {f.name: file_record(f) for f in sorted(staging.iterdir()) if f.is_file()}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        commit_staging(staging, output)  # --force: the old engine goes only once the new one is complete
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output / ENGINE_FILE
