"""A tiny helper around onnx.helper: collects nodes and initializers, names things uniquely.

    b = GraphBuilder(act_dtype=np.float32, opset=21)
    y = b.op("MatMul", x, b.const("w", w))      # returns the output name
    q, k = b.op("Split", qk, outputs=2, axis=-1)  # several outputs -> a list of names

Every op's output gets a readable name from a prefix stack (b.scope("layers.3.attn")), so
the exported graph reads like the model in Netron.
"""
from __future__ import annotations

import contextlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"
# ORT 1.31 reads IR version <= 13 and onnx 1.23 writes 14 by default; 11 covers opsets up to 23.
IR_VERSION = 11

ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
              np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
              np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int8): TensorProto.INT8,
              np.dtype(np.bool_): TensorProto.BOOL}


class GraphBuilder:
    def __init__(self, act_dtype, opset: int):
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
        if name in self.initializers:
            held = numpy_helper.to_array(self.initializers[name])
            if held.dtype == array.dtype and held.shape == array.shape and np.array_equal(held, array):
                return name
            name = self.name(name)
        self.initializers[name] = numpy_helper.from_array(array, name)
        return name

    def act_const(self, name: str, value) -> str:
        """A constant in the activation dtype (norm weights, rope tables, scalars)."""
        return self.const(name, np.asarray(value, dtype=np.float32).astype(self.act_dtype))

    def raw_const(self, name: str, onnx_type: int, dims, raw: bytes) -> str:
        """An initializer from packed raw bytes (4-bit ONNX types)."""
        self.initializers[name] = helper.make_tensor(name, onnx_type, list(dims), raw, raw=True)
        return name

    def int64s(self, *values: int) -> str:
        """A small int64 vector constant, shared by value."""
        name = "const/i64/" + "_".join(str(v) for v in values)
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.array(values, dtype=np.int64), name)
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
        graph = helper.make_graph(self.nodes, graph_name, self.inputs, self.outputs,
                                  list(self.initializers.values()), doc_string=doc)
        opsets = [helper.make_opsetid(d, v) for d, v in self.domains.items()]
        return helper.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION,
                                 producer_name="awq-edge")
