"""Every family in awq_edge.families, exported for every target, against the torch reference.

Tiny random models (hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 256), RTN g32. The token
sequences are longer than the sliding windows (Mistral 5, Gemma3 4), so window masks matter.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from awq_edge.errors import UserError
from conftest import MOE_EXPERTS
from test_export_helpers import (CPU_TARGETS, TINY, TINY_EXTRA, check_against_reference, export_for_cpu, longrope,
                                 reference_logits, rel_err, run_backend, tiny_checkpoint, torch_one_thread)

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


# what the trt target refuses: Hunyuan's q/k norms follow RoPE, which its attention plugin does;
# LFM2's short convolutions keep a state no trt engine holds; GPT-2's, StarCoder 1's and OPT's learned positions the trt
# graph does not add (its attention plugin takes past_length, no position ids); experts its plugins do not run;
# sinks its attention plugin does not add
TRT_REFUSES = {"hunyuan_v1_dense": "q/k norms come after RoPE, and the trt target's attention plugin",
               "lfm2": "short convolutions keep a state per position, which the trt target's engines do not",
               "lfm3": "short convolutions keep a state per position, which the trt target's engines do not",
               "gpt_bigcode": "positions are a learned table, which the trt target's graph does not add",
               "opt": "positions are a learned table, which the trt target's graph does not add",
               "gpt2": "positions are a learned table, which the trt target's graph does not add",
               "gpt_neo": "positions are a learned table, which the trt target's graph does not add",
               "granite_swa": "attention sinks are not in the trt target's attention plugin",
               "qwen3_5_text": "gated delta nets keep a recurrent state, which the trt target's engines do not",
               "granitemoehybrid": "Mamba-2 mixers keep a recurrent state, which the trt target's engines do not",
               "bamba": "Mamba-2 mixers keep a recurrent state, which the trt target's engines do not",
               **{moe: "mixture of experts is not in the trt target's graph" for moe in MOE_EXPERTS}}


@pytest.mark.parametrize("target", CPU_TARGETS)
def test_family_matches_reference(family, target):
    model_type, root, ckpt, ref = family
    if target == "trt" and model_type in TRT_REFUSES:
        with pytest.raises(UserError, match=TRT_REFUSES[model_type]):
            export_for_cpu(ckpt, root / "exports", target)
        assert not (root / "exports" / target).exists()
        return
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
    assert np.isclose(spec.layer_rope[0].inv_freq[1], 10000.0 ** (-2 / 16))  # local base 1e4
    assert np.isclose(spec.layer_rope[1].inv_freq[1], 1e6 ** (-2 / 16))  # global base 1e6
    assert spec.attn_scale == 16 ** -0.5
    assert spec.family.post_norms and spec.family.norm_offset == 1.0


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


def test_phi3_longrope_switches_to_its_long_factors_as_generate_does(tmp_path, smollm2_dir):
    """LongRoPE with the sequence crossing the original context (16 here; 4096 on Phi-3.5-mini):
    transformers' generate rotates each token by the long factors once its position is past it,
    the prompt before it keeping the short ones. The engines' tables, row by row, do the same."""
    import torch

    from awq_edge.checkpoint import load_awq_as_float

    ckpt = tiny_checkpoint(tmp_path, "phi3", smollm2_dir, **longrope(16, original=16))
    ref = load_awq_as_float(ckpt).eval()
    ids = _ids(3)
    with torch.no_grad(), torch_one_thread():  # as generate runs it: the prompt, then a token at a time
        out = ref(torch.tensor([ids[:PROMPT]]), use_cache=True)
        steps = [out.logits[0, -1]]
        for token in ids[PROMPT:]:
            out = ref(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits[0, -1])
    generated = torch.stack(steps).numpy()
    for target in ("ort", "onnx"):
        got = run_backend(export_for_cpu(ckpt, tmp_path / "exports", target), ids, PROMPT)
        assert max(rel_err(g, r) for g, r in zip(got, generated)) < 1e-5, target
    # one forward over all 32 positions takes the long factors for every one: the switch is real
    whole = reference_logits(ref, ids)[PROMPT - 1:]
    assert max(rel_err(g, r) for g, r in zip(generated, whole)) > 1e-3


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_a_phi3_checkpoint_is_stored_fused_and_read_split(tmp_path, smollm2_dir, fmt):
    """Phi-3's qkv_proj and gate_up_proj: fused on disk in either format, as AutoAWQ, llm-compressor
    and vLLM have them; split on reading into the rows of q/k/v and gate/up, exactly; a fused
    linear of another height is refused in one line."""
    from safetensors import safe_open

    from awq_edge.checkpoint import read_checked, write_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "phi3", smollm2_dir)
    split, spec = read_checked(ckpt)
    out = tmp_path / fmt
    out.mkdir()
    write_checkpoint(out, json.loads((ckpt / "config.json").read_text()), split.linears, split.tensors, {}, ckpt, fmt)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        names = set(f.keys())
    packed = "qweight" if fmt == "awq" else "weight_packed"
    assert {f"model.layers.0.self_attn.qkv_proj.{packed}", f"model.layers.0.mlp.gate_up_proj.{packed}"} <= names
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)
    again, _ = read_checked(out)
    assert sorted(again.linears) == sorted(split.linears) and len(split.linears) == 7 * spec.layers
    for name, lin in split.linears.items():
        for field in ("q", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(again.linears[name], field), getattr(lin, field), err_msg=name)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "num_key_value_heads": 1}))  # k and v of 16 rows
    with pytest.raises(UserError, match=r"qkv_proj has 128 rows, its config.json implies 96 \(64 \+ 16 \+ 16\)"):
        read_checked(out)


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_a_mixture_of_experts_checkpoint_reads_back_in_either_format_and_under_autoawqs_mixtral_names(
        tmp_path, smollm2_dir, fmt):
    """Experts one by one in either format (as AutoAWQ, llm-compressor and vLLM store them), the router in
    float, read back exactly; AutoAWQ's Mixtral checkpoints name them block_sparse_moe.experts.N.w1 (gate), w3
    (up), w2 (down) and block_sparse_moe.gate: read as ours."""
    from safetensors.numpy import load_file, save_file

    from awq_edge.checkpoint import read_checked, write_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "mixtral", smollm2_dir)
    ours, spec = read_checked(ckpt)
    out = tmp_path / fmt
    out.mkdir()
    write_checkpoint(out, json.loads((ckpt / "config.json").read_text()), ours.linears, ours.tensors, {}, ckpt, fmt)
    if fmt == "awq":  # AutoAWQ's names for Mixtral's
        tensors = load_file(out / "model.safetensors")
        renamed = {name.replace(".mlp.", ".block_sparse_moe.").replace(".gate_proj.", ".w1.").replace(
            ".up_proj.", ".w3.").replace(".down_proj.", ".w2."): t for name, t in tensors.items()}
        assert "model.layers.1.block_sparse_moe.experts.3.w2.qweight" in renamed
        save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    again, _ = read_checked(out)
    assert sorted(again.linears) == sorted(ours.linears) and len(ours.linears) == (4 + 3 * 4) * spec.layers
    for name, lin in ours.linears.items():
        for field in ("q", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(again.linears[name], field), getattr(lin, field), err_msg=name)
    np.testing.assert_array_equal(again.tensors["model.layers.1.mlp.gate.weight"],
                                  ours.tensors["model.layers.1.mlp.gate.weight"])


