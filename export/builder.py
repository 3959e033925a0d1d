"""A tiny helper around onnx.helper: collects nodes and initializers, names things uniquely.

    b = GraphBuilder(act_dtype=np.float32, opset=21)
    y = b.op("MatMul", x, b.const("w", w))      # returns the output name
    q, k = b.op("Split", qk, outputs=2, axis=-1)  # several outputs -> a list of names

Every op's output gets a readable name from a prefix stack (b.scope("layers.3.attn")), so
the exported graph reads like the model in Netron.

    b = GraphBuilder(np.float32, 21, data_path=staging / "model.onnx.data")

writes each initializer of EXTERNAL_BYTES or more to that file as it is made, the graph keeping
only where it lies (ONNX external data): an export holds one layer's weights, never a model's.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

MS_DOMAIN = "com.microsoft"
# ORT 1.31 reads IR version <= 13 and onnx 1.23 writes 14 by default; 11 covers opsets up to 23.
IR_VERSION = 11

ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
              np.dtype(np.bool_): TensorProto.BOOL}


EXTERNAL_BYTES = 1024  # an initializer this large goes to the data file (data_path), a smaller one in the graph


class GraphBuilder:
    def __init__(self, act_dtype, opset: int, data_path: Path | None = None):
        self.act_dtype = np.dtype(act_dtype)
        self.act_type = ONNX_TYPES[self.act_dtype]
        self.opset = opset
        self.domains: dict[str, int] = {"": opset}
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._prefix: list[str] = []
        self._counts: dict[str, int] = {}
        self._data = None if data_path is None else open(data_path, "w+b")  # (read back: const compares)
        self.weight_bytes = 0  # every initializer's data, in the graph or the data file

    # ------------------------------------------------------------ naming
    @contextlib.contextmanager
    def scope(self, name: str):
        self._prefix.append(name)
        try:
            yield
        finally:
            self._prefix.pop()

    def name(self, base: str) -> str:
        full = "/".join(self._prefix + [base])
        n = self._counts.get(full, 0)
        self._counts[full] = n + 1
        return full if n == 0 else f"{full}_{n}"

    # ------------------------------------------------------------ tensors
    def const(self, name: str, value, dtype=None) -> str:
        """An initializer; `name` is used as is when free (weights keep their checkpoint names), and
        shared when it names the same values already (the scalars each layer asks for)."""
        array = np.asarray(value, dtype=dtype)
        data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        if name in self.initializers:
            held = self.initializers[name]
            if tuple(held.dims) == array.shape and held.data_type == data_type and \
                    self._raw(held) == np.ascontiguousarray(array).tobytes():
                return name
            base = name
            while name in self.initializers:  # (name() gives the name itself first: not a free one)
                name = self.name(base)
        self._add(name, data_type, array.shape, np.ascontiguousarray(array))
        return name

    def _add(self, name: str, data_type: int, dims, raw) -> None:
        """An initializer of raw data (bytes, or a contiguous array's); to the data file where it is
        EXTERNAL_BYTES or more, straight from `raw` (a TensorProto's own copy would stay in its arena
        after the field is cleared: upb frees none before the message)."""
        raw = memoryview(raw).cast("B")
        self.weight_bytes += raw.nbytes
        if self._data is None or raw.nbytes < EXTERNAL_BYTES:
            self.initializers[name] = helper.make_tensor(name, data_type, list(dims), bytes(raw), raw=True)
            return
        tensor = TensorProto(name=name, data_type=data_type, dims=list(dims), data_location=TensorProto.EXTERNAL)
        offset = self._data.tell()
        self._data.write(raw)
        for key, value in (("location", Path(self._data.name).name), ("offset", offset), ("length", raw.nbytes)):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
        self.initializers[name] = tensor

    def _raw(self, tensor: onnx.TensorProto) -> bytes:
        """An initializer's raw data, from the data file where it went there."""
        if tensor.data_location != TensorProto.EXTERNAL:
            return tensor.raw_data
        where = {entry.key: int(entry.value) for entry in tensor.external_data if entry.key in ("offset", "length")}
        self._data.flush()
        return os.pread(self._data.fileno(), where["length"], where["offset"])

    def close(self) -> None:
        """The data file written out (model() does it; an export that fails calls it too)."""
        if self._data is not None:
            self._data.close()

    def act_const(self, name: str, value) -> str:
        """A constant in the activation dtype (norm weights, rope tables, scalars)."""
        return self.const(name, np.asarray(value, dtype=np.float32).astype(self.act_dtype))

    def raw_const(self, name: str, onnx_type: int, dims, raw: bytes) -> str:
        """An initializer from packed raw bytes (4-bit ONNX types)."""
        self._add(name, onnx_type, dims, raw)
        return name

    def int64s(self, *values: int) -> str:
        """A small int64 vector constant, shared by value."""
        name = "const/i64/" + "_".join(str(v) for v in values)
        if name not in self.initializers:
            self._add(name, TensorProto.INT64, (len(values),), np.array(values, dtype=np.int64))
        return name

    def add_input(self, name: str, elem_type: int, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def add_output(self, name: str, elem_type: int, shape) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    # ------------------------------------------------------------ ops
    def op(self, op_type: str, *inputs: str | None, outputs: int | list[str] = 1, domain: str = "",
           name: str | None = None, full_name: str | None = None, **attrs):
        """Append a node; returns its output name (or a list when outputs != 1).

        name is prefixed with the scope; full_name is used as is (the linears keep their
        checkpoint names, e.g. model.layers.3.mlp.up_proj)."""
        if domain:
            self.domains.setdefault(domain, 1)
        node_name = full_name or self.name(name or op_type)
        if isinstance(outputs, int):
            out_names = [f"{node_name}/out{i}" if outputs > 1 else f"{node_name}/out" for i in range(outputs)]
        else:
            out_names = list(outputs)
        ins = ["" if i is None else i for i in inputs]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, ins, out_names, name=node_name, domain=domain, **attrs))
        return out_names[0] if len(out_names) == 1 else out_names

    def cast(self, x: str, elem_type: int) -> str:
        return self.op("Cast", x, to=elem_type)

    def reduce_mean_last(self, x: str) -> str:
        # opset 18 moved ReduceMean's axes from an attribute to an input.
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.int64s(-1), keepdims=1)
        return self.op("ReduceMean", x, axes=[-1], keepdims=1)

    def slice_last(self, x: str, start: int, end: int) -> str:
        return self.op("Slice", x, self.int64s(start), self.int64s(end), self.int64s(-1))

    # ------------------------------------------------------------ result
    def model(self, graph_name: str, doc: str = "") -> onnx.ModelProto:
        self.close()
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  list(self.initializers.values()), doc_string=doc)
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                 producer_name="awq-edge")
