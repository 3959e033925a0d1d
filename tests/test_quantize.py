"""The AWQ algorithm on real parts: SmolLM2 blocks, tiny models of every family, real perplexity."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from hypothesis import given
from hypothesis import strategies as st

from awq_edge import data, packing
from conftest import MOE_EXPERTS
from awq_edge.checkpoint import load_awq_as_float, read_checked, read_checkpoint
from awq_edge.errors import UserError
from awq_edge.evaluate import deployed_prefix, perplexity
from awq_edge.export.spec import all_linear_shapes, model_spec, stored_fused
from awq_edge.families import family_for
from awq_edge.model import decoder_layers, load_float_model, mxfp4_dequantized
from awq_edge.quantize import (ACTIVATION_ROOTS, QuantizeSettings, _apply_group, _layer_output, _linear_names,
                               block_groups, calibration_tokens, is_conv_layer, is_moe_layer, capture_block_inputs,
                               fake_quantize,
                               fake_quantize_model, _to_quantized, gptq_round, gram, quantize_checkpoint,
                               quantize_model, quantize_tensor, refit_scales, TunedWeight, coarse_to_fine, per_column,
                               search_clip, tune_block_outputs)

TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "phi3")


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model, tokenizer = load_float_model(smollm2_dir)
    return model.float(), tokenizer


def test_quantize_tensor_ragged_k_uses_a_short_last_group():
    torch.manual_seed(0)
    w = torch.randn(16, 576)
    q, scales, zeros = quantize_tensor(w, 128)
    assert q.shape == (16, 576) and scales.shape == (16, 5) and zeros.shape == (16, 5)
    tail = w[:, 512:]
    expected = ((tail.amax(1) - tail.amin(1)) / 15).half()
    torch.testing.assert_close(scales[:, 4], expected, rtol=0, atol=0)
    w_hat = packing.dequantize(q.numpy(), scales.numpy(), zeros.numpy(), 128)
    # round-to-nearest: every weight within half a step (plus fp16 scale rounding)
    step = scales.float().numpy()[:, np.arange(576) // 128]
    assert np.all(np.abs(w_hat - w.numpy()) <= step * 0.5 + 1e-3 * step)
    torch.testing.assert_close(fake_quantize(w, 128), torch.from_numpy(w_hat))


def test_clip_search_lowers_output_error():
    torch.manual_seed(1)
    w = torch.randn(64, 256)
    w[:, 7] *= 8  # outliers stretch a few groups
    x = torch.randn(512, 256)
    clip = search_clip(w, x, QuantizeSettings(group_size=64))
    assert torch.all(clip <= w.reshape(64, 4, 64).abs().amax(-1) + 1e-6)
    err_clip = (x @ (fake_quantize(w, 64, clip) - w).T).pow(2).mean()
    err_rtn = (x @ (fake_quantize(w, 64) - w).T).pow(2).mean()
    assert err_clip < err_rtn


def _correlated_inputs(n, k, seed, sample_seed=0):
    """n tokens whose channels are correlated, with a few loud ones (as in a real block's inputs);
    the same seed, the same distribution; sample_seed picks the tokens."""
    g = torch.Generator().manual_seed(seed)
    mix, loud = torch.randn(k // 4, k, generator=g), 1 + 5 * (torch.rand(k, generator=g) > 0.97)
    g.manual_seed(1000 + sample_seed)
    return torch.randn(n, k // 4, generator=g) @ mix + 0.3 * torch.randn(n, k, generator=g) * loud


def test_gptq_round_keeps_the_grid_and_lowers_the_output_error():
    # K = 576 at G = 128: the short last group, as in SmolLM2
    torch.manual_seed(3)
    w, x = torch.randn(96, 576), _correlated_inputs(2048, 576, seed=3)
    q_near, scales, zeros = quantize_tensor(w, 128)
    q = gptq_round(w, gram(x), scales, zeros, 128, damp=0.01)
    assert q.dtype == torch.uint8 and q.shape == w.shape and int(q.max()) <= 15
    assert (q != q_near).float().mean() > 0.1  # it does choose other levels

    def output_error(qq, xx):
        w_hat = torch.from_numpy(packing.dequantize(qq.numpy(), scales.numpy(), zeros.numpy(), 128))
        return float((xx @ (w_hat - w).T).pow(2).mean())
    assert output_error(q, x) < 0.7 * output_error(q_near, x)
    # on other tokens of the same distribution too: not a fit to the 2048 it saw
    x_new = _correlated_inputs(2048, 576, seed=3, sample_seed=1)
    assert output_error(q, x_new) < 0.8 * output_error(q_near, x_new)


def test_gptq_round_with_heavy_damping_is_round_to_nearest():
    # H -> a multiple of I: no column's error says anything about another's, so no compensation
    torch.manual_seed(4)
    w, x = torch.randn(32, 200), _correlated_inputs(512, 200, seed=4)
    clip = w[:, :192].reshape(32, 3, 64).abs().amax(-1) * 0.8
    clip = torch.cat([clip, w[:, 192:].abs().amax(1, keepdim=True)], 1)  # K = 200: groups 64, 64, 64, 8
    q_near, scales, zeros = quantize_tensor(w, 64, clip)
    assert torch.equal(gptq_round(w, gram(x), scales, zeros, 64, damp=1e9, clip=clip), q_near)


def test_refit_scales_is_the_least_squares_scale_for_the_levels():
    # K = 576 at G = 128 (short last group); damp 0: the exact H-weighted least squares, so its
    # error is below the grid's and no small move of any one scale lowers it further
    torch.manual_seed(5)
    w, x = torch.randn(48, 576), _correlated_inputs(2048, 576, seed=5)
    h = gram(x)
    _, scales, zeros = quantize_tensor(w, 128)
    q = gptq_round(w, h, scales, zeros, 128, damp=1.0)

    def output_error(s):
        w_hat = torch.from_numpy(packing.dequantize(q.numpy(), s.numpy(), zeros.numpy(), 128))
        return (x @ (w_hat - w).T).pow(2).mean(0)  # per output row
    new = refit_scales(w, q, scales, zeros, h, 128, damp=0.0)
    assert new.dtype == torch.float16 and new.shape == scales.shape and bool((new > 0).all())
    assert bool((output_error(new) <= output_error(scales) * 1.001).all())
    assert float(output_error(new).mean()) < 0.97 * float(output_error(scales).mean())
    for g in (0, 4):
        for factor in (0.99, 1.01):
            moved = new.clone()
            moved[:, g] = (moved[:, g].float() * factor).half()
            assert float(output_error(moved).mean()) >= float(output_error(new).mean())
    # a row whose levels all sit on the zero point has no scale to fit: it keeps its scale
    q0 = q.clone()
    q0[0] = zeros[0].repeat_interleave(128)[:576]
    kept = refit_scales(w, q0, scales, zeros, h, 128, damp=0.0)
    assert torch.equal(kept[0], scales[0])


def test_clip_search_picks_the_clip_with_the_lowest_partial_output_error_on_the_tokens():
    # every candidate ratio scored here on its own, group by group: the search's choice must have
    # the lowest error in each (output channel, group) (K = 200: a short last group)
    torch.manual_seed(2)
    w, x = torch.randn(48, 200), torch.randn(300, 200) * torch.rand(200) * 3
    settings = QuantizeSettings(group_size=64)
    clip = search_clip(w, x, settings)
    for j, start in enumerate(range(0, 200, 64)):
        cols = slice(start, min(200, start + 64))
        max_abs = w[:, cols].abs().amax(1)
        errs = torch.stack([(x[:, cols] @ (fake_quantize(w[:, cols].clamp(-c[:, None], c[:, None]), 64)
                                            - w[:, cols]).T).pow(2).mean(0)
                            for c in (max_abs * r for r in torch.linspace(1.0, 0.5, settings.clip_grid))])
        chosen = (x[:, cols] @ (fake_quantize(w[:, cols], 64, clip[:, j:j + 1]) - w[:, cols]).T).pow(2).mean(0)
        torch.testing.assert_close(chosen, errs.min(0).values, rtol=1e-4, atol=1e-6)


def test_calibration_seed_picks_another_sample_of_the_texts(smollm2):
    _, tokenizer = smollm2
    texts = [f"Paragraph {i} is about the number {i * 7919 % 1000} and nothing else." for i in range(200)]
    first = calibration_tokens(tokenizer, texts, 4, 32, seed=0)
    assert first.shape == (4, 32)
    assert torch.equal(first, calibration_tokens(tokenizer, texts, 4, 32, seed=0))  # reproducible
    assert not torch.equal(first, calibration_tokens(tokenizer, texts, 4, 32, seed=1))


def test_deployed_prompts_start_with_the_bos_where_the_tokenizer_or_template_adds_it(smollm2, tmp_path):
    """SmolLM2: its chat template begins with <|im_start|>, its BOS; a Llama-style tokenizer adds
    its BOS itself; a tokenizer without a BOS (Qwen) starts mid-text."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    from awq_edge.synthetic import BOS, byte_tokenizer

    _, tokenizer = smollm2
    assert deployed_prefix(tokenizer) == [tokenizer.bos_token_id] == [1]
    byte_dir = byte_tokenizer(tmp_path / "bytes")  # a template that starts with "<s>"
    assert deployed_prefix(AutoTokenizer.from_pretrained(byte_dir)) == [BOS]
    adds = AutoTokenizer.from_pretrained(byte_dir)
    adds.chat_template = None
    assert deployed_prefix(adds) == []
    adds.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    assert deployed_prefix(adds) == [BOS]
    adds.bos_token = None
    assert deployed_prefix(adds) == []


def test_deployed_calibration_and_windows_start_with_the_prefix(smollm2):
    model, tokenizer = smollm2
    texts = [f"Paragraph {i} is about the number {i * 7919 % 1000} and nothing else." for i in range(200)]
    plain = calibration_tokens(tokenizer, texts, 4, 32, seed=0)
    deployed = calibration_tokens(tokenizer, texts, 4, 32, seed=0, prefix=[1])
    assert deployed.shape == (4, 32) and (deployed[:, 0] == 1).all()
    assert torch.equal(deployed[:, 1:].flatten(), plain.flatten()[:4 * 31])  # the same text, one token fewer per row
    text = " ".join(texts)
    a = perplexity(model, tokenizer, text, seqlen=128, windows=2, progress=False, protocol="plain")
    b = perplexity(model, tokenizer, text, seqlen=128, windows=2, progress=False, protocol="deployed")
    assert (a["prefix"], b["prefix"], a["tokens"], b["tokens"]) == ([], [1], 254, 254)
    assert a["perplexity"] != b["perplexity"]


@torch.no_grad()
def test_folding_scales_keeps_the_float_block_output(smollm2):
    """norm /= s, q/k/v *= s; (o group: none under GQA); up /= s, down *= s: same function.

    And the captured linear inputs the clip search uses are divided to match the scaled weights.
    """
    model, tokenizer = smollm2
    tokens = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 8)["input_ids"][:64]])
    inputs, kwargs = capture_block_inputs(model, tokens, 1)
    layer = model.model.layers[3]
    linears = _linear_names(layer)
    captured, outputs = {}, {}

    def record(name):
        def hook(_module, args, out):
            captured[name], outputs[name] = args[0].clone(), out.clone()
        return hook

    hooks = [lin.register_forward_hook(record(n)) for n, lin in linears.items()]
    before = layer(inputs, **kwargs[3])
    for h in hooks:
        h.remove()
    grams = {"down_proj": gram(captured["down_proj"].reshape(-1, captured["down_proj"].shape[-1]))}
    torch.manual_seed(0)
    for g in block_groups(layer, family_for("llama"), model.config):
        _apply_group(g, torch.rand(g.prev.weight.shape[0]) + 0.5, family_for("llama"), captured, linears, grams)
    torch.testing.assert_close(layer(inputs, **kwargs[3]), before, rtol=1e-4, atol=1e-4)
    for name in ("q_proj", "o_proj", "gate_proj", "down_proj"):  # scaled weights on divided inputs
        torch.testing.assert_close(linears[name](captured[name]), outputs[name], rtol=1e-4, atol=1e-4)
    # the all-token gram follows its input: gram(x) became gram(x / s)
    x_down = captured["down_proj"].reshape(-1, captured["down_proj"].shape[-1])
    torch.testing.assert_close(grams["down_proj"], gram(x_down), rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_o_group_only_without_gqa_and_its_fold_is_exact(tiny_model_dir):
    """o <- v is searched for multi-head attention only (docs/quantizer.md: under GQA every shared
    scale rule measured worse than none); where it runs, v rows /= s, o *= s keep the function."""
    gqa, _ = load_float_model(tiny_model_dir("llama", kv_heads=2))
    assert "o" not in [g.name for g in block_groups(gqa.model.layers[0], family_for("llama"), gqa.config)]
    model, tokenizer = load_float_model(tiny_model_dir("llama", kv_heads=4))
    tokens = torch.tensor([tokenizer("Robots on small boards need memory caps. " * 4)["input_ids"][:32]])
    inputs, kwargs = capture_block_inputs(model, tokens, 1)
    layer = model.model.layers[0]
    groups = {g.name: g for g in block_groups(layer, family_for("llama"), model.config)}
    assert list(groups) == ["qkv", "o", "gate_up", "down"]
    before = layer(inputs, **kwargs[0])
    torch.manual_seed(0)
    linears = _linear_names(layer)
    _apply_group(groups["o"], torch.rand(64) + 0.5, family_for("llama"),
                 {n: torch.ones(1, lin.in_features) for n, lin in linears.items()}, linears, {})
    torch.testing.assert_close(layer(inputs, **kwargs[0]), before, rtol=1e-4, atol=1e-4)


def test_awq_beats_rtn_on_real_text(smollm2, awq_checkpoint):
    """Even on a tiny calibration budget, AWQ's perplexity is below RTN's at the same group size."""
    model, tokenizer = smollm2
    text = data.eval_text()
    awq_model = load_awq_as_float(awq_checkpoint)
    base = {n: p.clone() for n, p in model.state_dict().items()}
    fake_quantize_model(model, QuantizeSettings(method="rtn", group_size=64))
    ppl_rtn = perplexity(model, tokenizer, text, seqlen=512, windows=4, progress=False)["perplexity"]
    model.load_state_dict(base)
    ppl_float = perplexity(model, tokenizer, text, seqlen=512, windows=4, progress=False)["perplexity"]
    ppl_awq = perplexity(awq_model, tokenizer, text, seqlen=512, windows=4, progress=False)["perplexity"]
    assert ppl_float < ppl_awq < ppl_rtn, (ppl_float, ppl_awq, ppl_rtn)


def test_checkpoint_metadata_records_the_run(awq_checkpoint):
    ckpt = read_checkpoint(awq_checkpoint)
    meta = ckpt.metadata
    assert meta["settings"]["method"] == "awq" and meta["settings"]["group_size"] == 64
    assert meta["calibration"]["tokens"] == 4 * 128
    assert len(meta["layers"]) == 30
    groups = [group for layer in meta["layers"] for group in layer["groups"].values()]
    for group in groups:  # the alpha kept is the grid point with the lowest loss of those tried
        alphas, losses = zip(*group["losses"])
        assert list(alphas) == sorted(alphas) and alphas[0] == 0.0
        best = int(np.argmin(losses))
        assert group["alpha"] == alphas[best] and group["loss"] == losses[best]
        assert group["loss_alpha0"] == losses[0]
    # and the search is worth running: in most groups some scale beats no scaling at all
    assert np.mean([g["loss"] < g["loss_alpha0"] for g in groups]) > 0.5
    assert len(ckpt.linears) == 30 * 7


@given(st.integers(1, 64), st.data())
def test_coarse_to_fine_finds_the_minimum_of_a_unimodal_loss_from_fewer_losses(n, data):
    """Strictly falling to a minimum at m, then strictly rising, with random slopes."""
    m = data.draw(st.integers(0, n - 1))
    steps = data.draw(st.lists(st.floats(0.001, 1000), min_size=n, max_size=n))
    loss = [sum(steps[i:m]) if i <= m else sum(steps[m:i]) for i in range(n)]
    calls = []
    best, tried = coarse_to_fine(n, lambda i: calls.append(i) or loss[i])
    assert best == m and sorted(calls) == sorted(tried) == sorted(set(calls))
    assert tried == {i: loss[i] for i in calls}
    if n == 20:
        assert len(calls) <= 13


@given(st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=64))
def test_coarse_to_fine_on_any_loss_returns_the_best_point_it_tried(loss):
    best, tried = coarse_to_fine(len(loss), lambda i: loss[i])
    assert 0 in tried and all(0 <= i < len(loss) for i in tried)
    assert tried[best] == min(tried.values()) and best == min(i for i in tried if tried[i] == tried[best])
    best, tried = coarse_to_fine(len(loss), lambda i: loss[i], first_step=1)  # --scale-search full
    assert sorted(tried) == list(range(len(loss))) and best == loss.index(min(loss))