@pytest.mark.parametrize("fmt", ["awq", "compressed-tensors"])
def test_exaone3_checkpoints_under_its_own_names_and_config_keys_read_as_transformers_reads_them(
        tmp_path, smollm2_dir, fmt):
    """EXAONE 3's checkpoints (LG's float and AWQ ones) store GPT-2's tensor names
    (transformer.h.0.attn.attention.q_proj) and config keys (num_layers, layer_norm_epsilon,
    activation_function). The stored names are paired with transformers' by value (the model it
    loads), not by awq-edge's table: the float model streams block by block, and a quantized one in
    either format reads as the same linears. (The family's engines: test_family_matches_reference.)"""
    from dataclasses import replace

    import torch
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    from awq_edge.checkpoint import read_checked, write_checkpoint
    from awq_edge.export.spec import model_spec
    from awq_edge.model import load_for_quantization

    ckpt = tiny_checkpoint(tmp_path, "exaone", smollm2_dir)
    float_dir = tmp_path / "float"
    stored = load_file(str(float_dir / "model.safetensors"))
    assert "transformer.h.0.attn.attention.q_proj.weight" in stored
    loaded = AutoModelForCausalLM.from_pretrained(float_dir).state_dict()
    theirs = {ours: next(name for name, t in stored.items() if np.array_equal(t, w.numpy()))
              for ours, w in loaded.items()}
    config = json.loads((float_dir / "config.json").read_text())
    own_keys = {"num_layers": "num_hidden_layers", "layer_norm_epsilon": "rms_norm_eps",
                "activation_function": "hidden_act"}
    as_lg = {k: v for k, v in config.items() if k not in own_keys.values()}
    as_lg.update({theirs_key: config[ours] for theirs_key, ours in own_keys.items()})
    (float_dir / "config.json").write_text(json.dumps(as_lg))
    lg_spec, spec = model_spec(as_lg), model_spec(config)
    assert [r.key() for r in lg_spec.layer_rope] == [r.key() for r in spec.layer_rope]
    assert replace(lg_spec, layer_rope=None) == replace(spec, layer_rope=None) and lg_spec.layers == 2
    model, _, materialize = load_for_quantization(float_dir)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.is_meta  # streamed, not loaded whole
    materialize(0)
    torch.testing.assert_close(q_proj.weight, loaded["model.layers.0.self_attn.q_proj.weight"], rtol=0, atol=0)

    split, _ = read_checked(ckpt)
    out = tmp_path / fmt
    out.mkdir()
    write_checkpoint(out, json.loads((ckpt / "config.json").read_text()), split.linears, split.tensors, {}, ckpt, fmt)
    prefixes = {ours.removesuffix(".weight"): name.removesuffix(".weight") for ours, name in theirs.items()}
    renamed = {}
    for name, t in load_file(str(out / "model.safetensors")).items():
        prefix, field = name.rsplit(".", 1)
        renamed[f"{prefixes[prefix]}.{field}"] = t
    save_file(renamed, str(out / "model.safetensors"))
    written = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(
        {**{k: v for k, v in written.items() if k not in own_keys.values()},
         **{theirs_key: written[ours] for theirs_key, ours in own_keys.items()}}))
    again, _ = read_checked(out)
    assert sorted(again.linears) == sorted(split.linears) and sorted(again.tensors) == sorted(split.tensors)
    for name, lin in split.linears.items():
        for field in ("q", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(again.linears[name], field), getattr(lin, field), err_msg=name)


def test_a_ministral3_engine_ends_where_transformers_starts_scaling_its_queries(tmp_path, smollm2_dir):
    """Ministral 3 scales queries by 1 + beta ln(1 + floor(position / original context)): from
    position 128 here (16384 on the real models), where the engine's context ends, in one line."""
    import torch

    from awq_edge.backend_ort import OrtBackend
    from awq_edge.checkpoint import load_awq_as_float

    ckpt = tiny_checkpoint(tmp_path, "ministral3", smollm2_dir)
    ref = load_awq_as_float(ckpt).eval()
    ids = _ids(4, 132)
    whole = reference_logits(ref, ids)
    out = export_for_cpu(ckpt, tmp_path / "exports", "ort")
    with pytest.raises(UserError, match=r"max_context must be 1\.\.128"):
        OrtBackend(out, max_context=129)
    backend = OrtBackend(out, max_context=128)
    got = np.stack([backend.forward(ids[:120])] + [backend.forward([t]) for t in ids[120:128]])
    assert max(rel_err(g, r) for g, r in zip(got, whole[119:128])) < 1e-5  # up to the last position before 128
    with pytest.raises(UserError, match="context"):
        backend.forward([ids[128]])
    with torch.no_grad():  # and transformers' logits do change there: without the scaling, position 128's differ
        ref.config.rope_parameters["llama_4_scaling_beta"] = 0.0
        unscaled = reference_logits(ref, ids)
    assert rel_err(unscaled[127], whole[127]) < 1e-6 and rel_err(unscaled[128], whole[128]) > 1e-4


def test_a_window_as_wide_as_the_context_is_no_window():
    """Phi-3.5 and 4-mini's configs say sliding_window 262144 at 131072 positions: full attention
    (and the engines' full-attention paths), as a window of the whole context is."""
    from awq_edge.export.spec import model_spec

    config = {**TINY, **TINY_EXTRA["phi3"], "model_type": "phi3"}
    assert model_spec({**config, "sliding_window": 256}).layer_windows == [None, None]  # TINY: 256 positions
    assert model_spec({**config, "sliding_window": 255}).layer_windows == [255, 255]


def test_unsupported_rope_type_is_a_user_error(tmp_path, smollm2_dir):
    from awq_edge.export import export_checkpoint

    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    rope = {"rope_type": "axial", "rope_theta": 10000.0}  # (one that transformers names, and no RoPE function of its)
    ckpt = tiny_checkpoint(tmp_path / "ok", "llama", smollm2_dir)
    for folder in (tmp_path / "ok" / "float", ckpt):
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "rope_parameters": rope}))
    with pytest.raises(UserError, match="RoPE type 'axial' is not supported"):  # refused before quantizing
        quantize_checkpoint(str(tmp_path / "ok" / "float"), tmp_path / "again", QuantizeSettings(method="rtn"),
                            progress=False)
    assert not (tmp_path / "again").exists()
    with pytest.raises(UserError, match="RoPE type 'axial' is not supported"):  # and by the exporter
        export_checkpoint(ckpt, tmp_path / "out", "ort")
    assert not (tmp_path / "out").exists()


# Vision-language checkpoints: the language model alone, from either key layout transformers wrote.
VISION_LANGUAGE = {
    # Gemma 3 4B and up: text_config lists only what differs from Gemma3TextConfig's defaults,
    # the end of turn (106) only in the top-level eos_token_id; keys language_model.model.*
    "gemma3": ({**TINY, **TINY_EXTRA["gemma3_text"], "vocab_size": 300},
               dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, image_size=28, patch_size=14),
               dict(mm_tokens_per_image=4, image_token_index=299, boi_token_index=297, eoi_token_index=298,
                    eos_token_id=[1, 106])),
    # Mistral Small 3.1; keys as transformers >= 4.52 saves them: model.language_model.*, lm_head.*
    "mistral3": ({**TINY, "model_type": "mistral", "head_dim": 32, "vocab_size": 300},
                 dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, image_size=28, patch_size=14, head_dim=16),
                 dict(image_token_index=299, tie_word_embeddings=False)),  # its own lm_head, as the 24B
    # Ministral 3 ships only so: Mistral3ForConditionalGeneration around a ministral3 language model
    "ministral3": ({**TINY, **TINY_EXTRA["ministral3"], "model_type": "ministral3", "head_dim": 32, "vocab_size": 300},
                   dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, image_size=28, patch_size=14, head_dim=16),
                   dict(image_token_index=299, tie_word_embeddings=False)),
    # Qwen2.5-VL: a Qwen2 on text (its RoPE sections all turn text positions alike); keys as the hub's,
    # the language model's own (model.layers.*) beside visual.*; "_flat": its config as the hub's too,
    # the language model's keys at the top level (no text_config), RoPE as rope_scaling type mrope
    "qwen2_5_vl": ({**TINY, "model_type": "qwen2_5_vl_text", "vocab_size": 300,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}},
                   dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                        fullatt_block_indexes=[0], window_size=28, patch_size=14),
                   dict(image_token_id=299, video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)),
    # Qwen3-VL: a Qwen3 on text; keys model.language_model.* beside model.visual.*
    "qwen3_vl": ({**TINY, "model_type": "qwen3_vl_text", "head_dim": 16, "vocab_size": 300, "eos_token_id": 7,
                  "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                                      "rope_theta": 10000.0}},
                 dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      deepstack_visual_indexes=[0], num_position_embeddings=16, patch_size=16),
                 dict(image_token_id=299, video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)),
    # Qwen3.5 (every size ships so): a gated delta net, then attention; keys model.language_model.* beside
    # model.visual.*, its multi-token-prediction layer (mtp.*) beside them in the hub's
    "qwen3_5": ({**TINY, **TINY_EXTRA["qwen3_5_text"], "model_type": "qwen3_5_text", "vocab_size": 300,
                 "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 0], "mrope_interleaved": True,
                                     "rope_theta": 10000.0, "partial_rotary_factor": 0.25}},
                dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     num_position_embeddings=16, patch_size=16),
                dict(image_token_id=299, video_token_id=298, vision_start_token_id=297, vision_end_token_id=296)),
    # SmolVLM 2 (and "smolvlm_1", SmolVLM's first, as Idefics3): a Llama (SmolLM2) named model.text_model.*
    "smolvlm": ({**TINY, "model_type": "llama", "vocab_size": 300},
                dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14),
                dict(image_token_id=299, scale_factor=1)),
    # LLaVA 1.5 (a Llama; its Mistral, Qwen2 and Vicuna kin alike); InternVL 3 (a Qwen2, its own head
    # though the wrapper's config says tied); Aya Vision (a Cohere 2, tied)
    "llava": ({**TINY, "model_type": "llama", "vocab_size": 300},
              dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, image_size=28, patch_size=14, projection_dim=32),
              dict(image_token_index=299)),
    "internvl": ({**TINY, "model_type": "qwen2", "vocab_size": 300},
                 dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=[28, 28], patch_size=[14, 14]),
                 dict(image_token_id=299)),
    "aya_vision": ({**TINY, **TINY_EXTRA["cohere2"], "model_type": "cohere2", "vocab_size": 300, "eos_token_id": 7},
                   dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, image_size=28, patch_size=14),
                   dict(image_token_index=299, downsample_factor=1)),
    # LFM2-VL: an LFM2 (a short convolution, then attention), tied
    "lfm2_vl": ({**TINY, **TINY_EXTRA["lfm2"], "model_type": "lfm2", "vocab_size": 300},
                dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                     patch_size=14),
                dict(image_token_id=299)),
    # Apertus 1.5: its language model's head pruned to the text ids (256 of 300), beside its image and audio
    # tokenizers (whose codes are the ids past them); keys model.language_model.*, lm_head.*
    "apertus1p5": ({**TINY, **TINY_EXTRA["apertus1p5_text"], "model_type": "apertus1p5_text"},
                   dict(codebook_size=16, embed_dim=8, latent_channels=32, base_channels=32, channel_multiplier=[1],
                        num_res_blocks=1, attn_resolutions=[], resolution=16),
                   dict(audio_config=dict(model_type="wavtokenizer_encoder", num_filters=4, upsampling_ratios=[2, 2],
                                          num_lstm_layers=1, hidden_size=8, codebook_size=16, codebook_dim=8,
                                          decoder_hidden_size=16, decoder_intermediate_size=32, decoder_num_layers=1,
                                          decoder_attention_num_groups=4, adanorm_num_embeddings=2),
                        image_token_id=258, audio_token_id=259, image_token_offset=260, audio_token_offset=276)),
}
VISION_LANGUAGE["smolvlm_1"] = VISION_LANGUAGE["smolvlm"]
# Qwen3.5 MoE (35B-A3B and up ship so): Qwen3.5's wrapper around Qwen3.5 MoE's language model, its experts stacked
VISION_LANGUAGE["qwen3_5_moe"] = ({**VISION_LANGUAGE["qwen3_5"][0], **TINY_EXTRA["qwen3_5_moe_text"],
                                   "model_type": "qwen3_5_moe_text"}, *VISION_LANGUAGE["qwen3_5"][1:])
