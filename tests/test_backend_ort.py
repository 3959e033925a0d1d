"""OrtBackend behaviour on a tiny Llama: KV cache modes, rewind, limits, all_logits, exact re-scoring."""
from __future__ import annotations

import json

import numpy as np
import pytest

from awq_edge.backend_ort import OrtBackend
from awq_edge.errors import UserError
from test_export_helpers import CPU_TARGETS, export_for_cpu, tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("tiny-llama")
    ckpt = tiny_checkpoint(root, "llama", smollm2_dir)
    return {t: export_for_cpu(ckpt, root / "exports", t) for t in ("ort", "onnx", "trt")}, ckpt, root


IDS = np.random.default_rng(0).integers(0, 256, 24).tolist()


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_rewind_and_chunked_prefill_match_one_pass(tiny, target):
    backend = OrtBackend(tiny[0][target], max_context=32)
    straight = [backend.forward(IDS[:8])] + [backend.forward([t]) for t in IDS[8:]]
    assert backend.position == len(IDS)
    backend.rewind(10)  # keep 10, recompute the rest in two chunks
    assert backend.position == 10
    np.testing.assert_allclose(backend.forward(IDS[10:15]), straight[15 - 8], rtol=0, atol=2e-5)
    np.testing.assert_allclose(backend.forward(IDS[15:]), straight[-1], rtol=0, atol=2e-5)
    backend.rewind(0)
    np.testing.assert_allclose(backend.forward(IDS[:8]), straight[0], rtol=0, atol=2e-5)


def test_shared_buffer_cache_is_allocated_once(tiny):
    backend = OrtBackend(tiny[0]["ort"], max_context=32)
    expected = 2 * 2 * 2 * 32 * 16 * 4  # K and V x layers x kv heads x max_context x head_dim x fp32
    assert backend.kv_mode == "shared_buffer" and backend.kv_bytes() == expected
    backend.forward(IDS[:20])
    assert backend.kv_bytes() == expected


def test_concat_cache_grows_with_position(tiny):
    backend = OrtBackend(tiny[0]["onnx"], max_context=32)
    per_token = 2 * 2 * 2 * 16 * 4
    assert backend.kv_mode == "concat" and backend.kv_bytes() == 0
    backend.forward(IDS[:20])
    assert backend.kv_bytes() == 20 * per_token
    backend.rewind(5)
    assert backend.kv_bytes() == 5 * per_token


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_context_limit_is_a_user_error(tiny, target):
    backend = OrtBackend(tiny[0][target], max_context=10)
    backend.forward(IDS[:8])
    with pytest.raises(UserError, match="exceeds max_context 10"):
        backend.forward(IDS[8:11])
    assert backend.position == 8  # nothing was appended
    backend.forward(IDS[8:10])
    assert backend.position == 10
    with pytest.raises(UserError):
        backend.rewind(11)
    with pytest.raises(UserError):
        backend.forward([])
    backend.rewind(0)
    with pytest.raises(UserError, match="out of range"):
        backend.forward([256])


def test_all_logits_export_returns_the_last_row(tiny):
    _, ckpt, root = tiny
    out = export_for_cpu(ckpt, root / "all", "ort", all_logits=True)
    a = OrtBackend(out, max_context=32)
    b = OrtBackend(tiny[0]["ort"], max_context=32)
    assert a.vocab_size == 256
    np.testing.assert_allclose(a.forward(IDS[:8]), b.forward(IDS[:8]), atol=1e-6)
    np.testing.assert_allclose(a.forward(IDS[8:9]), b.forward(IDS[8:9]), atol=1e-6)


def test_trt_export_is_refused(tiny):
    _, ckpt, root = tiny
    with pytest.raises(UserError, match="exported for TensorRT"):
        OrtBackend(root / "exports" / "trt", max_context=8)
    with pytest.raises(UserError, match="export.json is missing"):
        OrtBackend(root, max_context=8)


def _raw_and_rescored(backend, ids):
    raw = backend._run(ids)[-1].copy()  # the graph's logits, before re-scoring
    return raw, backend.rescore(raw.copy())


def test_rescoring_applies_the_final_softcap(tmp_path, smollm2_dir):
    """Gemma's final soft-cap: the graph applies cap * tanh(x / cap) to its logits, and the
    exact re-scored candidates get the same transform: they equal the float head's (an untied
    head here, so the graph holds its own fp16 table)."""
    ckpt = tiny_checkpoint(tmp_path, "gemma3_text", smollm2_dir, final_logit_softcapping=0.5,
                           tie_word_embeddings=False)
    out = export_for_cpu(ckpt, tmp_path / "exports", "ort", lm_head_bits=4, accuracy_level=4)
    spec = json.loads((out / "export.json").read_text())["lm_head_exact"]
    assert spec == {"top_k": 64, "table": "lm_head.exact"}
    exact = OrtBackend(export_for_cpu(ckpt, tmp_path / "float", "ort", lm_head_bits=None, accuracy_level=4),
                       max_context=32)
    backend = OrtBackend(out, max_context=32)
    for ids in (IDS[:8], IDS[8:9], IDS[9:10]):
        raw, got = _raw_and_rescored(backend, ids)
        ref = exact.forward(ids)
        idx = backend._top_ids.numpy()[0]
        assert np.abs(ref).max() <= 0.5  # soft-capped
        np.testing.assert_allclose(got[idx], ref[idx], rtol=1e-6, atol=1e-5)


def test_all_logits_export_rescores_forward_only(tiny):
    """With all_logits, the re-scored candidates are the last position's: forward re-scores like a
    plain export, forward_all returns the graph's (quantized head) logits untouched."""
    _, ckpt, root = tiny
    plain = OrtBackend(export_for_cpu(ckpt, root / "q4", "ort", lm_head_bits=4), max_context=32)
    full = OrtBackend(export_for_cpu(ckpt, root / "q4-all", "ort", lm_head_bits=4, all_logits=True), max_context=32)
    assert plain.rescore_k == full.rescore_k == 64
    np.testing.assert_allclose(full.forward(IDS[:8]), plain.forward(IDS[:8]), atol=1e-5)
    np.testing.assert_allclose(full.forward(IDS[8:9]), plain.forward(IDS[8:9]), atol=1e-5)
    raw, _ = _raw_and_rescored(plain, IDS[9:12])
    full.rewind(9)
    np.testing.assert_allclose(full.forward_all(IDS[9:12])[-1], raw, atol=1e-5)
