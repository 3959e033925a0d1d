"""TensorRT backend: runs an engine built by `awq-edge build --device <gpu>` (awq_edge.trt_build).

Thin on purpose: TensorRT does the work, this class binds buffers. Importing this module
needs neither TensorRT nor a GPU; both are looked for when a backend is created.

- The manifest is checked against the GPU and the TensorRT present before anything loads
  (an engine runs only on the arch and TensorRT version it was built with).
- The KV cache is allocated once, for the planned max context (manifest memory_plan):
  kv_mode shared_buffer: the AwqAttention plugin writes each step's rows into the past
  buffers in place (present outputs, where a graph has them, are bound to the same buffers);
  kv_mode concat (engines built before the plugin) keeps two buffers per tensor and swaps
  them after every step.
- Profile 0 runs prefill, profile 1 decode. In shared_buffer mode decode shapes never
  change, so the decode step is captured once as a CUDA graph and replayed.
- forward() returns DeviceLogits: the last position's logits stay on the GPU and the
  Sampler picks the token there (plugins/kernels/sample.cu, same rule and same random draw
  as the host Sampler), so one int32 crosses to the host per token, not V floats.
  np.asarray(device_logits) copies them over when a caller wants them.
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from .errors import UserError
from .sampling import NO_USABLE_LOGITS, DeviceLogits, fp32_draw


def check_manifest(manifest: dict, gpus: list, tensorrt_version: str | None) -> None:
    """Raise a one-line UserError when this engine cannot run here."""
    built = f"{manifest['gpu_arch']} ({manifest.get('gpu_name') or manifest.get('device_title', '?')})"
    if not gpus:
        raise UserError(f"no NVIDIA GPU found; this engine was built for {built} and runs only there")
    if not any(g.arch == manifest["gpu_arch"] for g in gpus):
        here = ", ".join(f"{g.arch} ({g.name})" for g in gpus)
        raise UserError(f"engine built for {built} but this GPU is {here}; rebuild it here with "
                        "`awq-edge build SRC --device gpu`")
    if tensorrt_version is not None and tensorrt_version != manifest["tensorrt_version"]:
        raise UserError(f"engine built with TensorRT {manifest['tensorrt_version']} but TensorRT {tensorrt_version} "
                        "is installed; engines do not move across TensorRT versions: rebuild it")


class TrtBackend:
    """The backend interface of awq_edge.engine (like backend_ort.OrtBackend):
    forward(ids) -> logits after the last id; rewind(position); position; max_context."""

    def __init__(self, engine_dir: Path, manifest: dict, max_context: int):
        """manifest: checked by awq_edge.engine_dir.read_manifest (its engine and plugin library are
        plain names of listed files); max_context: the load-time plan's, at most the built one."""
        from .cuda_runtime import CudaError, CudaRuntime, find_gpus
        from .trt_build import import_tensorrt, load_plugin_library

        self.dir = Path(engine_dir)
        self.manifest = manifest
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
        engine_file = self.dir / self.manifest["engine"]
        self.engine = self.runtime.deserialize_cuda_engine(engine_file.read_bytes())
        if self.engine is None:
            raise UserError(f"TensorRT could not load {engine_file} (see the messages above)")
        self.context = self.engine.create_execution_context()
        self.stream = self.cuda.stream()
        self.max_context = int(max_context)  # KV buffers for this many rows; the profiles allow up to the built one
        self.kv_mode = self.manifest["memory_plan"].get("kv_mode", "concat")
        self._allocate()
        self._allocate_sampling()
        self._decode_graph = None
        self.past_length = 0

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

    def _allocate_sampling(self) -> None:
        """Scratch for awq_sample_token: 2 x vocab floats, one token, and the seen ids."""
        from .plugins import declare_sampler

        self.sampler_lib = ctypes.CDLL(str(self.dir / self.manifest["plugin_library"]))  # already loaded by TensorRT
        declare_sampler(self.sampler_lib)
        if self._np_dtype("logits") != np.float32:
            raise UserError("this engine's logits are not float32; rebuild it with this awq-edge (`awq-edge build`)")
        self.sample_work = self.cuda.malloc(2 * self.vocab_size * 4)
        self.sample_token_out = self.cuda.malloc(4)
        self.seen_capacity = self.max_context
        self.seen_ids = self.cuda.malloc(self.seen_capacity * 4)

    # ------------------------------------------------------------ the engine's interface
    @property
    def position(self) -> int:
        return self.past_length

    def rewind(self, position: int) -> None:
        """Forget everything after `position` tokens (rows after it are overwritten by the next step)."""
        self.past_length = int(position)

    def forward(self, ids) -> DeviceLogits:
        ids = [int(i) for i in ids]
        if len(ids) == 1 and self.past_length > 0:
            return self.decode(ids[0])
        return self.prefill(ids)

    def logits_to_host(self, device_ptr: int) -> np.ndarray:
        host = np.empty(self.vocab_size, dtype=np.float32)
        cuda = self.cuda
        cuda.check(cuda.lib.cudaMemcpyAsync(host.ctypes.data, device_ptr, host.nbytes, 2, self.stream), "D2H")
        cuda.stream_synchronize(self.stream)
        return host

    def sample_token(self, logits_ptr: int, settings, seen_ids, uniform: float) -> int:
        """The next token by the Sampler's rule, chosen on the GPU (plugins/kernels/sample.h)."""
        cuda = self.cuda
        seen = np.unique(np.asarray(seen_ids, dtype=np.int32)) if settings.repetition_penalty != 1.0 else None
        n_seen = 0 if seen is None else min(len(seen), self.seen_capacity)
        if n_seen:
            cuda.check(cuda.lib.cudaMemcpyAsync(self.seen_ids, seen.ctypes.data, n_seen * 4, 1, self.stream), "H2D")
        status = self.sampler_lib.awq_sample_token(
            logits_ptr, self.vocab_size, self.seen_ids, n_seen, settings.repetition_penalty, settings.temperature,
            settings.top_k, settings.top_p, fp32_draw(uniform),
            self.sample_work, self.sample_token_out, self.stream)
        if status != 0:
            raise UserError(f"GPU sampling failed (awq_sample_token returned {status}); check the sampling settings")
        token = np.zeros(1, dtype=np.int32)
        cuda.check(cuda.lib.cudaMemcpyAsync(token.ctypes.data, self.sample_token_out, 4, 2, self.stream), "D2H")
        cuda.stream_synchronize(self.stream)
        if token[0] < 0:  # the kernel found no logit above -inf (NaN counts as -inf)
            raise UserError(NO_USABLE_LOGITS)
        return int(token[0])

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
                shape[2] = self.past_length if self.kv_mode == "concat" else self.max_context  # rows held
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
        return self._last_logits()

    def _last_logits(self) -> DeviceLogits:
        """The logits row of the last position, left on the GPU (the stream orders later reads)."""
        shape = tuple(self.context.get_tensor_shape("logits"))  # [1, vocab] or [1, seq, vocab]
        rows = int(np.prod(shape[:-1]))
        return DeviceLogits(self, self.buffers["logits"] + (rows - 1) * self.vocab_size * 4, self.vocab_size)

    def prefill(self, token_ids) -> DeviceLogits:
        tokens = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        if self.past_length + tokens.shape[1] > self.max_context:
            raise UserError(f"context full: {self.past_length} + {tokens.shape[1]} tokens > max context "
                            f"{self.max_context} the engine was built for (awq-edge build --max-context)")
        return self._bind_and_run(tokens, 0)

    def decode(self, token_id: int) -> DeviceLogits:
        if self.past_length + 1 > self.max_context:
            raise UserError(f"context full at {self.max_context} tokens (rebuild with a larger --max-context)")
        if self.kv_mode != "shared_buffer":
            return self._bind_and_run(np.array([[token_id]]), 1)
        return self._decode_with_graph(int(token_id))

    def _decode_with_graph(self, token_id: int) -> DeviceLogits:
        """Decode shapes are fixed in shared_buffer mode: capture one step, then replay it."""
        if self._decode_graph is None:
            logits = self._bind_and_run(np.array([[token_id]]), 1)  # also sets shapes and addresses
            self._decode_graph = self.cuda.capture_graph(self.stream,
                                                         lambda: self.context.execute_async_v3(self.stream))
            return logits
        lib = self.cuda.lib
        token = np.array([[token_id]], dtype=np.int64)
        past = np.array([self.past_length], dtype=np.int64)
        self.cuda.check(lib.cudaMemcpyAsync(self.buffers["input_ids"], token.ctypes.data, 8, 1, self.stream), "H2D")
        self.cuda.check(lib.cudaMemcpyAsync(self.buffers["past_length"], past.ctypes.data, 8, 1, self.stream), "H2D")
        self.cuda.launch_graph(self._decode_graph, self.stream)
        self.past_length += 1
        return self._last_logits()
