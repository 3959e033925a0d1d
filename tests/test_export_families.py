"""Every family in awq_edge.families, exported for every target, against the torch reference.

Tiny random models (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256), RTN g32. The token
sequences are longer than the sliding windows (Mistral 5, Gemma3 4), so window masks matter.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from awq_edge.errors import UserError
from test_export_helpers import CPU_TARGETS, TINY, TINY_EXTRA, check_against_reference, export_for_cpu, tiny_checkpoint

PROMPT = 12
STEPS = 20


@pytest.fixture(scope="module", params=[m for m in TINY_EXTRA if m != "llama"])
def family(request, tmp_path_factory, smollm2_dir):
    from awq_edge.checkpoint import load_awq_as_float

    root = tmp_path_factory.mktemp(request.param)
    ckpt = tiny_checkpoint(root, request.param, smollm2_dir)
    return request.param, root, ckpt, load_awq_as_float(ckpt).eval()


def _ids(seed: int, n: int = PROMPT + STEPS) -> list[int]:
    return np.random.default_rng(seed).integers(0, 256, n).tolist()


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_family_matches_reference(family, target):
    model_type, root, ckpt, ref = family
    out = export_for_cpu(ckpt, root / "exports", target)
    # trt runs in fp16 on the device; its stand-in keeps the fp16-rounded constants (RoPE
    # tables, scalars), hence a looser bound than the fp32 targets' rounding-level agreement.
    tol = 1e-3 if target == "trt" else 1e-5
    check_against_reference(out, ref, _ids(1), PROMPT, tol)


def test_gemma3_spec_reads_local_rope_and_window():
    """What the gemma3 export relies on: per-layer windows, two RoPE bases, (1 + w) sandwich norms."""
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    config = AutoConfig.for_model("gemma3_text", **{**TINY, **TINY_EXTRA["gemma3_text"]}).to_dict()
    spec = model_spec(config)
    assert spec.layer_windows == [4, None]
    assert np.isclose(spec.layer_inv_freq[0][1], 10000.0 ** (-2 / 16))  # local base 1e4
    assert np.isclose(spec.layer_inv_freq[1][1], 1e6 ** (-2 / 16))  # global base 1e6
    assert spec.attn_scale == 16 ** -0.5
    assert spec.family.sandwich_norm and spec.family.norm_offset == 1.0


ROPE_SCALINGS = {
    "llama3": ("llama", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # Qwen's long-context setting; attention factor 0.1 ln 4 + 1 on cos/sin
    "yarn": ("qwen3", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                       "original_max_position_embeddings": 64}),
    # DeepSeek-style: the factor from the two lengths, mscale / mscale_all_dim, no truncation
    "yarn_mscale": ("qwen2", {"rope_type": "yarn", "rope_theta": 500.0, "factor": None, "mscale": 1.0,
                              "mscale_all_dim": 0.5, "beta_fast": 16, "truncate": False,
                              "original_max_position_embeddings": 32}),
    "yarn_attention_factor": ("mistral", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                          "attention_factor": 0.8, "original_max_position_embeddings": 128}),
    # NTK only past max_position_embeddings: the default frequencies everywhere the engine runs
    "dynamic": ("llama", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
}


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_rope_scaling(tmp_path, smollm2_dir, scaling):
    """Each RoPE scaling type changes the frequencies (YaRN also cos/sin's size); the export follows HF."""
    from awq_edge.checkpoint import load_awq_as_float

    model_type, rope = ROPE_SCALINGS[scaling]
    ckpt = tiny_checkpoint(tmp_path, model_type, smollm2_dir, rope_parameters=rope)
    ref = load_awq_as_float(ckpt).eval()
    for target in ("ort", "onnx"):
        check_against_reference(export_for_cpu(ckpt, tmp_path / "exports", target), ref, _ids(2), PROMPT, 1e-5)


def test_unsupported_rope_type_is_a_user_error(tmp_path, smollm2_dir):
    from awq_edge.export import export_checkpoint

    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
            "original_max_position_embeddings": 64}
    with pytest.raises(UserError, match="RoPE type 'longrope' is not supported"):  # refused before quantizing
        tiny_checkpoint(tmp_path / "float", "llama", smollm2_dir, rope_parameters=rope)
    ckpt = tiny_checkpoint(tmp_path / "ok", "llama", smollm2_dir)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(UserError, match="RoPE type 'longrope' is not supported"):  # and by the exporter
        export_checkpoint(ckpt, tmp_path / "out", "ort")
    assert not (tmp_path / "out").exists()
