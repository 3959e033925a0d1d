"""Run a `trt` export on the CPU: a test stand-in for the TensorRT engine.

The trt graph's AwqMatMulW4A16 and AwqAttention nodes exist only as TensorRT plugins. This
rewrite replaces
- each AwqMatMulW4A16 by an ORT MatMulNBits node (accuracy_level 0: fp32 compute) built from
  the node's OWN initializers: qweight is unpacked from the plugin layout (int32 [N, K/8],
  AWQ nibble order) back to q [N, K], and zeros are read from fp16. So a wrong plugin layout
  shows up as wrong logits in the tests;
- each AwqAttention by an ORT GroupQueryAttention node with the same inputs and attributes
  (RoPE from the same tables, window, softcap, scale), whose present outputs are bound to the
  past buffers (kv_mode shared_buffer), which is what the plugin's in-place write amounts to.
Everything else is converted from fp16 to fp32, which makes the stand-in comparable with the
float32 reference model to ~1e-6.

    from awq_edge.export.cpu_standin import standin_dir
    cpu_dir = standin_dir("out/trt", "out/trt-cpu")   # then OrtBackend(cpu_dir, ...)
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..errors import UserError
from ..untrusted import file_record
from ..packing import to_matmul_nbits, unpack_int4
from .builder import MS_DOMAIN
from .attention import ATTENTION_PLUGIN_OP
from .linear import PLUGIN_OP

STANDIN_TARGET = "trt_cpu_standin"


def unpack_plugin_weights(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int):
    """AwqMatMulW4A16 initializers -> (q uint8 [N, K], scales fp16 [N, groups], zeros uint8 [N, groups])."""
    q = unpack_int4(qweight)[:, :k]
    z = np.asarray(zeros, dtype=np.float32)
    if np.any(z != np.round(z)) or z.min(initial=0) < 0 or z.max(initial=0) > 15:
        raise ValueError("plugin zeros must hold integers 0..15")
    return q, np.asarray(scales, dtype=np.float16), z.astype(np.uint8)


def _gqa_lengths(past_length: str, inits: dict) -> tuple[list, str, str]:
    """Nodes computing GroupQueryAttention's seqlens_k (int32 [1] = past + S - 1) and
    total_sequence_length (int32 scalar = past + S) from the graph inputs."""
    inits["standin/one"] = numpy_helper.from_array(np.array([1], np.int64), "standin/one")
    inits["standin/scalar"] = numpy_helper.from_array(np.array([], np.int64), "standin/scalar")
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["standin/ids_shape"]),
        helper.make_node("Gather", ["standin/ids_shape", "standin/one"], ["standin/seq_len"], axis=0),
        helper.make_node("Add", [past_length, "standin/seq_len"], ["standin/total"]),
        helper.make_node("Sub", ["standin/total", "standin/one"], ["standin/last"]),
        helper.make_node("Cast", ["standin/last"], ["standin/seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Reshape", ["standin/total", "standin/scalar"], ["standin/total_scalar"]),
        helper.make_node("Cast", ["standin/total_scalar"], ["standin/total_length"], to=TensorProto.INT32),
    ]
    return nodes, "standin/seqlens_k", "standin/total_length"


def _attention_as_gqa(node, lengths: tuple[str, str], graph) -> onnx.NodeProto:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    q, k, v, past_key, past_value, _past_length, cos, sin = node.input
    presents = [name.replace("past_", "present_", 1) for name in (past_key, past_value)]
    for name in presents:
        graph.output.append(helper.make_tensor_value_info(
            name, TensorProto.FLOAT, [1, attrs["kv_heads"], "past_sequence", attrs["head_dim"]]))
    return helper.make_node(
        "GroupQueryAttention", [q, k, v, past_key, past_value, *lengths, cos, sin], [node.output[0], *presents],
        name=node.name, domain=MS_DOMAIN, num_heads=attrs["num_heads"], kv_num_heads=attrs["kv_heads"],
        scale=attrs["scale"], do_rotary=1, rotary_interleaved=0,
        local_window_size=attrs["window"] or -1, softcap=attrs["softcap"])


def standin_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """The trt graph with plugin nodes replaced by MatMulNBits / GroupQueryAttention and fp16 turned into fp32."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    new_nodes, lengths = [], None
    for node in graph.node:
        if node.op_type == ATTENTION_PLUGIN_OP:
            if lengths is None:
                length_nodes, *lengths = _gqa_lengths(node.input[5], inits)
                new_nodes.extend(length_nodes)
            new_nodes.append(_attention_as_gqa(node, tuple(lengths), graph))
            continue
        if node.op_type != PLUGIN_OP:
            if node.op_type == "Cast":
                for a in node.attribute:
                    if a.name == "to" and a.i == TensorProto.FLOAT16:
                        a.i = TensorProto.FLOAT
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        k, n, g = attrs["K"], attrs["N"], attrs["group_size"]
        x, qw, sc, zp = node.input
        q, scales, zeros = unpack_plugin_weights(*(numpy_helper.to_array(inits.pop(name)) for name in (qw, sc, zp)), k)
        if q.shape != (n, k):
            raise ValueError(f"{node.name}: qweight unpacks to {q.shape}, attributes say [{n}, {k}]")
        t = to_matmul_nbits(q, scales, zeros, g, bits=4)
        names = [f"{node.name}.B", f"{node.name}.nbits_scales", f"{node.name}.zero_points"]
        for name, value in zip(names, (t["B"], t["scales"], t["zero_points"])):
            inits[name] = numpy_helper.from_array(value, name)
        new_nodes.append(helper.make_node("MatMulNBits", [x, *names], list(node.output), name=node.name,
                                          domain=MS_DOMAIN, K=k, N=n, bits=4, block_size=g, accuracy_level=0))
    for name, t in list(inits.items()):
        if t.data_type == TensorProto.FLOAT16:
            inits[name] = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), name)
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT16:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(inits.values())
    opsets = [o for o in model.opset_import if o.domain not in ("awq_edge", MS_DOMAIN)]
    del model.opset_import[:]
    model.opset_import.extend(opsets + [helper.make_opsetid(MS_DOMAIN, 1)])
    return model


def standin_dir(trt_dir, out_dir) -> Path:
    """Write the CPU stand-in of the trt export in trt_dir to out_dir (replaced if present)."""
    trt_dir, out_dir = Path(trt_dir), Path(out_dir)
    try:
        info = json.loads((trt_dir / "export.json").read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{trt_dir} has no readable export.json; give a `--target trt` export") from None
    if info.get("target") != "trt":
        raise UserError(f"{trt_dir} is a {info.get('target')!r} export; the stand-in rewrites trt exports")
    model = standin_model(onnx.load(str(trt_dir / "model.onnx")))
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    onnx.save_model(model, str(out_dir / "model.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=1024)
    fp32 = 4 / 2  # the trt export's KV is fp16
    info.update(target=STANDIN_TARGET, act_dtype="float32", matmul_accuracy_level=0, weight_bytes=weight_bytes,
                kv_bytes_per_token=int(info["kv_bytes_per_token"] * fp32),
                files={f.name: file_record(f) for f in sorted(out_dir.iterdir())})
    (out_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    return out_dir