VISION_LANGUAGE["qwen2_5_vl_flat"] = VISION_LANGUAGE["qwen2_5_vl"]
# Qwen2-VL: Qwen2.5-VL's language model before it, as the hub has it (flat)
VISION_LANGUAGE["qwen2_vl_flat"] = ({**VISION_LANGUAGE["qwen2_5_vl"][0], "model_type": "qwen2_vl_text"},
                                    dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                         patch_size=14),
                                    VISION_LANGUAGE["qwen2_5_vl"][2])
WRAPPERS = {"ministral3": "mistral3", "qwen2_5_vl_flat": "qwen2_5_vl", "qwen2_vl_flat": "qwen2_vl",  # if not its name
            "smolvlm_1": "idefics3"}


def vision_language_dir(root, wrapper: str, tokenizer_dir) -> tuple:
    """A tiny random vision-language model saved as the hub has them, and the model itself."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig, AutoModelForImageTextToText

    text, vision, extra = VISION_LANGUAGE[wrapper]
    torch.manual_seed(0)
    text = dict(text, model_type=text.get("model_type", "gemma3_text"))
    config = AutoConfig.for_model(WRAPPERS.get(wrapper, wrapper), text_config=text, vision_config=vision, **extra)
    model = AutoModelForImageTextToText.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(mean=0.0 if wrapper == "gemma3" else 1.0, std=0.2)
    out = root / wrapper
    model.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    if wrapper == "gemma3":
        defaults = AutoConfig.for_model("gemma3_text").to_dict()
        saved["text_config"] = {k: v for k, v in saved["text_config"].items()
                                if k == "model_type" or defaults.get(k) != v}
        assert "num_attention_heads" not in saved["text_config"] or TINY["num_attention_heads"] != 8
    elif wrapper.endswith("_flat"):
        text = saved.pop("text_config")
        rope = text.pop("rope_parameters")
        saved.update({k: v for k, v in text.items() if k not in ("model_type", "dtype", "architectures")},
                     rope_theta=rope["rope_theta"],
                     rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    else:
        tensors = load_file(out / "model.safetensors")
        renamed = {k.replace("language_model.model.", "model.language_model.").replace("language_model.lm_head.",
                                                                                        "lm_head."): v
                   for k, v in tensors.items()}
        save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(saved))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_dir) / name, out / name)
    return out, model


def wrap_checkpoint(ckpt, source, out):
    """ckpt (a text checkpoint quantized from the vision-language source) stored as tools that keep
    the wrapper store it (AutoAWQ, llm-compressor): the wrapper's config and key layout, with its
    vision tower beside, float (a compressed-tensors `ignore` leaves its q/k/v/o float too)."""
    from safetensors.numpy import load_file, save_file

    from awq_edge.checkpoint import language_model_key

    wrapper_tensors = load_file(source / "model.safetensors")
    legacy = any(k.startswith("language_model.") for k in wrapper_tensors)
    own = any(k.startswith("model.layers.") for k in wrapper_tensors)  # (Qwen2.5-VL's: as the language model's)
    inner = "text_model" if any(k.startswith("model.text_model.") for k in wrapper_tensors) else "language_model"
    moved = {(f"language_model.{k}" if legacy else k if own else k.replace("model.", f"model.{inner}.", 1)
              if k.startswith("model.") else k): v for k, v in load_file(ckpt / "model.safetensors").items()}
    vision = {k: v for k, v in wrapper_tensors.items() if language_model_key(k) is None}
    out.mkdir()
    save_file({**moved, **vision}, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    config.pop("tie_word_embeddings")  # as Gemma 3's: tied or not is told by a stored lm_head
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, out / name)
    return out


# (Qwen3.5's and Qwen3.5 MoE's wrappers in one format each: the formats' reading is every other wrapper's)
@pytest.mark.parametrize("wrapper, fmt", [(w, f) for w in VISION_LANGUAGE for f in ("awq", "compressed-tensors")
                                          if (w, f) not in (("qwen3_5", "compressed-tensors"), ("qwen3_5_moe", "awq"))])
def test_a_vision_language_checkpoint_is_quantized_as_its_language_model(tmp_path, smollm2_dir, wrapper, fmt):
    """From the float wrapper: its language model quantized alone; from one quantized by a tool that
    keeps the wrapper (RedHatAI's Gemma 3 w4a16 models): read as its language model's checkpoint."""
    import torch

    from awq_edge.checkpoint import TEXT_MODEL_TYPES, load_awq_as_float, read_checkpoint
    from awq_edge.model import load_float_model
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    source, vision_language = vision_language_dir(tmp_path, wrapper, smollm2_dir)
    ids = _ids(3)
    language_model, _ = load_float_model(source)  # the vision tower left unread, the defaults filled in
    with torch.no_grad():
        want = vision_language(input_ids=torch.tensor([ids])).logits
        got = language_model(input_ids=torch.tensor([ids])).logits
    if wrapper == "qwen3_5_moe":  # (its stacked experts read as one linear each: the same sums in another order)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
    else:
        assert torch.equal(got, want)

    ckpt = tmp_path / "ckpt"
    quantize_checkpoint(str(source), ckpt, QuantizeSettings(method="rtn", group_size=32), progress=False,
                        checkpoint_format=fmt)
    config = json.loads((ckpt / "config.json").read_text())
    text_type = VISION_LANGUAGE[wrapper][0].get("model_type", "gemma3_text")
    assert config["model_type"] == TEXT_MODEL_TYPES.get(text_type, text_type)  # (Qwen2.5-VL's: a qwen2 checkpoint)
    text, _, extra = VISION_LANGUAGE[wrapper]
    assert config["eos_token_id"] == extra.get("eos_token_id", text.get("eos_token_id", config["eos_token_id"]))
    ref = load_awq_as_float(ckpt).eval()
    check_against_reference(export_for_cpu(ckpt, tmp_path / "exports", "ort"), ref, ids, PROMPT, 1e-5)

    wrapped = wrap_checkpoint(ckpt, source, tmp_path / "wrapped")
    read = read_checkpoint(wrapped)
    assert read.config["model_type"] == config["model_type"] and read.config["eos_token_id"] == config["eos_token_id"]
    tied = vision_language.get_output_embeddings().weight is vision_language.get_input_embeddings().weight
    assert read.config["tie_word_embeddings"] == config["tie_word_embeddings"] == tied
    assert sorted(read.linears) == sorted(read_checkpoint(ckpt).linears)
    exported = export_for_cpu(wrapped, tmp_path / "wrapped-exports", "ort")
    assert json.loads((exported / "config.json").read_text())["model_type"] == config["model_type"]
    check_against_reference(exported, ref, ids, PROMPT, 1e-5)
    with torch.no_grad():  # eval's reference of the wrapped checkpoint: the same model
        assert torch.equal(load_awq_as_float(wrapped).eval()(input_ids=torch.tensor([ids])).logits,
                           ref(input_ids=torch.tensor([ids])).logits)


# Configs written before transformers had layer_types (the hub's Gemma 3 1B, Qwen2.5): which layers
# slide follows each family's rule, as transformers applies it to the same config.json.
OLD_STYLE_WINDOWS = {
    "gemma3_pattern_default": ("gemma3_text", {}, {}),  # every 6th layer full: both tiny layers slide
    "gemma3_pattern_2": ("gemma3_text", {}, {"sliding_window_pattern": 2}),
    "gemma2_alternate": ("gemma2", {}, {}),  # layer 0 slides, layer 1 does not
    "smollm3_nope_slides": ("smollm3", {}, {}),  # layer 1, without RoPE, slides
    "smollm3_sliding_off": ("smollm3", {}, {"use_sliding_window": False}),
    "cwm_fourth": ("cwm", {}, {}),  # layers 0, 4, 8, ... full: layer 1 slides
    "granite_swa_fourth": ("granite_swa", {}, {}),
    "qwen2_sliding_on": ("qwen2", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 1}, {}),
    "qwen3_sliding_off": ("qwen3", {"sliding_window": 5, "use_sliding_window": True, "max_window_layers": 0},
                          {"use_sliding_window": False}),
}


@pytest.mark.parametrize("case", OLD_STYLE_WINDOWS)
def test_a_config_without_layer_types_slides_the_layers_transformers_slides(tmp_path, smollm2_dir, case):
    from awq_edge.checkpoint import load_awq_as_float
    from awq_edge.export.spec import model_spec

    model_type, overrides, edit = OLD_STYLE_WINDOWS[case]
    ckpt = tiny_checkpoint(tmp_path, model_type, smollm2_dir, **overrides)
    config = json.loads((ckpt / "config.json").read_text())
    config.pop("layer_types")
    (ckpt / "config.json").write_text(json.dumps({**config, **edit}))
    ref = load_awq_as_float(ckpt).eval()
    want = [ref.config.sliding_window if t == "sliding_attention" and ref.config.sliding_window else None
            for t in ref.config.layer_types]
    assert model_spec(json.loads((ckpt / "config.json").read_text())).layer_windows == want
    check_against_reference(export_for_cpu(ckpt, tmp_path / "exports", "ort"), ref, _ids(4), PROMPT, 1e-5)


@pytest.mark.parametrize("model_type, key, act, ok", [
    ("llama", "hidden_act", "silu", True), ("qwen3", "hidden_act", "swish", True),
    ("llama", "hidden_act", "gelu", False), ("mistral", "hidden_act", "relu", False),
    ("gemma3_text", "hidden_activation", "gelu_pytorch_tanh", True),
    ("gemma3_text", "hidden_activation", "gelu", False),  # exact GELU: not the tanh form the engines compute
    ("arcee", "hidden_act", "relu2", True), ("nemotron", "hidden_act", "relu", False),
])
def test_an_activation_the_engines_do_not_compute_is_refused(model_type, key, act, ok):
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    config = {**AutoConfig.for_model(model_type, **{**TINY, **TINY_EXTRA[model_type]}).to_dict(), key: act}
    config.pop("hidden_act" if key == "hidden_activation" else "hidden_activation", None)
    if ok:
        model_spec(config)
    else:
        with pytest.raises(UserError, match=f"hidden activation '{act}' is not supported for {model_type}"):
            model_spec(config)


def test_the_family_table_combines_only_what_every_engine_computes():
    """The engines' q/k norms and post-norms are RMSNorms, and a parallel block's MLP reads the input
    norm: a LayerNorm family has neither of the first two, a parallel block has pre-norms; every
    family's activation is one the engines compute, and every family is tested here (TINY_EXTRA)."""
    from awq_edge.export.spec import ACTIVATION_NAMES
    from awq_edge.families import FAMILIES, SUPPORTED_TYPES

    for f in FAMILIES.values():
        assert f.norm in ("rms", "layer") and f.activation in ACTIVATION_NAMES, f.name
        assert f.norm == "rms" or not (f.qk_norm or f.post_norms), f.name
        assert f.pre_norms or not f.parallel_block, f.name
        # experts: gated SiLU MLPs (ONNX Runtime's QMoE and decode_step.c's moe op compute that) on a norm of their own
        assert not f.experts_key or (f.gated_mlp and f.activation == "silu" and not f.parallel_block
                                     and not f.parallel_norms_switch), f.name
    assert SUPPORTED_TYPES <= set(TINY_EXTRA), sorted(SUPPORTED_TYPES - set(TINY_EXTRA))


@pytest.mark.parametrize("switch", ["use_parallel_residual", "qk_layernorm"])
def test_a_stablelm_switch_the_engines_do_not_compute_is_refused_and_its_head_is_hidden_over_heads(switch):
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    config = AutoConfig.for_model("stablelm", **TINY).to_dict()
    assert model_spec({**config, "head_dim": 64}).head_dim == 16  # as transformers' StableLM: 64 / 4 heads
    with pytest.raises(UserError, match=f"{switch} .* is not supported for stablelm"):
        model_spec({**config, switch: True})


def test_granite4_reads_its_dense_hybrid_and_expert_models():
    """Granite 4: RoPE only where position_embedding_type says rope; 4.0-H's Mamba layers read as Mamba-2 mixers
    (every layer one where layer_types is left out, as transformers builds it: refused, no attention); with
    num_local_experts above 0 (or left out: transformers' default, 8) its MLPs are experts beside the shared_mlp
    (4.0-H tiny and small), read as the family granite4_moe; a count not a whole number is refused."""
    from awq_edge.export.spec import model_spec

    hybrid = {**TINY, **TINY_EXTRA["granitemoehybrid"], "model_type": "granitemoehybrid"}
    dense = {**hybrid, "layer_types": ["attention", "attention"]}
    assert model_spec(dense).intermediate == 96  # shared_intermediate_size, whatever intermediate_size says
    assert model_spec(dense).delta is None and model_spec(hybrid).delta.layers == (0,)
    older = {key: value for key, value in hybrid.items() if key != "layer_types"}  # (its configs' older key)
    assert model_spec({**older, "layers_block_type": ["attention", "mamba"]}).delta.layers == (1,)
    assert all(r.inv_freq.any() for r in model_spec(dense).layer_rope)
    for unrotated in (None, "nope"):  # (4.0-H's configs: "nope")
        assert not any(r.inv_freq.any() for r in model_spec({**dense, "position_embedding_type": unrotated}).layer_rope)
    moe = model_spec({**hybrid, "num_local_experts": 4, "intermediate_size": 32})
    assert (moe.family.name, moe.experts, moe.expert_width, moe.shared_width, moe.moe_layers) == (
        "granite4_moe", 4, 32, 96, (0, 1)) and moe.delta.layers == (0,)
    left_out = {key: value for key, value in dense.items() if key != "num_local_experts"}
    assert model_spec(left_out).experts == 8 and model_spec(dense).family.name == "granite4"
    for change, message in (({"position_embedding_type": "alibi"}, "position_embedding_type must be one of rope, nope"),
                            ({"num_local_experts": "4"}, "num_local_experts must be an integer"),
                            ({"num_local_experts": -1}, "num_local_experts must be an integer in 1..1024, not -1"),
                            ({"layer_types": None}, "every layer is a Mamba-2 mixer")):
        with pytest.raises(UserError, match=message):
            model_spec({**dense, **change})


@pytest.mark.parametrize("model_type, taken, refused, message", [
    ("hyperclovax", {"use_post_norm": True}, {"use_post_norm": False}, "use_post_norm false .* for hyperclovax"),
    ("iquestcoder", {"clip_qkv": None}, {"clip_qkv": 8.0}, "clip_qkv 8.0 .* is not supported for iquestcoder"),
    ("lfm3", {"use_sandwich_norm": True}, {"use_sandwich_norm": False}, "use_sandwich_norm false .* for lfm3"),
    ("lfm3", {"attention_bias": False}, {"attention_bias": True}, "attention_bias True .* is not supported for lfm3")])
def test_a_switch_the_engines_do_not_compute_is_refused(model_type, taken, refused, message):
    """HyperCLOVA X without its Peri-LN post-norms (use_post_norm false); IQuest-Coder's clip_qkv (its config
    refuses it too); LFM3 without its sandwich norms, or with attention biases."""
    from awq_edge.export.spec import model_spec

    config = {**TINY, **TINY_EXTRA[model_type], "model_type": model_type}
    model_spec({**config, **taken})
    with pytest.raises(UserError, match=message):
        model_spec({**config, **refused})


def test_lfm3s_gates_and_rope_read_as_transformers_reads_them():
    """LFM3: its head gates unless use_attention_gate is false; its full layers' "proportional" RoPE
    over the whole head, the pairs past partial_rotary_factor's at frequency 0 (transformers' inv_freq),
    its sliding layers' over every pair; layer types by its rule where config.json lists none."""
    import torch
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from awq_edge.export.spec import model_spec

    config = AutoConfig.for_model("lfm3", **{**TINY, **TINY_EXTRA["lfm3"], "num_hidden_layers": 8, "layer_types": None})
    spec = model_spec({k: v for k, v in config.to_dict().items() if k != "layer_types"})
    listed = model_spec(config.to_dict())  # (as transformers lists them)
    assert (listed.conv_layers, listed.layer_windows) == (spec.conv_layers, spec.layer_windows)
    assert [r.key() for r in listed.layer_rope] == [r.key() for r in spec.layer_rope]
    assert spec.attention_gate and not model_spec({**config.to_dict(), "use_attention_gate": False}).attention_gate
    assert spec.conv_layers == (0, 1, 3, 5, 7) and spec.layer_windows == [None, None, None, None, 5, None, None, None]
    assert spec.rotary_dim == spec.head_dim == 16
    full, _ = ROPE_INIT_FUNCTIONS["proportional"](config, torch.device("cpu"), layer_type="full_attention")
    assert np.allclose(spec.layer_rope[2].inv_freq, full.numpy(), rtol=1e-6) and (full[4:] == 0).all()
    sliding = 1.0 / 1e4 ** (np.arange(0, 16, 2) / 16)
    assert np.allclose(spec.layer_rope[4].inv_freq, sliding, rtol=1e-6)


def test_lfm3s_head_gates_are_checked_against_its_config():
    """LFM3's float gates are checked with the checkpoint's other tensors: [heads, hidden] in each attention
    layer, one line otherwise."""
    from awq_edge.checkpoint import LinearInfo
    from awq_edge.export.spec import check_checkpoint_shapes, checkpoint_shapes, model_spec

    spec = model_spec({**TINY, **TINY_EXTRA["lfm3"], "model_type": "lfm3"})
    linears, tensors = checkpoint_shapes(spec)
    assert {n for n in tensors if n.endswith("g_proj.weight")} == {"model.layers.1.self_attn.g_proj.weight",
                                                                   "model.layers.2.self_attn.g_proj.weight"}
    infos = {name: LinearInfo(shape, 32, None, False) for name, shape in linears.items()}
    arrays = {name: np.zeros(shape, np.float32) for name, shape in tensors.items()}
    check_checkpoint_shapes(infos, arrays, spec, "ckpt")
    arrays["model.layers.2.self_attn.g_proj.weight"] = np.zeros((64, 4), np.float32)
    with pytest.raises(UserError, match=r"g_proj.weight is \[64, 4\], its config.json implies \[4, 64\]"):
        check_checkpoint_shapes(infos, arrays, spec, "ckpt")


def test_apertus_1_5s_pruned_head_is_the_engines_vocabulary():
    """Apertus 1.5: output_vocab_size prunes the head to the text ids (the engines' vocabulary; the embedding's
    rows past it, image and audio ids, are cut at reading); unset, head and embedding are vocab_size; a pruned
    head tied to the embedding is refused."""
    from awq_edge.export.spec import model_spec

    config = {**TINY, **TINY_EXTRA["apertus1p5_text"], "model_type": "apertus1p5_text"}
    assert (model_spec(config).vocab, model_spec(config).embed_vocab) == (256, 300)
    assert (model_spec({**config, "output_vocab_size": None}).vocab, model_spec({**config, "output_vocab_size": None})
            .embed_vocab) == (300, 0)
    with pytest.raises(UserError, match="output_vocab_size 256 prunes a head tied to the embedding of 300 rows"):
        model_spec({**config, "tie_word_embeddings": True})
    with pytest.raises(UserError, match="output_vocab_size"):
        model_spec({**config, "output_vocab_size": 301})


def test_mellums_multi_token_prediction_layer_is_not_read(tmp_path, smollm2_dir):
    """Mellum's checkpoints hold an MTP layer (mtp.*) that decoding does not run: a float one quantizes and a
    quantized one reads as without it (transformers' model ignores it on load too)."""
    from safetensors.numpy import load_file, save_file

    from awq_edge.checkpoint import read_checked
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "mellum", smollm2_dir)
    for path, extra in ((tmp_path / "float", {"mtp.layers.0.self_attn.q_proj.weight": np.ones((64, 64), np.float32)}),
                        (ckpt, {"mtp.layers.0.self_attn.q_proj.qweight": np.ones((64, 8), np.int32)})):
        tensors = load_file(path / "model.safetensors")
        save_file({**tensors, **extra, "mtp.norm.weight": np.ones(64, np.float32)}, path / "model.safetensors",
                  metadata={"format": "pt"})
    quantize_checkpoint(str(tmp_path / "float"), tmp_path / "again", QuantizeSettings(method="rtn", group_size=32),
                        progress=False)
    again, _ = read_checked(tmp_path / "again")
    read, _ = read_checked(ckpt)
    assert sorted(again.linears) == sorted(read.linears) and sorted(again.tensors) == sorted(read.tensors)
    assert not [name for name in [*read.linears, *read.tensors] if "mtp" in name]


