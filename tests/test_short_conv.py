"""LFM2's short convolutions on the CPU engine: biases on every part, against transformers; their
state kept per position (a rewind, a prompt fed in chunks) and shared by ONNX Runtime and the
native C decode; the trt target refusing them before anything is written; export.json's conv_layers read as
untrusted input. (Every family's tiny model, LFM2's with one convolution, is in
test_export_families.py; its quantizer groups in test_quantize.py; the cuda engine's op list
against ORT in test_native_engine.py, its kernels emulated in test_kernels_on_cpu.py.)"""
from __future__ import annotations

import numpy as np
import pytest

from awq_edge.backend_ort import OrtBackend
from awq_edge.engine_dir import read_export_info
from awq_edge.errors import UserError
from folder_helpers import edit_json, linked_copy
from test_export_helpers import check_against_reference, export_for_cpu, tiny_checkpoint

# two convolutions around an attention layer whose heads the native engines take (64)
LAYERS = dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], hidden_size=128,
              intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64)


@pytest.fixture(scope="module")
def lfm2(tmp_path_factory, smollm2_dir):
    """(root, checkpoint, ort export) of a tiny LFM2 with two convolutions around an attention layer,
    conv_bias on (in_proj, out_proj and the convolution carry biases, randomized)."""
    root = tmp_path_factory.mktemp("lfm2")
    ckpt = tiny_checkpoint(root, "lfm2", smollm2_dir, conv_bias=True, **LAYERS)
    return root, ckpt, export_for_cpu(ckpt, root / "exports", "ort")


@pytest.fixture(scope="module")
def lfm2_onnx(lfm2):
    """The onnx target's export of the same checkpoint (K and V concatenated, not kept in place)."""
    return export_for_cpu(lfm2[1], lfm2[0] / "exports", "onnx")


def ids(n: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_an_lfm2_with_biases_matches_transformers(lfm2, lfm2_onnx, target):
    from awq_edge.checkpoint import load_awq_as_float

    root, ckpt, ort_export = lfm2
    out = ort_export if target == "ort" else lfm2_onnx
    assert read_export_info(out).conv_layers == (0, 2)
    check_against_reference(out, load_awq_as_float(ckpt).eval(), ids(24), 12, 1e-5)


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_a_rewind_and_a_prompt_in_chunks_give_the_same_logits(lfm2, lfm2_onnx, target):
    """The convolutions read the tokens before a step from the per-position store: after a rewind
    into the middle, and across the chunks of a prompt fed piecewise, as the first time (the onnx
    target's K and V are concatenated, not kept in place: its rewind cuts them, the store stays)."""
    tokens = ids(20)
    backend = OrtBackend(lfm2[2] if target == "ort" else lfm2_onnx, max_context=32)
    first = [backend.forward(tokens[:8])] + [backend.forward([t]) for t in tokens[8:]]
    backend.rewind(11)
    again = [backend.forward([t]) for t in tokens[11:]]
    np.testing.assert_array_equal(np.array(again), np.array(first[4:]))
    backend.rewind(0)
    for start in range(0, 20, 3):  # a kernel of 3 reads 2 tokens back: chunks of 3 cross every boundary
        chunked = backend.forward(tokens[start:start + 3])
    np.testing.assert_allclose(chunked, first[-1], rtol=0, atol=1e-4 * np.abs(first[-1]).max())


def test_the_native_decode_shares_the_stores_with_onnxruntime(lfm2):
    """The C decode (decode_step.c's short_conv) writes each token's B * x into the same arrays
    ONNX Runtime's prefill writes and reads: a prefill after native steps reads what they wrote,
    and native steps after it what it wrote."""
    from awq_edge.export import export_checkpoint

    export = export_checkpoint(lfm2[1], lfm2[0] / "default", "ort")  # (the default head: the native step's)
    tokens = ids(24)
    native, plain = OrtBackend(export, max_context=32, native_decode=True), OrtBackend(export, max_context=32)
    assert native.decode_path.startswith("native"), native.decode_path
    for backend in (native, plain):
        backend.forward(tokens[:6])
        for t in tokens[6:12]:
            backend.forward([t])
    a, b = native.forward(tokens[12:18]), plain.forward(tokens[12:18])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 0.03
    errors = []
    for t in tokens[18:]:
        a, b = native.forward([t]), plain.forward([t])
        errors.append(np.linalg.norm(a - b) / np.linalg.norm(b))
    assert max(errors) < 0.03, errors


def test_the_trt_target_refuses_before_anything_is_written(lfm2, tmp_path):
    from awq_edge.build import build_engine

    with pytest.raises(UserError, match="short convolutions keep a state per position, which the trt target's"):
        build_engine(str(lfm2[1]), "rtx4090", tmp_path / "engine", backend="trt", progress=False)
    assert not (tmp_path / "engine").exists()


@pytest.mark.parametrize("config, message", [
    ({"layer_types": ["conv", "bogus"]}, "layer_types must list full_attention, sliding_attention or conv"),
    ({"layer_types": ["conv", "conv"]}, "every layer is a short convolution"),
    ({"layer_types": None, "full_attn_idxs": []}, "every layer is a short convolution"),
    ({"layer_types": None, "full_attn_idxs": [5]}, "full_attn_idxs must list layer numbers below 2"),
    ({"layer_types": None, "full_attn_idxs": [True]}, "full_attn_idxs must list layer numbers below 2"),
    ({"conv_L_cache": 1000}, "conv_L_cache must be an integer in 2..16"),
    ({"block_multiple_of": 0}, "block_multiple_of must be an integer"),
    ({"block_ffn_dim_multiplier": 1e-3}, "the MLP's width 0"),
], ids=["an unknown layer", "no attention", "no attention (older)", "past the layers", "a bool", "a huge kernel",
        "multiple of 0", "no MLP"])
def test_a_hostile_lfm2_config_is_refused_in_one_line(config, message):
    from awq_edge.export.spec import model_spec
    from test_export_helpers import TINY, TINY_EXTRA

    with pytest.raises(UserError, match=message) as e:
        model_spec({**TINY, **TINY_EXTRA["lfm2"], "model_type": "lfm2", **config})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda i: i.update(conv_layers=[0, 0]), "conv_layers must list distinct layer numbers below 3"),
    (lambda i: i.update(conv_layers=[0, 3]), "conv_layers must list distinct layer numbers below 3"),
    (lambda i: i.update(conv_layers=[0, 1, 2]), "not all of them"),
    (lambda i: i.update(conv_layers=[0, True]), "conv_layers must list"),
    (lambda i: i.update(conv_layers="0,2"), "conv_layers must list"),
    (lambda i: i.update(conv_kernel=1 << 30), "conv_kernel"),
    # (K and V counted for a conv layer: here as many bytes as its B * x row, which the graph's inputs then tell)
    (lambda i: i.pop("conv_layers"), "kv_bytes_per_token|the graph's inputs do not match"),
    (lambda i: i.update(conv_layers=[0]), "kv_bytes_per_token|the graph's inputs do not match"),
], ids=["twice", "past the layers", "every layer", "a bool", "a string", "a huge kernel", "left out", "one short"])
def test_conv_layers_in_export_json_are_checked(lfm2, tmp_path, edit, message):
    export = linked_copy(lfm2[2], tmp_path / "e")
    edit_json(export / "export.json", edit)
    with pytest.raises(UserError, match=message) as e:
        read_export_info(export)
    assert "\n" not in str(e.value)
