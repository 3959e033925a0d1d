"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum: quant_method "gptq"), read as our arrays.

The GPTQ files here are written by a transcription of AutoGPTQ's own QuantLinear.pack loops
(row by row along the inputs, zeros minus one in the original format, wrapped to uint32 as its
numpy code does), from a checkpoint our quantizer wrote; awq_edge.packing.from_gptq must read
back exactly the same levels, scales and zeros, and the export the same logits.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from awq_edge.checkpoint import read_checkpoint
from awq_edge.errors import UserError
from test_export_helpers import check_against_reference, export_for_cpu, tiny_checkpoint


def autogptq_pack(q_kn: np.ndarray, zeros_gn: np.ndarray, original_format: bool):
    """AutoGPTQ's pack: q [in, out], zeros [groups, out] (0..15) -> qweight, qzeros int32."""
    k, n = q_kn.shape
    qweight = np.zeros((k // 8, n), dtype=np.uint32)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= q_kn[8 * row + j].astype(np.uint32) << np.uint32(4 * j)
    zeros = (zeros_gn.astype(np.int64) - (1 if original_format else 0)).astype(np.uint32)  # -1 wraps, as there
    qzeros = np.zeros((zeros_gn.shape[0], n // 8), dtype=np.uint32)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= zeros[:, 8 * col + j] << np.uint32(4 * j)
    return qweight.view(np.int32), qzeros.view(np.int32)


def write_gptq(ckpt, out, layout: str, edit=None, orders=None, **quantization):
    """ckpt (ours, AutoAWQ layout) stored as a GPTQ checkpoint of `layout` ("gptq" or "gptq_v2").
    orders: prefix -> a permutation P of its inputs, stored as act-order (desc_act) stores it: the
    levels of sorted column j at input P[j], and g_idx[P[j]] = j // group size."""
    source = read_checkpoint(ckpt)
    tensors = {name: t.astype(np.float16) for name, t in source.tensors.items()}
    for prefix, lin in source.linears.items():
        k = lin.q.shape[1]
        q, g_idx = lin.q, np.arange(k) // lin.group_size
        if orders and prefix in orders:
            q, g_idx = np.empty_like(lin.q), np.empty_like(g_idx)
            q[:, orders[prefix]], g_idx[orders[prefix]] = lin.q, np.arange(k) // lin.group_size
        qweight, qzeros = autogptq_pack(q.T, lin.zeros.T, layout == "gptq")
        tensors.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros,
                        f"{prefix}.scales": np.ascontiguousarray(lin.scales.T).astype(np.float16),
                        f"{prefix}.g_idx": g_idx.astype(np.int32)})
        if lin.bias is not None:
            tensors[f"{prefix}.bias"] = lin.bias.astype(np.float16)
    if edit:
        edit(tensors)
    out.mkdir()
    save_file(tensors, out / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": source.group_size,
                                     "desc_act": False, "sym": False, "checkpoint_format": layout, **quantization}
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, out / name)
    return out


ACT_ORDER_SHAPE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1,
                   "head_dim": 64}


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory, smollm2_dir):
    """Qwen2: q/k/v biases ride along with GPTQ linears too. Head size 64: the native CPU step's."""
    return tiny_checkpoint(tmp_path_factory.mktemp("gptq"), "qwen2", smollm2_dir, **ACT_ORDER_SHAPE)



@pytest.mark.parametrize("layout, model_type", [("gptq", "qwen2"), ("gptq_v2", "qwen2"), ("gptq", "phi3")])
def test_a_gptq_checkpoint_reads_as_the_same_levels_and_exports_the_same_logits(qwen2_checkpoint, smollm2_dir,
                                                                                tmp_path, layout, model_type):
    """Phi-3's fused qkv_proj and gate_up_proj, one GPTQ linear each, too."""
    from awq_edge.checkpoint import load_awq_as_float

    source = qwen2_checkpoint if model_type == "qwen2" else tiny_checkpoint(tmp_path / "phi3", "phi3", smollm2_dir)
    ours = read_checkpoint(source)
    assert min(lin.zeros.min() for lin in ours.linears.values()) >= 1  # the original format can store them
    gptq = read_checkpoint(write_gptq(source, tmp_path / "gptq", layout))
    assert sorted(gptq.linears) == sorted(ours.linears)
    for prefix, lin in ours.linears.items():
        got = gptq.linears[prefix]
        assert got.group_size == lin.group_size
        for field in ("q", "scales", "zeros", "bias"):
            np.testing.assert_array_equal(getattr(got, field), getattr(lin, field), err_msg=f"{prefix}.{field}")
    ids = np.random.default_rng(0).integers(0, 256, 12 + 8).tolist()
    check_against_reference(export_for_cpu(tmp_path / "gptq", tmp_path / "exports", "ort"),
                            load_awq_as_float(source).eval(), ids, 12, 1e-5)