def test_olmo_1s_layer_norms_take_eps_1e_5_whatever_its_config_says():
    from awq_edge.export.spec import model_spec

    assert model_spec({**TINY, "model_type": "olmo", "rms_norm_eps": 1e-6, "layer_norm_eps": 1e-3}).eps == 1e-5


@pytest.mark.parametrize("name", TINY_EXTRA)
def test_a_sparse_config_reads_as_transformers_completes_it(name):
    """A config.json that leaves keys out (Gemma 3's, third-party checkpoints') means transformers'
    class defaults: head_dim, windows, tied head, RoPE bases, context, KV heads, score scale (Granite 4.0-H's
    experts: 8 of them, 2 a token, its shared_mlp 1024 wide)."""
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    model_type = TINY_EXTRA[name].get("model_type", name)

    # 160 heads: a multiple of every family's default KV heads (2, 4, 8, 20, 32)
    # hidden 1280: a head of 8, of which StableLM rotates a quarter
    sizes = dict(hidden_size=1280, intermediate_size=512, num_hidden_layers=12, num_attention_heads=160, vocab_size=300)
    if model_type == "granitemoehybrid":  # (left out, its layers are Mamba: refused; experts only as the name says)
        sizes.update(layer_types=["mamba"] + ["attention"] * 11, **({} if name.endswith("_moe") else
                                                                     {"num_local_experts": 0}))
    if model_type == "bamba":  # (left out, every layer is Mamba: refused)
        sizes.update(attn_layer_indices=[3, 7])
    if model_type == "gptj":  # (its default rotary_dim, 64, is wider than these heads)
        sizes.update(rotary_dim=4)
    if model_type == "gpt_neo":  # (its default attention_types lists 24 layers)
        sizes.update(attention_types=[[["global", "local"], 6]])
    sparse, full = model_spec({"model_type": model_type, **sizes}), model_spec(
        AutoConfig.for_model(model_type, **sizes).to_dict())
    for field in sparse.__dataclass_fields__:
        got, want = getattr(sparse, field), getattr(full, field)
        if field == "layer_rope":
            assert [r.key() for r in got] == [r.key() for r in want], field
        else:
            assert got == want, (field, got, want)


