"""ONNX Runtime CPU backend: runs an exported decoder graph (docs/graph.md) one step at a time.

    backend = OrtBackend(Path("out/ort"), max_context=2048)
    logits = backend.forward(prompt_ids)      # prefill, float32 [vocab] of the last token
    logits = backend.forward([next_id])       # decode
    backend.rewind(0)                         # reset

Speed: everything is bound with IOBinding to preallocated OrtValues, so a decode step copies
nothing but the new token ids in and the logits out.
- kv_mode shared_buffer (target ort): one [1, Hkv, max_context, D] buffer per layer and K/V,
  allocated once, bound as both past_key.i and present_key.i; GroupQueryAttention writes the
  new rows in place. past_length says how many rows are valid, so rewind is free.
- kv_mode concat (targets onnx, trt stand-in): ORT allocates each step's present (C' = C + S)
  and it becomes the next step's past; the length never exceeds max_context.
- LFM2's short convolutions (export.json `conv_layers`): B * x of every position is kept, as K and
  V are, in one [kernel - 1 + max_context, hidden] array per conv layer whose first kernel - 1 rows
  stay zero (what the convolution reads before the first token). A step binds the kernel - 1 rows
  before its first position as the input conv_state.{i} and the rows of its own positions as the
  output conv_new.{i}, both views of that array: nothing is copied, and rewind is free here too.
  The native decode step reads and writes the same arrays.
- Qwen3.5's gated delta nets (export.json `delta_net`): a fixed state per layer (the convolution's
  last inputs and S, float32), bound as the inputs delta_conv.{i} / delta_state.{i} and, in a
  second pair of arrays, the outputs delta_conv_new.{i} / delta_state_new.{i}; the pairs swap
  after each step (with the native decode, which updates the first pair in place, the second is
  copied back). A state cannot be rewound row by row: each prefill's end is kept (a copy), and a
  rewind goes back to it where it lies at or before the position asked for, else to 0; `position`
  then says where the cache stands, which the engine feeds on from.
Exact re-scoring (export.json `lm_head_exact`, the default quantized int4 lm_head): the graph
also outputs the top_k candidates of the last position (`top_ids`) and their exact logits from
the fp16 table (`top_logits`); forward() puts those in place of the quantized ones, so greedy
and top-k/top-p sampling see exact logits where it matters. forward_all (all_logits,
perplexity) does not re-score: it returns the graph's logits.
No torch here: this runs on a device with numpy and onnxruntime only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from .decoder import step_ids
from .export.delta_net import state_names
from .engine_dir import MODEL_FILE, ExportInfo, read_export_info
from .errors import UserError

ORT_DTYPES = {"float32": np.float32, "float16": np.float16}


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def session_options(threads: int | None, accuracy_level: int = 0, spin: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # a decoder is a chain: no parallel branches
    so.intra_op_num_threads = threads or physical_cores()  # hyperthreads only contend for the FMA units
    so.inter_op_num_threads = 1
    # Spinning: a decode step is ~300 small ops, and a worker that sleeps between them takes
    # longer to wake than many ops take to run (SmolLM2, 2 idle cores: 230 tok/s spinning, 162
    # asleep; benchmarks/cpu_profile.py). On a machine whose cores other busy processes share,
    # spinning steals the core its partner needs (docs/runtime.md): spin=False there.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    # The onnx target: how ORT may fuse DequantizeLinear + MatMul into MatMulNBits (0 = fp32 compute).
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return so


class OrtBackend:
    def __init__(self, export_dir: Path, max_context: int, threads: int | None = None,
                 info: ExportInfo | None = None, spin: bool = True, native_decode: bool = False):
        """info: export.json as checked by the engine (Engine.load); read and checked here when None.
        threads, spin: ONNX Runtime's intra-op threads and whether they busy-wait (session_options).
        native_decode: one-token steps run on our own kernels (awq_edge/cpu_native.py) over the same
        weights and KV buffers; prefill stays in ONNX Runtime. `decode_path` says which ran and why."""
        export_dir = Path(export_dir)
        info = info or read_export_info(export_dir)
        if info.target == "trt":
            raise UserError(f"{export_dir} was exported for TensorRT (AwqMatMulW4A16 plugin ops); "
                            "export with --target ort or onnx for the CPU, or use "
                            "awq_edge.export.cpu_standin for tests")
        if not 1 <= max_context <= info.max_position_embeddings:
            raise UserError(f"max_context must be 1..{info.max_position_embeddings}, got {max_context}")
        self.info = info
        self.kv_mode = info.kv_mode
        self.num_layers = info.num_layers
        self.attention_layers = info.attention_layers
        self.vocab_size = info.vocab_size
        self.all_logits = info.all_logits
        self.max_context = int(max_context)
        self.position = 0
        self.kv_dtype = np.dtype(ORT_DTYPES[info.act_dtype])
        self.kv_shape = (1, info.num_kv_heads, self.max_context, info.head_dim)
        model_path = export_dir / MODEL_FILE
        try:
            self.session = ort.InferenceSession(str(model_path),
                                                session_options(threads, info.matmul_accuracy_level, spin),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT's Fail / InvalidGraph / InvalidProtobuf ...: a file it cannot run
            raise UserError(f"ONNX Runtime cannot load {model_path}: {_first_line(e)}; rebuild or re-copy it") from None
        self.binding = self.session.io_binding()
        self._past_length = ort.OrtValue.ortvalue_from_numpy(np.zeros(1, dtype=np.int64))
        self.binding.bind_ortvalue_input("past_length", self._past_length)
        self._logits = None
        # Bound first, so binding.get_outputs() lists them last, in this order.
        self._ort_allocated: list[str] = []
        if not self.all_logits:
            self._logits = ort.OrtValue.ortvalue_from_shape_and_type([1, self.vocab_size], np.float32)
            self.binding.bind_ortvalue_output("logits", self._logits)
        self._cache: list[ort.OrtValue] = []  # shared_buffer: [k0, v0, k1, v1, ...] of max_context rows
        self._past: list[ort.OrtValue] = []  # concat: the current past, `position` rows
        if self.kv_mode == "shared_buffer":
            for i in self.attention_layers:
                for kind in ("key", "value"):
                    buf = ort.OrtValue.ortvalue_from_numpy(np.zeros(self.kv_shape, dtype=self.kv_dtype))
                    self._cache.append(buf)
                    self.binding.bind_ortvalue_input(f"past_{kind}.{i}", buf)
                    self.binding.bind_ortvalue_output(f"present_{kind}.{i}", buf)
        else:  # concat
            self._ort_allocated += [f"present_{kind}.{i}" for i in self.attention_layers for kind in ("key", "value")]
            self._set_past([np.zeros(self.kv_shape[:2] + (0,) + self.kv_shape[3:], self.kv_dtype)]
                           * (2 * len(self.attention_layers)))
        self._conv = {i: np.zeros((info.conv_kernel - 1 + self.max_context, info.hidden_size), self.kv_dtype)
                      for i in info.conv_layers}
        shapes = info.delta_net.state_shapes if info.delta_net else ()
        self._delta = {i: [np.zeros(shape, np.float32) for shape in shapes] for i in info.delta_layers}
        self._delta_out = {i: [np.zeros(shape, np.float32) for shape in shapes] for i in info.delta_layers}
        self._delta_kept: tuple[int, dict] | None = None  # (position, the states there) after the last prefill
        if self.all_logits:
            self._ort_allocated.append("logits")
        self.rescore_k = 0
        if info.lm_head_exact:
            self._bind_rescored(info.lm_head_exact["top_k"])
        self.native = None
        self.decode_path = "onnxruntime"
        if native_decode:
            self._start_native(export_dir, threads)

    def _start_native(self, export_dir: Path, threads: int | None) -> None:
        from .cpu_native import NativeDecoder, Unsupported, simd_path

        if self.kv_mode != "shared_buffer":
            self.decode_path = "onnxruntime (native decode needs in-place KV buffers)"
            return
        kv = dict(zip(self.attention_layers, zip(self._cache[0::2], self._cache[1::2])))
        try:
            self.native = NativeDecoder(export_dir, self.info,
                                        [kv[i][0].data_ptr() if i in kv else 0 for i in range(self.num_layers)],
                                        [kv[i][1].data_ptr() if i in kv else 0 for i in range(self.num_layers)],
                                        self.max_context, threads or physical_cores(), conv_rows=self._conv,
                                        delta_states=self._delta)
            self.decode_path = f"native ({simd_path(self.native.lib)})"
        except (Unsupported, UserError) as e:  # no compiler, or a graph the native step does not run
            self.decode_path = f"onnxruntime (native decode unavailable: {_first_line(e)})"

    def _bind_rescored(self, top_k: int) -> None:
        """Preallocated outputs for the graph's exact re-scoring of the top_k candidates."""
        self.rescore_k = top_k
        self._top_ids = ort.OrtValue.ortvalue_from_shape_and_type([1, top_k], np.int64)
        self._top_logits = ort.OrtValue.ortvalue_from_shape_and_type([1, top_k], np.float32)
        self.binding.bind_ortvalue_output("top_ids", self._top_ids)
        self.binding.bind_ortvalue_output("top_logits", self._top_logits)

    def rescore(self, logits: np.ndarray) -> np.ndarray:
        """Put the last step's exact logits of its top_k candidates in place (in logits); returns logits."""
        logits[self._top_ids.numpy()[0]] = self._top_logits.numpy()[0]
        return logits

    # ------------------------------------------------------------ the interface
    def forward(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [vocab] of the last new position (float32, a fresh array); top_k re-scored."""
        if self.native is not None and len(ids) == 1:
            token = int(step_ids(ids, self.position, self.max_context, self.vocab_size)[0])
            logits = self.native.step(token, self.position)
            self.position += 1
            return logits
        logits = self._run(ids)[-1]
        return self.rescore(logits) if self.rescore_k else logits

    def forward_all(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [len(ids), vocab] of every new position (graphs exported with all_logits: perplexity).

        Not re-scored: these are the graph's (quantized lm_head) logits for every row."""
        if not self.all_logits:
            raise UserError("this graph returns the last position's logits only; export it with all_logits")
        return self._run(ids)

    def _run(self, ids: Sequence[int]) -> np.ndarray:
        ids_array = step_ids(ids, self.position, self.max_context, self.vocab_size).reshape(1, -1)
        n = ids_array.shape[1]
        self.binding.bind_cpu_input("input_ids", ids_array)
        self._past_length.update_inplace(np.array([self.position], dtype=np.int64))
        # (first: the outputs ORT allocates must stay the binding's last)
        before = self.info.conv_kernel - 1  # (row r of a conv layer's array holds position r - before)
        for i, rows in self._conv.items():
            state, new = rows[self.position:self.position + before], rows[self.position + before:][:n]
            self.binding.bind_input(f"conv_state.{i}", "cpu", 0, self.kv_dtype, [1, *state.shape],
                                    state.ctypes.data)
            self.binding.bind_output(f"conv_new.{i}", "cpu", 0, self.kv_dtype, [1, *new.shape], new.ctypes.data)
        for i in self._delta:  # (Qwen3.5's) this step reads one pair of state arrays and writes the other
            conv_in, state_in, conv_out, state_out = state_names(i)
            for name, array in zip((conv_in, state_in), self._delta[i]):
                self.binding.bind_input(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
            for name, array in zip((conv_out, state_out), self._delta_out[i]):
                self.binding.bind_output(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)
        for name in self._ort_allocated:  # outputs whose shape changes per step: ORT allocates them
            self.binding.bind_output(name, "cpu")
        try:
            self.session.run_with_iobinding(self.binding)
        except Exception as e:  # e.g. a graph whose shapes do not hold at run time
            raise UserError(f"ONNX Runtime failed to run the model: {_first_line(e)}; rebuild the engine") from None
        if self.native is not None:  # the native step reads its own (bf16) copy of these rows
            self.native.mirror(self.position, n)
        self.position += n
        if self._delta:
            if self.native is not None:  # (the native step updates these arrays in place: they stay where it reads)
                for now, after in zip(self._delta.values(), self._delta_out.values()):
                    for array, new in zip(now, after):
                        array[...] = new
            else:
                self._delta, self._delta_out = self._delta_out, self._delta
            if n > 1:  # a prefill's end: where a rewind can go back to (a conversation's next turn)
                self._delta_kept = (self.position, {i: [a.copy() for a in arrays] for i, arrays in self._delta.items()})
        if self._ort_allocated:
            outputs = dict(zip(self._ort_allocated, self.binding.get_outputs()[-len(self._ort_allocated):]))
            if self.kv_mode == "concat":
                self._past = [outputs[f"present_{kind}.{i}"]
                              for i in self.attention_layers for kind in ("key", "value")]
                self._bind_past()
            if self.all_logits:
                return outputs["logits"].numpy()[0].copy()
        return self._logits.numpy().copy()

    def rewind(self, position: int) -> None:
        if not 0 <= position <= self.position:
            raise UserError(f"cannot rewind to {position}: the cache holds {self.position} tokens")
        if self._delta and position < self.position:  # (Qwen3.5's states) back to the last prefill's end, or 0
            kept, states = self._delta_kept if self._delta_kept and self._delta_kept[0] <= position else (0, None)
            for i, arrays in self._delta.items():
                for n, array in enumerate(arrays):
                    array[...] = states[i][n] if states else 0.0
            position = kept
        if self.kv_mode == "concat" and position < self.position:
            self._set_past([np.ascontiguousarray(v.numpy()[:, :, :position]) for v in self._past])
        self.position = position  # shared_buffer: rows past `position` are ignored, then overwritten

    def kv_bytes(self) -> int:
        conv = sum(rows.nbytes for rows in self._conv.values())
        conv += 3 * sum(a.nbytes for arrays in self._delta.values() for a in arrays)  # (in, out, kept)
        if self.kv_mode == "shared_buffer":
            return conv + sum(int(np.prod(self.kv_shape)) * self.kv_dtype.itemsize for _ in self._cache)
        return conv + sum(int(np.prod(v.shape())) * self.kv_dtype.itemsize for v in self._past)

    # ------------------------------------------------------------ concat mode
    def _set_past(self, arrays: list[np.ndarray]) -> None:
        self._past = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]
        self._bind_past()

    def _bind_past(self) -> None:
        for n, i in enumerate(self.attention_layers):
            self.binding.bind_ortvalue_input(f"past_key.{i}", self._past[2 * n])
            self.binding.bind_ortvalue_input(f"past_value.{i}", self._past[2 * n + 1])