def test_bfloat16_tensors_are_read_exactly(qwen2_checkpoint, tmp_path):
    """A bf16 model's GPTQ (or AWQ) checkpoint keeps its float tensors (embeddings, norms, biases)
    and may keep its scales in bf16, which numpy lacks: read widened to float32 exactly (the scales
    then to fp16, exact for bf16's 8-bit mantissas), the levels as they are."""
    import torch
    from safetensors.torch import save_file as save_torch

    from awq_edge.checkpoint import read_safetensors

    folder = write_gptq(qwen2_checkpoint, tmp_path / "gptq", "gptq")
    as_fp16 = read_checkpoint(folder)
    linears = dict(as_fp16.linears)  # (each read now: a Checkpoint reads its linears when asked for)
    stored = read_safetensors(folder / "model.safetensors")
    bf16 = {name: torch.from_numpy(t.astype(np.float32)).to(torch.bfloat16) if t.dtype == np.float16
            else torch.from_numpy(t) for name, t in stored.items()}
    save_torch(bf16, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match="changed while it was being read"):  # not another file's bytes
        as_fp16.linears[next(iter(linears))]
    got = read_checkpoint(folder)
    assert sorted(got.tensors) == sorted(as_fp16.tensors)
    for name, t in got.tensors.items():
        assert t.dtype == np.float32
        np.testing.assert_array_equal(t, bf16[name].float().numpy(), err_msg=name)
    for prefix, lin in linears.items():
        read = got.linears[prefix]
        np.testing.assert_array_equal(read.q, lin.q, err_msg=prefix)
        np.testing.assert_array_equal(read.zeros, lin.zeros, err_msg=prefix)
        np.testing.assert_array_equal(read.scales, bf16[f"{prefix}.scales"].float().numpy().T.astype(np.float16))
        if lin.bias is not None:
            np.testing.assert_array_equal(read.bias, bf16[f"{prefix}.bias"].float().numpy(), err_msg=prefix)


def test_build_takes_a_gptq_checkpoint_as_a_checkpoint(qwen2_checkpoint, tmp_path):
    from awq_edge import Engine
    from awq_edge.build import build_engine

    manifest = build_engine(str(write_gptq(qwen2_checkpoint, tmp_path / "gptq", "gptq")), "cpu", tmp_path / "engine",
                            progress=False)
    assert manifest["model"]["source_kind"] == "checkpoint"
    assert manifest["quantization"]["quantization_config"]["quant_method"] == "gptq", manifest["quantization"]
    from awq_edge.sampling import Sampler, SamplingSettings

    engine = Engine.load(tmp_path / "engine")  # tiny vocabulary: ids, not the tokenizer's text
    "".join(engine.stream_ids([5, 6, 7], Sampler(SamplingSettings(temperature=0)), 4, ignore_eos=True))
    assert engine.last_stats.new_tokens == 4


def act_order_gptq(checkpoint, out):
    """(folder, orders): our checkpoint written as a GPTQ act-order one, a random order of each
    linear's inputs, one per input (q/k/v read one, gate/up another) as GPTQ's Hessians make them."""
    rng = np.random.default_rng(0)
    shared, orders = {}, {}
    for prefix, lin in read_checkpoint(checkpoint).linears.items():
        reads = prefix.rsplit(".", 1)[0] + {"k_proj": ".q_proj", "v_proj": ".q_proj", "up_proj": ".gate_proj"}.get(
            prefix.rsplit(".", 1)[1], "." + prefix.rsplit(".", 1)[1])
        orders[prefix] = shared.setdefault(reads, rng.permutation(lin.q.shape[1]))
    return write_gptq(checkpoint, out, "gptq", orders=orders, desc_act=True), orders