ROPE_VALUES = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.lists(st.integers(), max_size=2),
                        st.integers(-10, 10 ** 7), st.floats(allow_nan=True, allow_infinity=True),
                        st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=4, max_size=4),
                        st.lists(st.floats(-1, 1e7), min_size=8, max_size=8))  # LongRoPE's, one per pair


@settings(max_examples=300, derandomize=True, deadline=None, database=None)
@given(rope=st.dictionaries(st.sampled_from(["rope_type", "rope_theta", "factor", "original_max_position_embeddings",
                                             "attention_factor", "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                                             "truncate", "low_freq_factor", "high_freq_factor", "short_factor",
                                             "long_factor", "partial_rotary_factor"]), ROPE_VALUES),
       rope_type=st.sampled_from(["yarn", "llama3", "linear", "dynamic", "default", "longrope"]))
@example(rope={"rope_theta": 1}, rope_type="yarn")  # ln(theta) = 0 divides YaRN's correction range
@example(rope={"rope_theta": 1e4, "mscale": 1e308, "mscale_all_dim": 1e-300, "factor": 1e6}, rope_type="yarn")
def test_hostile_rope_parameters_give_finite_tables_or_one_line_errors(rope, rope_type):
    """A checkpoint's config.json is untrusted: whatever its RoPE fields hold, the spec has finite
    frequencies and a finite cos/sin scale, or the export stops with a UserError."""
    from awq_edge.export.spec import model_spec

    config = {**TINY, "model_type": "llama", "rope_scaling": {"rope_type": rope_type, **rope}}
    try:
        spec = model_spec(config)
    except UserError as e:
        assert "\n" not in str(e)
        return
    assert all(np.isfinite(r.inv_freq).all() and np.isfinite(r.scale) for r in spec.layer_rope)
    assert all(r.long_inv_freq is None or np.isfinite(r.long_inv_freq).all() for r in spec.layer_rope)