@pytest.mark.parametrize("model_type", TINY_FAMILIES + ("ministral3", "smollm3", "granite", "glm", "glm4", "ernie4_5",
                                                       "olmo2", "exaone4", "gemma", "vaultgemma", "hunyuan_v1_dense",
                                                       "arcee", "nemotron", "stablelm", "cohere", "cohere2", "jais2",
                                                       "starcoder2", "granitemoehybrid", "phi",
                                                       "hyperclovax", "olmo", "apertus", "nanochat", "lfm2", "lfm3",
                                                       "gpt_neox", "gpt_bigcode", "opt", "gpt2", "gptj",
                                                       "gpt_neo", "cwm", "granite_swa", "qwen3_5_text", *MOE_EXPERTS))
def test_every_family_quantizes_end_to_end(model_type, tiny_model_dir, tmp_path):
    src = tiny_model_dir(model_type)
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(data.read_texts(data.fetch_wikipedia()[0])[:6]))
    out = tmp_path / "ckpt"
    settings = QuantizeSettings(group_size=32, calib_samples=4, calib_seqlen=64, loss_samples=2, scale_grid=5,
                                clip_grid=4)
    quantize_checkpoint(str(src), out, settings, calib=str(calib), progress=False)
    config = json.loads((src / "config.json").read_text())
    family = family_for(config["model_type"], config)  # (Granite 4.0-H's with experts: granite4_moe)
    # 7 a layer, 6 in an MLP without a gate (Arcee's), 5 in an LFM2 short convolution's (in_proj, out_proj)
    spec = model_spec(config)
    linears = len(all_linear_shapes(spec))
    stored = read_checkpoint(out).linears  # the family's layout: Phi-3's fused qkv_proj and gate_up_proj
    # (Qwen3.5's q_proj: its gate's too; a Mamba-2's in_proj: its z, x B C and dt, the last float once read)
    quantized = {name.split(".", 3)[3] for name in all_linear_shapes(spec)}
    fused = {name: sum(part in quantized for part in parts) - 1 for name, parts, _ in stored_fused(spec)}
    assert len(stored) == linears - sum(fused.get(name.split(".", 3)[3], 0) for name in stored)
    # under the names the family's transformers model gives its modules (StarCoder 2's mlp.c_fc): other tools read it
    # (but experts, one by one as the hub's checkpoints store them: transformers 5 stacks them in one module)
    modules = {name for name, _ in AutoModelForCausalLM.from_pretrained(src).named_modules()}
    with safe_open(str(out / "model.safetensors"), "np") as f:
        written = {key.rsplit(".", 1)[0] for key in f.keys()}
    experts = {name for name in written if ".experts." in name}
    assert written - experts <= modules and len(written) > len(stored), sorted(written - experts - modules)[:2]
    ckpt, _ = read_checked(out)
    assert len(ckpt.linears) == linears and ckpt.metadata["family"] == family.name
    quant_model = load_awq_as_float(out)
    _, tokenizer = load_float_model(src)
    ids = torch.tensor([tokenizer("Robots on small boards need memory caps.")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(quant_model(input_ids=ids).logits).all()
    # that the folded scales keep the function exactly: test_folding_scales_is_exact_in_every_family


@pytest.mark.parametrize("model_type", TINY_FAMILIES + ("glm4", "olmo2", "vaultgemma", "arcee", "nemotron", "cohere",
                                                       "jais2", "starcoder2", "granitemoehybrid", "phi",
                                                       "olmo", "apertus", "nanochat", "lfm2", "lfm3", "gpt_neox",
                                                       "gpt_bigcode", "opt", "gpt2", "gptj", "gpt_neo", "qwen3_5_text",
                                                       "bamba"))
@torch.no_grad()
def test_folding_scales_is_exact_in_every_family(model_type, tiny_model_dir):
    """Every scale group of a block (multi-head attention: o's too), folded with random scales into
    its previous op: the float block computes the same function. Each family folds into its own
    norms (Gemma's 1 + w, the sandwich and q/k norms stay outside the folds). OLMo 2's block has
    no norm before q/k/v and gate/up to fold into, OLMo 1's no norm weight: only o and down are
    scaled there. Arcee's MLP
    has no gate: down's scales fold into up_proj across relu^2, as their square roots (across
    StarCoder 2's gelu, which does not scale through, down has no group; its block runs under our
    names). Nemotron's LayerNorms (1 + w, a bias) take the q/k/v and up scales, bias and all.
    Cohere's one input norm takes q/k/v's and gate/up's as one group (Phi's: q/k/v's and up's).
    An LFM2 short convolution's input norm takes in_proj's (its B, C and x: a product of two of them
    and C times the convolution's output), and C's rows of in_proj take out_proj's. A Qwen3.5 delta
    net's (1 + w) input norm takes in_proj_qkv's and in_proj_z's, its float b and a too; a Granite
    4.0-H Mamba-2 mixer's, its in_proj's (z, x B C and dt)."""
    model, tokenizer = load_float_model(tiny_model_dir(model_type, kv_heads=4))
    family = family_for(model.config.model_type)
    tokens = torch.tensor([tokenizer("Robots on small boards need memory caps. " * 4)["input_ids"][:32]])
    inputs, kwargs = capture_block_inputs(model, tokens, 1)
    for i, layer in enumerate(decoder_layers(model)):  # (GPT-NeoX's are model.gpt_neox.layers)
        before = _layer_output(layer(inputs, **kwargs[i]))
        linears = _linear_names(layer)
        groups = block_groups(layer, family, model.config)
        mlp_in = "gate_up" if family.gated_mlp else "up"
        want = ([f"qkv_{mlp_in}", "o"] if family.parallel_block else ["qkv", "o", mlp_in]
                if family.pre_norms and family.norm_weight else ["o"])
        if is_conv_layer(layer):
            want = ["in", "out", mlp_in]
        if hasattr(layer, "linear_attn"):  # (no out group: out_proj reads a norm of o times silu(z))
            want = ["in", mlp_in]
        down = family.gated_mlp or family.activation in ACTIVATION_ROOTS  # (StarCoder 2's gelu: no down group)
        assert [g.name for g in groups] == want + ["down"] * down
        torch.manual_seed(i)
        for g in groups:
            _apply_group(g, torch.rand(g.linears[0].in_features) + 0.5, family,
                         {n: torch.ones(1, lin.in_features) for n, lin in linears.items()}, linears, {})
        torch.testing.assert_close(_layer_output(layer(inputs, **kwargs[i])), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_type", MOE_EXPERTS)
@torch.no_grad()
def test_folding_scales_is_exact_in_a_mixture_of_experts(model_type, tiny_model_dir):
    """A mixture of experts' groups: q/k/v and o as in every block; one gate_up group of every expert's gate
    and up, whose scales the norm takes and the float router too (it reads the same input); a down group
    per expert, folded into that expert's up (not across gpt-oss's clamped SwiGLU: none). Random scales keep
    the block's function (Qwen3-MoE's layer 1 and LFM2-MoE's layer 0, a short convolution: a dense MLP, the
    usual groups; gpt-oss's biased router and experts, its attention's sinks; Qwen2-MoE's shared expert, in
    the gate_up group with its gate, and its down; ERNIE 4.5's and AFMoE's: layer 0 dense, the shared expert
    ungated; AFMoE's gate on the attention's output in the qkv group; Qwen3.5 MoE's delta net and gated shared
    expert; Granite's shared_mlp, ungated; Granite 4.0-H's Mamba-2 mixer)."""
    model, tokenizer = load_float_model(tiny_model_dir(model_type, kv_heads=4))
    family = family_for(model.config.model_type, model.config)
    tokens = torch.tensor([tokenizer("Robots on small boards need memory caps. " * 4)["input_ids"][:32]])
    inputs, kwargs = capture_block_inputs(model, tokens, 1)
    for i, layer in enumerate(decoder_layers(model)):
        before = _layer_output(layer(inputs, **kwargs[i]))
        linears = {**_linear_names(layer), **({"router": layer.mlp.gate} if is_moe_layer(layer) else {})}
        groups = block_groups(layer, family, model.config)
        moe, mixer = [f"experts.{j}.down" for j in range(4)], ["in", "out"] if is_conv_layer(layer) else ["qkv", "o"]
        mixer = ["in"] if hasattr(layer, "linear_attn") else mixer  # (Qwen3.5 MoE's delta net: no out group)
        downs = [] if model_type == "gpt_oss" else moe if is_moe_layer(layer) else ["down"]  # (no fold across its act)
        shared = model_type in ("qwen2_moe", "ernie4_5_moe", "afmoe", "qwen3_5_moe_text", "granitemoeshared",
                                "granitemoe_swa", "granitemoehybrid_moe") and is_moe_layer(layer)
        downs += ["shared_expert.down"] if shared else []  # (its shared expert's, every token)
        assert [g.name for g in groups] == mixer + ["gate_up"] + downs
        assert is_moe_layer(layer) or (model_type, i) in (("qwen3_moe", 1), ("lfm2_moe", 0), ("ernie4_5_moe", 0),
                                                          ("afmoe", 0), ("mellum", 1))
        torch.manual_seed(i)
        for g in groups:
            _apply_group(g, torch.rand(g.linears[0].in_features) + 0.5, family,
                         {n: torch.ones(1, lin.in_features) for n, lin in linears.items()}, linears, {})
        torch.testing.assert_close(_layer_output(layer(inputs, **kwargs[i])), before, rtol=1e-4, atol=1e-4)


def test_an_expert_no_calibration_token_reaches_is_quantized_without_scales(tiny_model_dir, tmp_path):
    """Expert 4 of 5 has a router row of zeros and the others +-v, +-w: each token's top 2 are among those
    four (|v.x| and |w.x| > 0), so no calibration token reaches it. Its down has no scale group and its
    linears no clip search nor GPTQ (no inputs to fit): its down is the nearest rounding of its own
    weights (its gate and up take the scales of every expert's). The others are quantized as in every
    block, and the checkpoint runs."""
    from transformers import AutoConfig

    src = tiny_model_dir("qwen3_moe")
    config = AutoConfig.from_pretrained(src)
    config.num_experts, config.mlp_only_layers = 5, []
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    v, w = torch.randn(2, config.hidden_size)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.copy_(torch.stack([v, -v, w, -w, torch.zeros_like(v)]))
    model.save_pretrained(tmp_path / "float")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "float" / name).write_bytes((src / name).read_bytes())
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(data.read_texts(data.fetch_wikipedia()[0])[:6]))
    settings = QuantizeSettings(group_size=32, calib_samples=4, calib_seqlen=64, loss_samples=2, scale_grid=5,
                                clip_grid=4)
    metadata = quantize_checkpoint(str(tmp_path / "float"), tmp_path / "ckpt", settings, calib=str(calib),
                                   progress=False)
    for report in metadata["layers"]:
        assert sorted(report["groups"]) == sorted(["qkv", "gate_up"] + [f"experts.{j}.down" for j in range(4)])  # (GQA)
    ckpt, _ = read_checked(tmp_path / "ckpt")
    float_model, _ = load_float_model(tmp_path / "float")
    for i, layer in enumerate(decoder_layers(float_model)):
        for j, reached in ((4, False), (0, True)):  # (reached: its down takes scales)
            nearest = quantize_tensor(layer.mlp.experts[j].down_proj.weight, 32)[0].numpy()
            assert np.array_equal(ckpt.linears[f"model.layers.{i}.mlp.experts.{j}.down_proj"].q, nearest) != reached
    with torch.no_grad():
        assert torch.isfinite(load_awq_as_float(tmp_path / "ckpt")(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "lfm2_moe"])
@torch.no_grad()
def test_a_mixture_of_experts_loads_block_by_block_from_files_of_one_expert_at_a_time(model_type, tiny_model_dir):
    """Transformers 5 stacks the experts its checkpoints store one by one: the quantizer's loader stacks a
    layer's from the files only when that block is loaded (Qwen3-30B-A3B's 61 GB of bf16 never whole in
    memory), and the model then computes what transformers' own loading gives."""
    from awq_edge.model import load_for_quantization

    src = tiny_model_dir(model_type)
    model, tokenizer, materialize = load_for_quantization(src)
    stacked = {name: t for name, t in model.state_dict().items() if name.endswith("experts.gate_up_proj")}
    assert stacked and all(t.is_meta for t in stacked.values())  # (not loaded yet)
    for i in range(len(decoder_layers(model))):
        materialize(i)
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer("Robots on small boards need memory caps.")["input_ids"]])
    torch.testing.assert_close(model.float()(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_an_mxfp4_gpt_oss_checkpoint_is_read_as_the_floats_its_blocks_hold(tiny_model_dir, tmp_path):
    """OpenAI ships gpt-oss's experts in MXFP4: e2m1 values two to a byte (`*_blocks` [E, out, in / 32, 16],
    the low nibble first) in blocks of 32 with a power-of-two scale each (`*_scales`, biased by 127). The
    quantizer reads the floats they hold (transformers dequantizes them, whatever kernels are here), each
    expert's gate and up the even and odd rows of gate_up, and quantizes from there."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import FP4_VALUES

    src = tmp_path / "mxfp4"
    shutil.copytree(tiny_model_dir("gpt_oss"), src)
    tensors, rng, want = load_file(src / "model.safetensors"), np.random.default_rng(0), {}
    for i in range(2):
        for proj, (n, k) in (("gate_up_proj", (128, 64)), ("down_proj", (64, 64))):  # [E, out, in]
            name = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[name]
            levels = rng.integers(0, 16, (4, n, k // 32, 32)).astype(np.uint8)
            exponents = rng.integers(120, 130, (4, n, k // 32)).astype(np.uint8)
            tensors[name + "_blocks"] = torch.from_numpy(levels[..., 0::2] | (levels[..., 1::2] << 4))
            tensors[name + "_scales"] = torch.from_numpy(exponents)
            values = np.array(FP4_VALUES, np.float32)[levels] * np.exp2(exponents.astype(np.float32) - 127)[..., None]
            want[i, proj] = values.reshape(4, n, k)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (src / "config.json").write_text(json.dumps(config))
    # (asked for explicitly: with triton's kernels, transformers would keep the blocks packed; here it has none)
    assert mxfp4_dequantized(config)["quantization_config"].dequantize and mxfp4_dequantized({}) == {}
    model, _ = load_float_model(src, torch.float32)
    for i, layer in enumerate(decoder_layers(model)):
        for j, expert in enumerate(layer.mlp.experts):
            np.testing.assert_array_equal(expert.gate_proj.weight.numpy(), want[i, "gate_up_proj"][j, 0::2])
            np.testing.assert_array_equal(expert.up_proj.weight.numpy(), want[i, "gate_up_proj"][j, 1::2])
            np.testing.assert_array_equal(expert.down_proj.weight.numpy(), want[i, "down_proj"][j])
    quantize_checkpoint(str(src), tmp_path / "ckpt", QuantizeSettings(method="rtn", group_size=32), progress=False)
    ckpt, _ = read_checked(tmp_path / "ckpt")
    assert "quantization_config" in ckpt.config and ckpt.config["quantization_config"]["quant_method"] == "awq"


@pytest.mark.parametrize("model_type", ["phi3", "gpt_neox", "gpt_bigcode", "opt", "gpt2", "gpt_neo", *MOE_EXPERTS])
@torch.no_grad()
def test_the_quantizers_view_of_a_block_computes_what_transformers_does(model_type, tiny_model_dir):
    """Phi-3's q/k/v and gate/up, GPT-NeoX's and StarCoder 1's q/k/v stacked head by head: the
    quantizer sees each part as an nn.Linear of its own, and the model (calibration runs it) computes
    the same logits through them as transformers' own model with the fused linear (GPT-2's Conv1D
    ones read as the nn.Linear each is; GPT-Neo's attn.attention moved up as self_attn). OPT's fc1 and
    fc2, the block's own modules, are gathered into an mlp whose forward (the up group's loss) is
    the block's MLP. A mixture of experts' (transformers 5's 3-d tensors) as one nn.Linear per expert
    and linear, its routing each family's (softmax, top k, renormalized or not; Granite's softmax of the
    top k logits)."""
    src = tiny_model_dir(model_type, kv_heads=4)
    plain = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    model, tokenizer = load_float_model(src, torch.float32)
    assert all(isinstance(lin, torch.nn.Linear) for lin in _linear_names(decoder_layers(model)[0]).values())
    ids = torch.tensor([tokenizer("Robots on small boards need memory caps.")["input_ids"]])
    torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    if model_type == "opt":
        x, theirs = torch.randn(5, 64), decoder_layers(plain)[0]
        want = theirs.fc2(theirs.activation_fn(theirs.fc1(x)))
        torch.testing.assert_close(decoder_layers(model)[0].mlp(x), want, rtol=1e-6, atol=1e-6)


def test_clip_qkv_leaves_o_unscaled(tiny_model_dir):
    """OLMo 1 (7B 0424, 0724) clamps v: o's scales folded into v_proj would be clamped with it, so with
    clip_qkv there is no o group (without, multi-head attention has one: the fold test)."""
    model, _ = load_float_model(tiny_model_dir("olmo", kv_heads=4))
    layer, family = model.model.layers[0], family_for("olmo")
    assert "o" in [g.name for g in block_groups(layer, family, model.config)]
    model.config.clip_qkv = 8.0
    assert "o" not in [g.name for g in block_groups(layer, family, model.config)]


def test_gptq_rounding_changes_only_the_levels_on_awq_grid(tiny_model_dir, tmp_path):
    # same calibration, same scales and clips: every scale and zero must match nearest rounding's,
    # q/k keep nearest levels, the other linears take others
    src = tiny_model_dir("llama")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(data.read_texts(data.fetch_wikipedia()[0])[:6]))
    ckpts = {}
    for rounding in ("nearest", "gptq"):
        settings = QuantizeSettings(group_size=32, calib_samples=4, calib_seqlen=64, loss_samples=2, scale_grid=5,
                                    clip_grid=4, rounding=rounding, gptq_damp=0.01, block_tune_steps=0)
        quantize_checkpoint(str(src), tmp_path / rounding, settings, calib=str(calib), progress=False)
        ckpts[rounding] = read_checkpoint(tmp_path / rounding)
    assert ckpts["gptq"].metadata["settings"]["rounding"] == "gptq"
    for name, near in ckpts["nearest"].linears.items():
        got = ckpts["gptq"].linears[name]
        np.testing.assert_array_equal(got.scales, near.scales)
        np.testing.assert_array_equal(got.zeros, near.zeros)
        same_levels = np.array_equal(got.q, near.q)
        assert same_levels == name.endswith(("q_proj", "k_proj")), name


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_block_tuning_keeps_what_it_measured_and_never_a_worse_block(model_type, tiny_model_dir):
    """tune_block_outputs on a real block of every family (its attention, norms and biases run under
    autograd): it lowers the block's error on the held-out sequences, levels move at most one step
    from where they were rounded, the grid (scales, zeros) stays, and the error it reports is that
    of the QuantizedLinears it returns."""
    model, tokenizer = load_float_model(tiny_model_dir(model_type))
    texts = data.read_texts(data.fetch_wikipedia()[0])[:4]
    tokens = calibration_tokens(tokenizer, texts, n_samples=8, seqlen=32)
    inputs, kwargs = capture_block_inputs(model, tokens, 8)
    layer = model.model.layers[0]
    with torch.no_grad():
        targets = _layer_output(layer(inputs, **kwargs[0]))
    linears = _linear_names(layer)
    rounded = {lin: _to_quantized(lin, 32, continuous=True) for lin in linears.values()}
    settings = QuantizeSettings(group_size=32, batch_size=2, block_tune_steps=30, block_tune_batch=2,
                                block_tune_lr=0.25)
    tuned, report = tune_block_outputs(layer, rounded, inputs, targets, kwargs[0], settings)
    assert report["kept"] and report["mse_after"] < report["mse_before"]
    for lin, got in tuned.items():
        start = rounded[lin][0]
        assert np.abs(got.q.astype(int) - start.q.astype(int)).max() <= 1
        np.testing.assert_array_equal(got.zeros, start.zeros)
        np.testing.assert_array_equal(got.scales, start.scales)
    assert any(not np.array_equal(got.q, rounded[lin][0].q) for lin, got in tuned.items())

    def check_error(quantized):
        for lin, ql in quantized.items():
            lin.weight = torch.nn.Parameter(torch.from_numpy(ql.dequantize()).float(), requires_grad=False)
        with torch.no_grad():
            return (_layer_output(layer(inputs[:2], **kwargs[0])) - targets[:2]).pow(2).mean().item()

    before = check_error({lin: ql for lin, (ql, _) in rounded.items()})
    after = check_error(tuned)
    assert before == pytest.approx(report["mse_before"], rel=1e-4)
    assert after == pytest.approx(report["mse_after"], rel=1e-4)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_quantize_model_tunes_blocks_the_same_under_the_callers_no_grad_or_inference_mode(mode, tiny_model_dir):
    """API users (and test_quantize_gpu.py) call quantize_model under torch.no_grad() or
    torch.inference_mode(): block tuning still takes its gradients and gives the same levels."""
    src = tiny_model_dir("llama")
    _, tokenizer = load_float_model(src)
    tokens = calibration_tokens(tokenizer, data.read_texts(data.fetch_wikipedia()[0])[:4], n_samples=16, seqlen=64)
    settings = QuantizeSettings(group_size=32, batch_size=2, loss_samples=2, scale_grid=3, clip_grid=3,
                                block_tune_steps=20, block_tune_batch=2)

    def run():
        model, _ = load_float_model(src)
        return quantize_model(model, family_for("llama"), tokens, settings, progress=False)

    want = run()
    with mode():
        got = run()
    assert any(r["tune"]["kept"] for r in want.layer_report)  # tuned levels, not only the rounded ones
    assert [r["tune"] for r in got.layer_report] == [r["tune"] for r in want.layer_report]
    assert got.linears.keys() == want.linears.keys()
    for name, ql in want.linears.items():
        for field in ("q", "scales", "zeros"):
            np.testing.assert_array_equal(getattr(got.linears[name], field), getattr(ql, field), err_msg=name)


def test_the_tuned_weight_is_the_plain_expression_and_its_gradient_autograds():
    """TunedWeight (forward and backward written out to keep less memory) against autograd on the
    same ops: K = 80 at group 32 (a short last group), values reaching past both ends of [0, 15]."""
    torch.manual_seed(0)
    values = torch.rand(6, 80) * 16.4 - 0.7
    zero, scale = torch.randint(0, 16, (6, 3)).float(), torch.rand(6, 3) + 0.1
    v = (torch.rand(6, 80) - 0.5).requires_grad_(True)
    grad_out = torch.randn(6, 80)

    x = values + v
    levels = (x + (torch.round(x) - x).detach()).clamp(0, 15)
    want = (levels - per_column(zero, 32, 80)) * per_column(scale, 32, 80)
    (want_grad,) = torch.autograd.grad(want, v, grad_out)
    got = TunedWeight.apply(values, v, zero, scale, 32)
    (got_grad,) = torch.autograd.grad(got, v, grad_out)
    assert torch.equal(got, want) and torch.equal(got_grad, want_grad)
    assert (want_grad == 0).any() and (want_grad != 0).any()  # both sides of the clamp were reached
    with torch.no_grad():  # v None: the levels as rounded
        np.testing.assert_array_equal(TunedWeight.apply(values, None, zero, scale, 32),
                                      (torch.round(values).clamp(0, 15) - per_column(zero, 32, 80))
                                      * per_column(scale, 32, 80))


def test_unsupported_family_lists_the_supported_ones():
    with pytest.raises(UserError, match="not supported; supported model types: .*llama.*qwen3"):
        family_for("bloom")
