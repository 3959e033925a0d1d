"""TensorRT backend: runs an engine built by `awq-edge build --device <gpu>` (awq_edge.trt_build).

Thin on purpose: TensorRT does the work, this class binds buffers. Importing this module
needs neither TensorRT nor a GPU; both are looked for when a backend is created.

- The manifest is checked against the GPU and the TensorRT present before anything loads
  (an engine runs only on the arch and TensorRT version it was built with).
- The KV cache is allocated once, for the planned max context (manifest memory_plan):
  kv_mode shared_buffer binds past and present to the same buffers (the graph writes in
  place); kv_mode concat keeps two buffers per tensor and swaps them after every step.
- Profile 0 runs prefill, profile 1 decode. In shared_buffer mode decode shapes never
  change, so the decode step is captured once as a CUDA graph and replayed.
- Sampling is greedy/temperature on the host from the fp32 logits of the last position
  (one V-sized copy per token); sampling on the GPU is not implemented yet.
"""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .trt_build import ENGINE_FILE, MANIFEST

_STREAM_CAPTURE_THREAD_LOCAL = 1


def read_manifest(engine_dir: Path) -> dict:
    path = Path(engine_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{path} not found; {engine_dir} is not an engine from `awq-edge build --device <gpu>`")
    return json.loads(path.read_text())


def check_manifest(manifest: dict, gpus: list, tensorrt_version: str | None) -> None:
    """Raise a one-line UserError when this engine cannot run here."""
    built = f"{manifest['gpu_arch']} ({manifest.get('gpu_name') or manifest.get('device_title', '?')})"
    if not gpus:
        raise UserError(f"no NVIDIA GPU found; this engine was built for {built} and runs only there")
    if not any(g.arch == manifest["gpu_arch"] for g in gpus):
        here = ", ".join(f"{g.arch} ({g.name})" for g in gpus)
        raise UserError(f"engine built for {built} but this GPU is {here}; rebuild it here with "
                        "`awq-edge build SRC --device <this device>`")
    if tensorrt_version is not None and tensorrt_version != manifest["tensorrt_version"]:
        raise UserError(f"engine built with TensorRT {manifest['tensorrt_version']} but TensorRT {tensorrt_version} "
                        "is installed; engines do not move across TensorRT versions: rebuild it")


class TrtBackend:
    """prefill(tokens) -> logits of the last position; decode(token) -> logits; reset() empties the cache."""

    def __init__(self, engine_dir: Path):
        from .cuda_runtime import CudaError, CudaRuntime, find_gpus
        from .trt_build import import_tensorrt, load_plugin_library

        self.dir = Path(engine_dir)
        self.manifest = read_manifest(self.dir)
        check_manifest(self.manifest, find_gpus(), None)
        trt = import_tensorrt()
        check_manifest(self.manifest, find_gpus(), trt.__version__)
        load_plugin_library(trt, self.dir / self.manifest["plugin_library"])
        try:
            self.cuda = CudaRuntime()
        except CudaError as e:
            raise UserError(str(e)) from None

        self.trt = trt
        logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(logger)
        self.engine = self.runtime.deserialize_cuda_engine((self.dir / ENGINE_FILE).read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not load {self.dir / ENGINE_FILE} (see the messages above)")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        plan = self.manifest["memory_plan"]
        self.max_context = int(plan["max_context"])
        self.kv_mode = plan.get("kv_mode", "concat")
        self._allocate()
        self._decode_graph = None
        self.reset()

    # ------------------------------------------------------------ buffers
    def _np_dtype(self, name: str):
        return np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name)))

    def _allocate(self) -> None:
        """Every I/O buffer at its largest shape over both profiles, once."""
        self.buffers: dict[str, int] = {}
        self.vocab_size = 0
        self.kv_spare: dict[str, int] = {}  # concat mode: the other half of each double buffer
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if n not in self.inputs]
        for name in self.inputs:
            shape = tuple(self.engine.get_tensor_profile_shape(name, 0)[2])  # prefill max
            if name.startswith(("past_key", "past_value")):
                # Room for max_context rows: in concat mode the two halves swap roles every step
                # and either may receive a present of past + new rows.
                shape = shape[:2] + (self.max_context,) + shape[3:]
                if self.kv_mode == "concat":
                    self.kv_spare[name] = self.cuda.malloc(int(np.prod(shape)) * self._np_dtype(name).itemsize)
            self.buffers[name] = self.cuda.malloc(int(np.prod(shape)) * self._np_dtype(name).itemsize)
        vocab_bytes = None
        for name in self.outputs:
            if name.startswith(("present_key", "present_value")):
                continue  # bound to the KV buffers
            shape = [d if d > 0 else self.max_context for d in self.engine.get_tensor_shape(name)]
            vocab_bytes = int(np.prod(shape)) * self._np_dtype(name).itemsize
            self.buffers[name] = self.cuda.malloc(vocab_bytes)
            if name == "logits":
                self.vocab_size = int(shape[-1])
        self._kv_bytes = sum(int(np.prod(self.engine.get_tensor_profile_shape(n, 0)[2][:2])) * self.max_context
                             * int(self.engine.get_tensor_profile_shape(n, 0)[2][3]) * self._np_dtype(n).itemsize
                             * (2 if n in self.kv_spare else 1)
                             for n in self.inputs if n.startswith(("past_key", "past_value")))

    def kv_bytes(self) -> int:
        """Device bytes held by the KV cache (both halves of the double buffers in concat mode)."""
        return self._kv_bytes

    def reset(self) -> None:
        self.past_length = 0

    # ------------------------------------------------------------ steps
    def _bind_and_run(self, tokens: np.ndarray, profile: int) -> np.ndarray:
        ctx, cuda = self.context, self.cuda
        ctx.set_optimization_profile_async(profile, self.stream)
        n_new = tokens.shape[1]
        host_inputs = {"input_ids": tokens.astype(np.int64),
                       "past_length": np.array([self.past_length], dtype=np.int64)}
        for name in self.inputs:
            if name in host_inputs:
                ctx.set_input_shape(name, host_inputs[name].shape)
                cuda.check(cuda.lib.cudaMemcpyAsync(self.buffers[name], host_inputs[name].ctypes.data,
                                                    host_inputs[name].nbytes, 1, self.stream), "cudaMemcpyAsync")
            elif name.startswith(("past_key", "past_value")):
                shape = list(self.engine.get_tensor_profile_shape(name, profile)[2])
                if self.kv_mode == "concat":
                    shape[2] = self.past_length
                ctx.set_input_shape(name, tuple(shape))
            ctx.set_tensor_address(name, self.buffers[name])
        for name in self.outputs:
            if name.startswith("present_"):
                past = name.replace("present_", "past_", 1)
                target = self.kv_spare[past] if self.kv_mode == "concat" else self.buffers[past]
                ctx.set_tensor_address(name, target)
            else:
                ctx.set_tensor_address(name, self.buffers[name])
        if not ctx.execute_async_v3(self.stream):
            raise UserError("TensorRT failed to run the engine (see the messages above)")
        if self.kv_mode == "concat":  # this step's present is the next step's past
            for past in self.kv_spare:
                self.buffers[past], self.kv_spare[past] = self.kv_spare[past], self.buffers[past]
        self.past_length += n_new
        logits_name = "logits" if "logits" in self.outputs else self.outputs[0]
        shape = tuple(ctx.get_tensor_shape(logits_name))
        logits = np.empty(shape, dtype=self._np_dtype(logits_name))
        cuda.check(cuda.lib.cudaMemcpyAsync(logits.ctypes.data, self.buffers[logits_name], logits.nbytes, 2,
                                            self.stream), "cudaMemcpyAsync")
        cuda.stream_synchronize(self.stream)
        return logits.reshape(-1, logits.shape[-1])[-1]

    def prefill(self, token_ids) -> np.ndarray:
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        if self.past_length + tokens.shape[1] > self.max_context:
            raise UserError(f"context full: {self.past_length} + {tokens.shape[1]} tokens > max context "
                            f"{self.max_context} the engine was built for (awq-edge build --max-context)")
        return self._bind_and_run(tokens, 0)

    def decode(self, token_id: int) -> np.ndarray:
        if self.past_length + 1 > self.max_context:
            raise UserError(f"context full at {self.max_context} tokens (rebuild with a larger --max-context)")
        if self.kv_mode != "shared_buffer":
            return self._bind_and_run(np.array([[token_id]]), 1)
        return self._decode_with_graph(int(token_id))

    def _decode_with_graph(self, token_id: int) -> np.ndarray:
        """Decode shapes are fixed in shared_buffer mode: capture one step, then replay it."""
        if self._decode_graph is None:
            logits = self._bind_and_run(np.array([[token_id]]), 1)  # also sets shapes and addresses
            lib, graph, exec_graph = self.cuda.lib, ctypes.c_void_p(), ctypes.c_void_p()
            self.cuda.check(lib.cudaStreamBeginCapture(self.stream, _STREAM_CAPTURE_THREAD_LOCAL), "begin capture")
            self.context.execute_async_v3(self.stream)
            self.cuda.check(lib.cudaStreamEndCapture(self.stream, ctypes.byref(graph)), "end capture")
            self.cuda.check(lib.cudaGraphInstantiate(ctypes.byref(exec_graph), graph, 0), "graph instantiate")
            self._decode_graph = exec_graph.value
            return logits
        lib = self.cuda.lib
        token = np.array([[token_id]], dtype=np.int64)
        past = np.array([self.past_length], dtype=np.int64)
        self.cuda.check(lib.cudaMemcpyAsync(self.buffers["input_ids"], token.ctypes.data, 8, 1, self.stream), "H2D")
        self.cuda.check(lib.cudaMemcpyAsync(self.buffers["past_length"], past.ctypes.data, 8, 1, self.stream), "H2D")
        self.cuda.check(lib.cudaGraphLaunch(self._decode_graph, self.stream), "cudaGraphLaunch")
        self.past_length += 1
        name = "logits" if "logits" in self.outputs else self.outputs[0]
        logits = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self._np_dtype(name))
        self.cuda.check(lib.cudaMemcpyAsync(logits.ctypes.data, self.buffers[name], logits.nbytes, 2, self.stream),
                        "D2H")
        self.cuda.stream_synchronize(self.stream)
        return logits.reshape(-1, logits.shape[-1])[-1]

    @staticmethod
    def sample(logits: np.ndarray, temperature: float = 0.0, rng: np.random.Generator | None = None) -> int:
        if temperature <= 0:
            return int(np.argmax(logits))
        z = (logits.astype(np.float64) - logits.max()) / temperature
        p = np.exp(z)
        return int((rng or np.random.default_rng()).choice(len(p), p=p / p.sum()))