# Pythia-70M's config.json as EleutherAI published it (transformers 4.24): its own names for the
# RoPE's base and rotated fraction, and the LayerNorms' eps
PYTHIA_70M = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
              "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
              "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
              "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
              "torch_dtype": "float16", "use_cache": True, "use_parallel_residual": True, "vocab_size": 50304}


def test_gpt_neox_reads_pythias_config_as_transformers_does():
    """Pythia's config.json: a quarter of each 64-wide head rotated, base 10000, eps 1e-5, attention and
    the MLP side by side (use_parallel_residual false: one after the other), as transformers 5 reads it."""
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    for parallel in (True, False):
        config = {**PYTHIA_70M, "use_parallel_residual": parallel}
        ours = model_spec(config)
        theirs = model_spec(AutoConfig.for_model(**config).to_dict())
        assert (ours.head_dim, ours.rotary_dim, ours.eps, ours.parallel_norms) == (64, 16, 1e-5, parallel)
        assert ours.layer_rope[0].key() == theirs.layer_rope[0].key()
        assert (theirs.rotary_dim, theirs.eps, theirs.parallel_norms) == (16, 1e-5, parallel)


def hub_layout(model_type: str, tensors: dict) -> dict:
    """A checkpoint's tensors as the hub's files of the family hold them: Pythia's (transformers 4)
    name the head embed_out, as transformers 5 still saves it, and hold each layer's causal mask,
    masked_bias and RoPE frequencies; GPT-2's names lack the transformer. prefix, and its layers
    hold their causal mask and masked_bias."""
    out = {}
    for name, t in tensors.items():
        if model_type == "gpt2":
            name = name.removeprefix("transformer.")
        out["embed_out.weight" if name == "lm_head.weight" else name] = t
    for i in range(TINY["num_hidden_layers"]):
        p = f"gpt_neox.layers.{i}.attention" if model_type == "gpt_neox" else f"h.{i}.attn"
        out[f"{p}.bias"] = np.tril(np.ones((1, 1, 8, 8), bool))
        out[f"{p}.masked_bias"] = np.array(-1e9, np.float32)
        if model_type == "gpt_neox":
            out[f"{p}.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    return out


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt2"])
def test_the_hubs_tensor_names_and_buffers_read_as_transformers_5s(model_type, tmp_path, smollm2_dir):
    """A float model stored as the hub holds Pythia and GPT-2 (hub_layout) quantizes to what it does
    under transformers 5's names, the buffers left out; a quantized Pythia checkpoint so stored
    (embed_out, the buffers) reads as ours."""
    from safetensors.numpy import load_file, save_file

    from awq_edge.checkpoint import read_checked
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    ckpt = tiny_checkpoint(tmp_path, model_type, smollm2_dir)

    def from_the_hub(directory: Path) -> Path:
        old = tmp_path / f"hub-{directory.name}"
        shutil.copytree(directory, old)
        save_file(hub_layout(model_type, load_file(str(old / "model.safetensors"))), str(old / "model.safetensors"))
        return old

    want, _ = read_checked(ckpt)
    requantized = tmp_path / "requantized"
    quantize_checkpoint(str(from_the_hub(tmp_path / "float")), requantized,
                        QuantizeSettings(method="rtn", group_size=32), progress=False)
    read = [read_checked(requantized)[0]] + ([read_checked(from_the_hub(ckpt))[0]] if model_type == "gpt_neox" else [])
    for got in read:
        assert sorted(got.tensors) == sorted(want.tensors) and sorted(got.linears) == sorted(want.linears)
        assert all(np.array_equal(got.tensors[n], want.tensors[n]) for n in want.tensors)
        assert all(np.array_equal(got.linears[n].q, want.linears[n].q) for n in want.linears)


def test_ernie_4_5_moes_hub_names_and_prediction_layers_read_as_transformers_5s(tmp_path, smollm2_dir):
    """ERNIE 4.5 MoE's hub files keep its expert biases as mlp.moe_statics.e_score_correction_bias (transformers
    5's mlp.gate.moe_statics...) and hold multi-token-prediction layers (model.mtp_*) that no engine runs: a float
    model so stored quantizes to what it does under transformers' names, and a quantized checkpoint so stored
    reads as ours."""
    from safetensors.numpy import load_file, save_file

    from awq_edge.checkpoint import read_checked
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    ckpt = tiny_checkpoint(tmp_path, "ernie4_5_moe", smollm2_dir)

    def from_the_hub(directory: Path) -> Path:
        hub = tmp_path / f"hub-{directory.name}"
        shutil.copytree(directory, hub)
        tensors = {name.replace(".mlp.gate.moe_statics.", ".mlp.moe_statics."): t
                   for name, t in load_file(str(hub / "model.safetensors")).items()}
        assert "model.layers.1.mlp.moe_statics.e_score_correction_bias" in tensors
        tensors.update({"model.mtp_block.0.mlp.up_proj.weight": np.ones((8, 64), np.float16),
                        "model.mtp_emb_norm.0.weight": np.ones(64, np.float16)})
        save_file(tensors, str(hub / "model.safetensors"), metadata={"format": "pt"})
        return hub

    want, spec = read_checked(ckpt)
    assert spec.moe_layers == (1,) and want.tensors["model.layers.1.mlp.expert_bias"].shape == (1, 4)
    requantized = tmp_path / "requantized"
    quantize_checkpoint(str(from_the_hub(tmp_path / "float")), requantized,
                        QuantizeSettings(method="rtn", group_size=32), progress=False)
    for got in (read_checked(requantized)[0], read_checked(from_the_hub(ckpt))[0]):
        assert sorted(got.tensors) == sorted(want.tensors) and sorted(got.linears) == sorted(want.linears)
        assert all(np.array_equal(got.tensors[n], want.tensors[n]) for n in want.tensors)
        assert all(np.array_equal(got.linears[n].q, want.linears[n].q) for n in want.linears)


# OPT-125M's and tiny_starcoder_py's config.json as published (their own key names)
OPT_125M = {"_remove_final_layer_norm": False, "activation_function": "relu", "architectures": ["OPTForCausalLM"],
            "bos_token_id": 2, "do_layer_norm_before": True, "eos_token_id": 2, "ffn_dim": 3072, "hidden_size": 768,
            "max_position_embeddings": 2048, "model_type": "opt", "num_attention_heads": 12, "num_hidden_layers": 12,
            "pad_token_id": 1, "torch_dtype": "float16", "vocab_size": 50272, "word_embed_proj_dim": 768}
TINY_STARCODER = {"activation_function": "gelu_pytorch_tanh", "architectures": ["GPTBigCodeForCausalLM"],
                  "attention_softmax_in_fp32": True, "multi_query": True, "n_embd": 768, "n_head": 12, "n_inner": 3072,
                  "n_layer": 20, "n_positions": 8192, "scale_attention_softmax_in_fp32": True, "vocab_size": 49152,
                  "model_type": "gpt_bigcode", "layer_norm_epsilon": 1e-05, "scale_attn_weights": True}


@pytest.mark.parametrize("config, changes, want", [
    (OPT_125M, {}, (768, 3072, 12, 12, 2048, 2)),
    (TINY_STARCODER, {}, (768, 3072, 12, 1, 8192, 0)),
    (TINY_STARCODER, {"multi_query": False, "n_inner": None}, (768, 3072, 12, 12, 8192, 0)),
])
def test_opt_and_starcoder_1_read_their_configs_as_transformers_does(config, changes, want):
    """Their own keys (ffn_dim; n_embd, n_inner, n_head, multi_query: one KV head), learned positions
    (OPT's from row 2), no layer rotating q and k, as transformers 5 reads the same config."""
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    config = {**config, **changes}
    for spec in (model_spec(config), model_spec(AutoConfig.for_model(**config).to_dict())):
        got = (spec.hidden, spec.intermediate, spec.heads, spec.kv_heads, spec.max_positions, spec.position_offset)
        assert got == want and not any(r.inv_freq.any() for r in spec.layer_rope) and spec.eps == 1e-5


@pytest.mark.parametrize("config, change, message", [
    (OPT_125M, {"do_layer_norm_before": False}, "do_layer_norm_before false .OPT-350M's norms after each residual"),
    (OPT_125M, {"word_embed_proj_dim": 512}, "word_embed_proj_dim 512 is not hidden_size 768"),
    (OPT_125M, {"_remove_final_layer_norm": True}, "_remove_final_layer_norm True .* is not supported for opt"),
    (TINY_STARCODER, {"scale_attn_weights": False}, "scale_attn_weights false .* is not supported for gpt_bigcode"),
])
def test_what_opt_and_starcoder_1_configs_turn_on_that_the_engines_do_not_compute_is_refused(config, change,
                                                                                              message):
    from awq_edge.export.spec import model_spec

    with pytest.raises(UserError, match=message):
        model_spec({**config, **change})


GPTJ_6B = {"activation_function": "gelu_new", "architectures": ["GPTJForCausalLM"], "n_embd": 4096, "n_head": 16,
           "n_layer": 28, "n_positions": 2048, "rotary_dim": 64, "vocab_size": 50400, "tie_word_embeddings": False,
           "layer_norm_epsilon": 1e-05, "model_type": "gptj"}


def test_gptj_reads_its_config_as_transformers_does():
    """GPT-J 6B's config.json: rotary_dim 64 of each 256-wide head rotated (not a fraction), n_inner
    null: 4 x 4096 wide, an untied head."""
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    for spec in (model_spec(GPTJ_6B), model_spec(AutoConfig.for_model(**GPTJ_6B).to_dict())):
        assert (spec.head_dim, spec.rotary_dim, spec.intermediate, spec.tie_embeddings) == (256, 64, 16384, False)


GPT_NEO_125M = {"activation_function": "gelu_new", "architectures": ["GPTNeoForCausalLM"],
                "attention_layers": ["global", "local"] * 6, "attention_types": [[["global", "local"], 6]],
                "hidden_size": 768, "intermediate_size": None, "layer_norm_epsilon": 1e-05,
                "max_position_embeddings": 2048, "model_type": "gpt_neo", "num_heads": 12, "num_layers": 12,
                "vocab_size": 50257, "window_size": 256}


@pytest.mark.parametrize("changes", [{}, {"attention_layers": None},  # (None: left out)
                                     {"attention_layers": None, "attention_types": None, "num_layers": 24}])
def test_gpt_neo_reads_its_config_as_transformers_does(changes):
    """GPT-Neo 125M's config.json: every other layer local (a window of 256), from attention_layers or
    attention_types expanded (its default when neither is there: 24 layers), scores not scaled, an MLP
    4 x hidden wide where intermediate_size is null."""
    from transformers import AutoConfig

    from awq_edge.export.spec import model_spec

    config = {k: v for k, v in {**GPT_NEO_125M, **changes}.items() if v is not None or k == "intermediate_size"}
    for spec in (model_spec(config), model_spec(AutoConfig.for_model(**config).to_dict())):
        layers = config["num_layers"]
        assert spec.layer_windows == [None, 256] * (layers // 2) and spec.attn_scale == 1.0
        assert (spec.intermediate, spec.position_offset, spec.head_dim) == (3072, 0, 64)
    for bad in ({"attention_layers": ["global", "sliding"] * 6}, {"attention_layers": ["global"] * 5},
                {"attention_layers": None, "attention_types": [[["global", "local"], 10 ** 9]]},
                {"attention_layers": None, "attention_types": [["global", 6]]}):
        with pytest.raises(UserError, match="attention_(layers|types) must list"):
            model_spec({**config, **bad})


GPT2_SMALL = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"], "layer_norm_epsilon": 1e-05,
              "model_type": "gpt2", "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
              "vocab_size": 50257}
# the mixtures of experts' published configs (Qwen/Qwen3-30B-A3B, allenai/OLMoE-1B-7B-0924,
# mistralai/Mixtral-8x7B-v0.1, ibm-granite/granite-3.0-1b-a400m-base), as their config.json has them
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "bos_token_id": 151643,
                 "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
                 "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
                 "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
                 "moe_intermediate_size": 768,
                 "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
                 "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None,
                 "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
                 "use_sliding_window": False, "vocab_size": 151936}