def test_an_act_order_checkpoint_gathers_each_linears_inputs_on_every_engine_but_trt(
        qwen2_checkpoint, tmp_path, monkeypatch):
    """GPTQ act-order (desc_act): each input's group from g_idx, groups out of input order. The
    levels are read back sorted by group with the permutation beside them, the ort and onnx
    graphs gather x by it (the same logits as transformers' model of the dequantized weights), so
    does the native CPU decode step (as ONNX Runtime decodes), and so does a cuda engine (a gather
    op before each linear: its reference executor, the twin of its kernels, as ONNX Runtime; the
    kernels themselves in tests/test_kernels_on_cpu.py). A trt export says it cannot, in one line."""
    from awq_edge.backend_ort import OrtBackend
    from awq_edge import cpu_native, plugins
    from awq_edge.build import build_engine
    from awq_edge.reference_backend import ReferenceBackend
    from folder_helpers import resign, rewrite
    from test_native_engine import check_launches_against_the_cubins
    from awq_edge.checkpoint import load_awq_as_float
    from awq_edge.export import export_checkpoint
    from native_helpers import teacher_forced

    ours = read_checkpoint(qwen2_checkpoint)
    folder, orders = act_order_gptq(qwen2_checkpoint, tmp_path / "gptq")
    read = read_checkpoint(folder)
    for prefix, lin in ours.linears.items():  # input P[j] holds what column j held (a group's columns in any order)
        got = read.linears[prefix]
        assert got.order is not None and sorted(got.order) == list(range(lin.q.shape[1]))
        np.testing.assert_array_equal(got.dequantize()[:, orders[prefix]], lin.dequantize(), err_msg=prefix)
    ref = load_awq_as_float(folder).eval()  # the act-order weights, dequantized in the inputs' order
    ids = np.random.default_rng(1).integers(0, 256, 12 + 8).tolist()
    exports = {target: export_for_cpu(folder, tmp_path / "exports", target) for target in ("ort", "onnx")}
    for export in exports.values():
        check_against_reference(export, ref, ids, 12, 1e-5)
    default = export_checkpoint(folder, tmp_path / "default", "ort")  # int8 head, int8 activations
    native = OrtBackend(default, max_context=64, threads=2, native_decode=True)
    assert native.decode_path.startswith("native"), native.decode_path
    errors, disagreements = teacher_forced(native, OrtBackend(default, max_context=64, threads=2), ids, 12)
    assert max(errors) < 0.05 and disagreements == [], (max(errors), disagreements)
    with monkeypatch.context() as m:  # an engine's order indexes x in C: one past its inputs is refused
        weights = cpu_native.graph_weights

        def one_order_out_of_range(export_dir):
            arrays, matmuls = weights(export_dir)
            name = next(n for n in arrays if n.endswith(".input_order"))
            arrays[name] = arrays[name].copy()
            arrays[name][0] = arrays[name].size
            return arrays, matmuls

        m.setattr(cpu_native, "graph_weights", one_order_out_of_range)
        refused = OrtBackend(default, max_context=64, threads=2, native_decode=True).decode_path
        assert refused.startswith("onnxruntime") and "input_order is not a permutation" in refused, refused
    with pytest.raises(UserError, match="AwqMatMulW4A16 does not do; export with --target ort or onnx"):
        export_checkpoint(folder, tmp_path / "trt", "trt")
    assert not (tmp_path / "trt").exists()

    if plugins.find_nvcc() is None:
        pytest.skip("nvcc not found: the cuda engine's build skipped")
    build_engine(str(folder), "orin", tmp_path / "engine", backend="cuda", progress=False, lm_head_bits=None)
    reference = ReferenceBackend(tmp_path / "engine", max_context=64)
    assert sum(op.kind == "gather" for op in reference.ops) == 4 * reference.spec.layers
    errors, disagreements = teacher_forced(reference, OrtBackend(exports["ort"], max_context=64), ids, 12)
    # fp16 activations against fp32 ones, as every family's reference executor (test_native_engine.py)
    assert max(errors) < 1e-2 and disagreements == [], (max(errors), disagreements)
    assert "awq_gather_columns" in check_launches_against_the_cubins(tmp_path / "engine")  # its parameters
    decoder = tmp_path / "engine" / "decoder.json"  # an order that is no permutation: refused at load
    info = json.loads(decoder.read_text())
    name = next(n for n in info["tensors"] if n.endswith(".input_order"))
    weights = bytearray((tmp_path / "engine" / "weights.bin").read_bytes())
    offset = info["tensors"][name]["offset"]
    weights[offset:offset + 4] = np.int32(1 << 20).tobytes()
    rewrite(tmp_path / "engine" / "weights.bin", bytes(weights))
    resign(tmp_path / "engine", "manifest.json", "weights.bin")
    with pytest.raises(UserError, match=f"{name} is not a permutation of its"):
        ReferenceBackend(tmp_path / "engine", max_context=64)


def _groups_of_another_size(tensors):
    name = next(k for k in tensors if k.endswith(".g_idx"))
    tensors[name] = np.zeros_like(tensors[name])  # every input in group 0


def _zero_of_zero(tensors):  # AutoGPTQ stores zero 0 as -1: every nibble of the word reads 15
    name = next(k for k in tensors if k.endswith(".qzeros"))
    tensors[name][0, 0] = -1


@pytest.mark.parametrize("layout, edit, quantization, message", [
    ("gptq", _groups_of_another_size, {"desc_act": True}, "its g_idx does not put 32 inputs in each group"),
    ("gptq", _zero_of_zero, {}, "a zero point reads 16: the original GPTQ format cannot store a zero of 0"),
    ("gptq", None, {"group_size": -1}, "group_size -1 .one group per row."),
    ("gptq", None, {"bits": 8}, "GPTQ 8-bit"),
    ("marlin", None, {}, "in the 'marlin' layout"),
])
def test_what_the_kernels_cannot_run_is_refused_in_one_line(qwen2_checkpoint, tmp_path, layout, edit, quantization,
                                                           message):
    folder = write_gptq(qwen2_checkpoint, tmp_path / "gptq", layout, edit, **quantization)
    with pytest.raises(UserError, match=message) as e:
        read_checkpoint(folder)
    assert "\n" not in str(e.value)