OLMOE_1B_7B = {"architectures": ["OlmoeForCausalLM"], "attention_bias": False, "clip_qkv": None, "eos_token_id": 50279,
               "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 1024, "max_position_embeddings": 4096,
               "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64,
               "num_experts_per_tok": 8, "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 1,
               "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
               "vocab_size": 50304}
MIXTRAL_8X7B = {"architectures": ["MixtralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
                "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 32768,
                "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
                "num_key_value_heads": 8,
                "num_local_experts": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "sliding_window": None,
                "tie_word_embeddings": False, "vocab_size": 32000}
GRANITE_1B_A400M = {"architectures": ["GraniteMoeForCausalLM"], "attention_bias": False,
                    "attention_multiplier": 0.015625,
                    "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0, "hidden_act": "silu",
                    "hidden_size": 1024, "intermediate_size": 512, "logits_scaling": 6.0,
                    "max_position_embeddings": 4096, "model_type": "granitemoe", "num_attention_heads": 16,
                    "num_experts_per_tok": 8, "num_hidden_layers": 24, "num_key_value_heads": 8,
                    "num_local_experts": 32, "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-06,
                    "rope_scaling": None, "rope_theta": 10000, "tie_word_embeddings": True, "vocab_size": 49155}
# LiquidAI/LFM2-8B-A1B's keys and sizes (18 short convolutions and 6 attention layers; this order ours)
LFM2_8B_A1B = {"architectures": ["Lfm2MoeForCausalLM"], "bos_token_id": 1, "conv_L_cache": 3, "conv_bias": False,
               "eos_token_id": 7, "hidden_size": 2048, "intermediate_size": 7168,
               "layer_types": ["conv", "conv", "full_attention", "conv"] * 6, "max_position_embeddings": 128000,
               "model_type": "lfm2_moe", "moe_intermediate_size": 1792, "norm_eps": 1e-05, "norm_topk_prob": True,
               "num_attention_heads": 32, "num_dense_layers": 2, "num_experts": 32, "num_experts_per_tok": 4,
               "num_hidden_layers": 24, "num_key_value_heads": 8, "pad_token_id": 0, "rope_theta": 1000000.0,
               "routed_scaling_factor": 1.0, "tie_embedding": True, "use_expert_bias": True, "vocab_size": 65536}
# openai/gpt-oss-20b's (its MXFP4 quantization_config left out)
GPT_OSS_20B = {"architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
               "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880,
               "initial_context_length": 4096, "intermediate_size": 2880,
               "layer_types": ["sliding_attention", "full_attention"] * 12, "max_position_embeddings": 131072,
               "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 24,
               "num_key_value_heads": 8, "num_local_experts": 32, "pad_token_id": 199999, "rms_norm_eps": 1e-05,
               "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
               "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
               "vocab_size": 201088}
# ERNIE 4.5 21B-A3B's shape and its MoE keys, as its model card and transformers' defaults give them (no hub here)
ERNIE_21B_A3B = {"architectures": ["Ernie4_5_MoeForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                 "hidden_act": "silu", "hidden_size": 2560, "intermediate_size": 12288,
                 "max_position_embeddings": 131072,
                 "model_type": "ernie4_5_moe", "num_attention_heads": 20, "num_key_value_heads": 4,
                 "num_hidden_layers": 28, "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 500000,
                 "tie_word_embeddings": True, "use_bias": False, "vocab_size": 103424, "moe_num_experts": 64,
                 "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_intermediate_size": 1536, "moe_k": 6,
                 "moe_layer_interval": 1, "num_nextn_predict_layers": 1}
# ibm-granite/granite-4.0-h-tiny's sizes as third-party copies of its config.json give them (nothing downloads
# here): 40 layers, attention at every tenth from 5, Mamba-2 mixers at the others; 6 of 64 experts a token
GRANITE_4_H_TINY = {"architectures": ["GraniteMoeHybridForCausalLM"], "attention_multiplier": 0.0078125,
                    "embedding_multiplier": 12.0, "hidden_size": 1536, "intermediate_size": 512,
                    "shared_intermediate_size": 1024, "num_local_experts": 64, "num_experts_per_tok": 6,
                    "num_hidden_layers": 40, "num_attention_heads": 12, "num_key_value_heads": 4,
                    "layer_types": ["attention" if i % 10 == 5 else "mamba" for i in range(40)],
                    "logits_scaling": 6.0, "residual_multiplier": 0.22, "position_embedding_type": "nope",
                    "mamba_n_heads": 48, "mamba_d_head": 64, "mamba_d_state": 128, "mamba_n_groups": 1,
                    "mamba_d_conv": 4, "mamba_expand": 2, "mamba_conv_bias": True, "mamba_proj_bias": False,
                    "max_position_embeddings": 131072, "model_type": "granitemoehybrid", "rms_norm_eps": 1e-05,
                    "tie_word_embeddings": True, "vocab_size": 100352}
MOE_CONFIGS = {"qwen3_moe": QWEN3_30B_A3B, "olmoe": OLMOE_1B_7B, "mixtral": MIXTRAL_8X7B,
               "granitemoe": GRANITE_1B_A400M, "lfm2_moe": LFM2_8B_A1B, "gpt_oss": GPT_OSS_20B,
               "ernie4_5_moe": ERNIE_21B_A3B, "granitemoehybrid": GRANITE_4_H_TINY}


@pytest.mark.parametrize("model_type", MOE_CONFIGS)
def test_a_mixture_of_experts_reads_its_published_config_as_transformers_does(model_type):
    """Experts, how many a token, their width, renormalized or not, and (Qwen3-MoE's decoder_sparse_step
    and mlp_only_layers, LFM2-MoE's num_dense_layers, ERNIE 4.5's start, end and interval) which layers
    have them: as transformers' model of the config builds them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from awq_edge.export.spec import model_spec

    published = MOE_CONFIGS[model_type]
    spec = model_spec(published)
    want = {"qwen3_moe": (128, 8, 768, True), "olmoe": (64, 8, 1024, False), "mixtral": (8, 2, 14336, True),
            "granitemoe": (32, 8, 512, True), "lfm2_moe": (32, 4, 1792, True),
            "gpt_oss": (32, 4, 2880, True), "ernie4_5_moe": (64, 6, 1536, True),
            "granitemoehybrid": (64, 6, 512, True)}[model_type]
    assert (spec.experts, spec.experts_per_token, spec.expert_width, spec.norm_top_k) == want
    assert spec.moe_layers == tuple(range({"lfm2_moe": 2, "ernie4_5_moe": 1}.get(model_type, 0), spec.layers))
    assert spec.expert_bias == (model_type in ("lfm2_moe", "ernie4_5_moe")) and spec.routed_scale == 1.0
    assert spec.shared_width == {"ernie4_5_moe": 3072, "granitemoehybrid": 1024}.get(model_type, 0)
    # the layers transformers gives experts, at a small size: Qwen3-MoE's every other one but layer 1
    small = {**published, "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 64, "decoder_sparse_step": 2,
             "mlp_only_layers": [1], "moe_intermediate_size": 16, "pad_token_id": 0,
             **({"layer_types": ["conv", "full_attention"] * 3} if model_type == "lfm2_moe" else {}),
             **({"layer_types": ["sliding_attention", "full_attention"] * 3} if model_type == "gpt_oss" else {}),
             **({"layer_types": ["mamba", "attention"] * 3, "mamba_n_heads": 8, "mamba_d_head": 16,
                 "mamba_d_state": 16} if model_type == "granitemoehybrid" else {}),
             "moe_layer_end_index": 4, "moe_layer_interval": 2}  # (ERNIE 4.5's)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**small), dtype=torch.float32)
    built = tuple(i for i, layer in enumerate(model.model.layers)  # (Granite's: block_sparse_moe; LFM2's feed_forward)
                  if hasattr(getattr(layer, "mlp", getattr(layer, "feed_forward", None)), "experts")
                  or hasattr(layer, "block_sparse_moe"))
    want = {"qwen3_moe": (3, 5), "lfm2_moe": (2, 3, 4, 5), "ernie4_5_moe": (1, 3)}.get(model_type, tuple(range(6)))
    assert model_spec(small).moe_layers == built == want


def test_a_mixture_of_experts_takes_the_largest_group_that_divides_its_experts(capsys):
    """gpt-oss's hidden and expert width, 2880, are not multiples of 128: group 64, said in a note, so that
    ONNX Runtime's QMoE and the native moe op hold its experts; the others keep the group asked for."""
    from awq_edge.export.spec import model_spec
    from awq_edge.quantize_settings import expert_group_size

    assert expert_group_size(model_spec(GPT_OSS_20B), 128) == 64
    assert "note: group size 64, not 128: gpt_oss's experts (2880 x 2880)" in capsys.readouterr().err
    assert expert_group_size(model_spec(GPT_OSS_20B), 32) == 32
    assert {t: expert_group_size(model_spec(config), 128) for t, config in MOE_CONFIGS.items()} == {
        **{t: 128 for t in MOE_CONFIGS}, "gpt_oss": 64}


def test_a_config_of_more_experts_than_any_model_is_refused_before_anything_is_made():
    """1024 layers of 1024 experts: three million linears to list and check, for a checkpoint that cannot
    exist; refused in one line, at once."""
    from awq_edge.export.spec import model_spec

    with pytest.raises(UserError, match="experts in all"):
        model_spec({**MIXTRAL_8X7B, "num_hidden_layers": 1024, "num_local_experts": 1024})


WRONG = [None, "x", -1, 0, 10 ** 18, 1e308, True, [], {}, [[["global"], 10 ** 18]], [["local", 1]]]
# transformers' defaults for Granite SWA (4 of its layers, two of them without RoPE) and Meta's CWM (4 layers)
GRANITE_SWA = {"model_type": "granite_swa", "vocab_size": 100352, "hidden_size": 2560, "intermediate_size": 8192,
               "num_hidden_layers": 4, "num_attention_heads": 20, "num_key_value_heads": 4, "hidden_act": "silu",
               "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
               "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}, "embedding_multiplier": 1.0,
               "logits_scaling": 1.0, "residual_multiplier": 1.0, "attention_multiplier": 1.0, "sliding_window": 128,
               "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"],
               "layer_rope_theta": [10000.0, 0, 500000.0, 0]}
CWM = {"model_type": "cwm", "vocab_size": 128256, "hidden_size": 6144, "intermediate_size": 21504,
       "num_hidden_layers": 4, "num_attention_heads": 48, "num_key_value_heads": 8, "hidden_act": "silu",
       "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "tie_word_embeddings": False, "head_dim": 128,
       "rope_parameters": {"rope_theta": 1000000.0, "factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                           "original_max_position_embeddings": 8192, "rope_type": "llama3"},
       "sliding_window": 8192, "layer_types": ["full_attention", "sliding_attention", "sliding_attention",
                                               "sliding_attention"]}


def test_granite_swa_reads_a_rope_base_per_layer_and_cwm_slides_all_but_every_fourth_layer():
    """Granite SWA's layer_rope_theta: each layer's base, 0 none (the sliding layers here); left out, rope_theta
    everywhere. Both families: layers 0, 4, 8, ... full where config.json lists no layer_types."""
    from awq_edge.export.spec import model_spec

    spec = model_spec(GRANITE_SWA)
    assert spec.layer_windows == [None, 128, 128, 128] and spec.attention_sinks
    turns = [float(r.inv_freq[1]) for r in spec.layer_rope]
    assert turns == pytest.approx([1e4 ** (-2 / 128), 0, 5e5 ** (-2 / 128), 0])
    spec = model_spec({k: v for k, v in GRANITE_SWA.items() if k not in ("layer_rope_theta", "layer_types")})
    assert spec.layer_windows == [None, 128, 128, 128]
    assert [float(r.inv_freq[1]) for r in spec.layer_rope] == pytest.approx([1e4 ** (-2 / 128)] * 4)
    spec = model_spec({k: v for k, v in CWM.items() if k not in ("layer_types", "rope_parameters")})
    assert spec.layer_windows == [None, 8192, 8192, 8192] and not spec.attention_sinks
    assert spec.layer_rope[0].key() == model_spec(CWM).layer_rope[0].key()  # Llama 3's scaling by default
    with pytest.raises(UserError, match="layer_rope_theta"):
        model_spec({**GRANITE_SWA, "layer_rope_theta": [1e4] * 3})


@pytest.mark.parametrize("config", [PYTHIA_70M, OPT_125M, TINY_STARCODER, GPT_NEO_125M, GPT2_SMALL, GPTJ_6B,
                                    {k: v for k, v in GPT_NEO_125M.items() if k != "attention_layers"},
                                    *MOE_CONFIGS.values(), GRANITE_SWA, CWM],
                         ids=["gpt_neox", "opt", "gpt_bigcode", "gpt_neo", "gpt2", "gptj", "gpt_neo_types",
                              *MOE_CONFIGS, "granite_swa", "cwm"])
def test_a_wrong_value_in_any_key_of_these_configs_is_read_or_refused_in_one_line(config):
    """Every key these families read (theirs and the ones they alias), set to each wrong value or left
    out: model_spec gives a spec or a one-line UserError, never another exception."""
    from awq_edge.export.spec import model_spec

    keys = set(config) | {"attention_types", "attention_layers", "window_size", "multi_query", "use_parallel_residual",
                          "rotary_dim", "rotary_pct", "rotary_emb_base", "word_embed_proj_dim", "n_inner", "ffn_dim",
                          "do_layer_norm_before", "scale_attn_weights", "_remove_final_layer_norm", "hidden_size",
                          "intermediate_size", "num_key_value_heads", "num_experts", "num_local_experts",
                          "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
                          "mlp_only_layers", "num_dense_layers", "use_expert_bias", "routed_scaling_factor",
                          "moe_layer_end_index"}
    for key in sorted(keys - {"model_type"}):
        for value in WRONG + ["left out"]:
            changed = {k: v for k, v in config.items() if k != key}
            if value != "left out":
                changed[key] = value
            try:
                model_spec(changed)
            except UserError as e:
                assert "\n" not in str(e), (key, value, str(e))
