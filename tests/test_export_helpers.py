"""Helpers shared by the export and ORT backend tests (no tests here).

- tiny_checkpoint: a random tiny model of any family, saved with save_pretrained and quantized
  with RTN at group 32 by the real quantizer.
- reference_logits / run_backend / rel_err: compare an exported graph with the torch
  dequantized reference (awq_edge.checkpoint.load_awq_as_float).
"""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import numpy as np
import pytest

# Targets a test runs on this machine. The trt graph's plugin ops run through the CPU stand-in
# (export/cpu_standin.py), not TensorRT, and the test ids say so.
CPU_TARGETS = [pytest.param("ort", id="ort"), pytest.param("onnx", id="onnx"),
               pytest.param("trt", id="trt_graph_on_cpu_standin")]

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
TINY_EXTRA = {
    "llama": {},
    "mistral": {"sliding_window": 5},
    # Llama's block, layer 0 full and layer 1 sliding (its rule), Llama 3's RoPE scaling (its default)
    "cwm": {"head_dim": 16, "sliding_window": 5, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16,
                    "layer_types": ["sliding_attention", "full_attention"]},
    # YaRN; queries scaled from position 128 on, where its engines end (Family.llama4_query_scaling)
    "ministral3": {"sliding_window": 5, "pad_token_id": 0,
                   "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                       "original_max_position_embeddings": 128, "beta_fast": 32.0, "beta_slow": 1.0,
                                       "mscale": 1.0, "mscale_all_dim": 0.5, "llama_4_scaling_beta": 0.1}},
    # every multiplier away from 1 (the real 2B's: 12, 0.015625, 0.22, 8)
    "granite": {"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                "logits_scaling": 2.5},
    # Granite's multipliers, a sink per head; layer 0 full and rotating at its own base, layer 1 sliding
    # without RoPE (layer_rope_theta 0)
    "granite_swa": {"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                    "logits_scaling": 2.5, "sliding_window": 5, "layer_rope_theta": [500.0, 0],
                    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # attention and an MLP without a gate on one LayerNorm under Phi's names, biases everywhere, a head bias,
    # half of each head rotated (its default)
    "phi": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # an MLP without a gate whose activation (xIELU) has parameters in each layer, per-head q/k norms
    "apertus": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Apertus 1.5's language model: Apertus's block, its embedding 300 rows (image and audio ids past 256) and its
    # head pruned to the first 256 (output_vocab_size)
    "apertus1p5_text": {"head_dim": 16, "vocab_size": 300, "output_vocab_size": 256, "pad_token_id": 0,
                        "bos_token_id": 1, "eos_token_id": 2},
    # Granite's multipliers (the logits times logits_scaling) with an RMSNorm after attention and the MLP
    "hyperclovax": {"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                    "logits_scaling": 2.5, "pad_token_id": 0},
    # Granite's multipliers in Granite 4's model: its own MLP width and names, gate and up stored as one; a Mamba-2
    # mixer (4.0-H's), then attention: 8 heads of 16 in 2 groups (a state of 16 each), a convolution of 4 with a bias
    "granitemoehybrid": {"embedding_multiplier": 3.0, "attention_multiplier": 0.2, "residual_multiplier": 0.5,
                         "logits_scaling": 2.5, "layer_types": ["mamba", "attention"], "num_local_experts": 0,
                         "position_embedding_type": "rope", "shared_intermediate_size": 96, "pad_token_id": 0,
                         "mamba_n_heads": 8, "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4},
    # Bamba: Granite 4.0-H's Mamba-2 mixer (two heads to each of 4 groups) at layer 1, Llama's attention (half of
    # each head rotated) at layer 0; its own norm and MLP names
    "bamba": {"attn_layer_indices": [0], "mamba_n_heads": 8, "mamba_n_groups": 4, "mamba_d_head": 16,
              "mamba_d_state": 16, "mamba_d_conv": 3, "pad_token_id": 0},
    # q/k/v biases, fused gate/up, a quarter of each head rotated in interleaved pairs
    "glm": {"partial_rotary_factor": 0.25, "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # GLM's pieces with its two post-norms
    "glm4": {"partial_rotary_factor": 0.25, "head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # the whole head rotated in interleaved pairs
    "ernie4_5": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "helium": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "internlm3": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Llama under its own model_type
    "iquestcoder": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # q/k/v biases (its default attention_bias), o_proj without one
    "seed_oss": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # an MLP without a gate: relu(up(x))^2
    "arcee": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # LayerNorm (1 + w) with a bias, Arcee's MLP, half of each head rotated (its default)
    "nemotron": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # LayerNorm with a bias, q/k/v biases, a quarter of each head rotated (its default)
    "stablelm": {"use_qkv_bias": True, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # LayerNorms with a bias, an MLP without a gate, biases on every linear
    "jais2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # LayerNorms with a bias, biases on every linear, an MLP without a gate under GPT-2's names, sliding
    "starcoder2": {"sliding_window": 5, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # LayerNorms without a bias, attention and MLP on one norm, interleaved RoPE, logits times logit_scale
    "cohere": {"logit_scale": 0.25, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Cohere's block, layer 0 sliding, layer 1 full and without RoPE
    "cohere2": {"logit_scale": 0.25, "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"],
                "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Llama saved under EXAONE 3's own tensor names (transformer.h.0.attn.attention.q_proj, ...)
    "exaone": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # per-head q/k norms after RoPE; NTK alpha stretching the RoPE base (Hunyuan's 1000 at head_dim 128)
    "hunyuan_v1_dense": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
                         "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "alpha": 1000.0,
                                             "factor": 1.0}},
    # weightless RMSNorms (the embeddings normed too), q/k norms after a RoPE that turns the other way, an
    # MLP without a gate (relu(fc1(x))^2), a soft-capped head (its default 15)
    "nanochat": {"head_dim": 16, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # layer 0 a gated short convolution, layer 1 attention with per-head q/k norms, its own names; the MLP
    # width adjusted (2/3 of 128, rounded up to 32: 96)
    "lfm2": {"layer_types": ["conv", "full_attention"], "block_multiple_of": 32, "head_dim": 16},
    # LFM2's short convolution (layer 0), then attention layers with gated heads, sandwich norms, q/k norms: layer 1
    # sliding, layer 2 full with half of each head's pairs turning ("proportional" RoPE: its default)
    "lfm3": {"layer_types": ["conv", "sliding_attention", "full_attention"], "num_hidden_layers": 3, "head_dim": 16,
             "sliding_window": 5, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # AFMoE: layer 0 a dense MLP, layers 1 and 2 experts chosen by a sigmoid router with expert biases, weights
    # renormalized and scaled, beside a shared expert; attention with q/k norms and its output gated value by
    # value, layers 0 and 1 sliding, layer 2 full without RoPE (every 3rd); sandwich norms; scaled embeddings
    "afmoe": {"num_hidden_layers": 3, "num_dense_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
              "moe_intermediate_size": 64, "num_shared_experts": 1, "route_scale": 1.5, "head_dim": 16,
              "sliding_window": 5, "global_attn_every_n_layers": 3, "mup_enabled": True, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2},
    # Qwen3.5: layer 0 a gated delta net (2 key heads of 8, 4 value heads of 16: two to a key head), layer 1
    # attention with its output gated (in q_proj), q/k norms, a quarter of each head rotated (its default); (1 + w)
    # norms
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"], "head_dim": 16, "linear_num_key_heads": 2,
                     "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 16,
                     "linear_conv_kernel_dim": 4, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Qwen3.5 MoE: Qwen3.5's layers (a delta net, then attention), each MLP 2 of 4 experts a token, renormalized,
    # beside a shared expert gated by a sigmoid
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"], "head_dim": 16,
                         "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 8,
                         "linear_value_head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                         "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96, "pad_token_id": 0,
                         "bos_token_id": 1, "eos_token_id": 2},
    # LayerNorms without a weight or a bias; q, k and v clamped (small enough to bite: OLMo 7B 0424's is 8)
    "olmo": {"clip_qkv": 0.1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # no pre-norms, post-norms, q/k norms over all heads
    "olmo2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # OLMo 2's block, layer 0 sliding, a RoPE base per layer type
    "olmo3": {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"], "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2,
              "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "default", "rope_theta": 500000.0}}},
    # OLMo 2's block with per-head q/k norms; layer 0 sliding, layer 1 full and without RoPE
    "exaone4": {"head_dim": 16, "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"],
                "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # layer 1 without RoPE (no_rope_layers from the interval) and sliding (the layers without RoPE)
    "smollm3": {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": 5, "pad_token_id": 0,
                "bos_token_id": 1, "eos_token_id": 2},
    # Gemma 1: (1 + w) norms, scaled embeddings, gelu_tanh, no post-norms
    "gemma": {"head_dim": 16},
    # layer 0 sliding, layer 1 full, as its layer_types lists them
    "ministral": {"head_dim": 16, "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"],
                  "pad_token_id": 0},
    # every other layer sliding (no layer_types: the family's rule), soft-caps small enough to bend
    "gemma2": {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.5,
               "final_logit_softcapping": 0.5},
    # Gemma 2's block without its post-norms
    "vaultgemma": {"head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 16, "attn_logit_softcapping": 0.5,
                   "final_logit_softcapping": 0.5},
    # attention and an MLP without a gate (exact GELU) side by side, each on its own LayerNorm; q, k and v
    # fused head by head; biases everywhere; a quarter of each head rotated (its default); no GQA (its
    # model ignores num_key_value_heads)
    "gpt_neox": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # learned positions, multi-query attention (its default), q/k/v fused, an MLP without a gate (4 x hidden
    # wide: its n_inner null), biases everywhere, LayerNorms with a bias, under GPT-2's names
    "gpt_bigcode": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # StarCoder 1's block with multi-head attention and GPT-2's Conv1D linears (weights [in, out])
    "gpt2": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # learned positions, layer 0 global and layer 1 local (a window of 5), scores not scaled, q/k/v without biases
    "gpt_neo": {"window_size": 5, "attention_types": [[["global", "local"], 1]], "pad_token_id": 0, "bos_token_id": 1,
                "eos_token_id": 2},
    # attention and an MLP without a gate side by side on one LayerNorm, 8 of each head's 16 dimensions rotated
    # in interleaved pairs, biases on the head and the MLP, none on attention
    "gptj": {"rotary_dim": 8, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # learned positions from row 2 on, a ReLU MLP without a gate whose linears are the block's own, biases
    # everywhere, LayerNorms with a bias, under its own names
    "opt": {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "ffn_dim": 128},
    # mixtures of experts: 2 of 4 a token. Qwen3-MoE: layer 1 a dense MLP (mlp_only_layers), the chosen
    # experts' weights not renormalized (its norm_topk_prob false)
    "qwen3_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "mlp_only_layers": [1], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # q/k/v biases, a shared expert (96 wide) on every token gated by a sigmoid, layer 1 a dense MLP
    "qwen2_moe": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 96, "mlp_only_layers": [1], "pad_token_id": 0, "bos_token_id": 1,
                  "eos_token_id": 2},
    # q/k norms over all heads, experts not renormalized
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64, "pad_token_id": 0,
              "bos_token_id": 1, "eos_token_id": 2},
    # Mellum: Qwen3-MoE's block, layer 0 sliding (its own RoPE base) with a dense MLP, layer 1 full with experts
    "mellum": {"head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
               "sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"],
               "mlp_layer_types": ["dense", "sparse"], "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # renormalized; every layer sliding
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 5, "pad_token_id": 0},
    # LFM2-MoE: layer 0 a short convolution with a dense MLP (num_dense_layers), layers 1 (attention) and 2 (a
    # short convolution) with experts, chosen by a sigmoid router with expert biases, weights scaled
    "lfm2_moe": {"layer_types": ["conv", "full_attention", "conv"], "num_hidden_layers": 3, "num_dense_layers": 1,
                 "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 16,
                 "routed_scaling_factor": 1.5},
    # gpt-oss: clamped SwiGLU experts with biases, its router's logits biased; attention with biases and sinks, layer
    # 0 sliding; YaRN
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16, "sliding_window": 5,
                "layer_types": ["sliding_attention", "full_attention"], "swiglu_limit": 0.5,
                "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False, "rope_theta": 150000.0}},
    # renormalized, Granite's multipliers, its experts' names (block_sparse_moe, router)
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 3.0,
                   "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.5, "pad_token_id": 0},
    # ERNIE 4.5 MoE: layer 0 a dense MLP, layer 1 experts chosen with a bias added to their softmax
    # probabilities (moe_statics), renormalized, and a shared expert one expert wide; RoPE on interleaved pairs
    "ernie4_5_moe": {"head_dim": 16, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 64,
                     "moe_num_shared_experts": 1, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    # Granite 3 MoE's experts with Granite SWA's attention: sinks, layer 1 sliding, layer 0 without RoPE; its
    # shared_mlp beside the experts
    "granitemoe_swa": {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 3.0,
                       "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.5,
                       "sliding_window": 5, "layer_rope_theta": [0, 500.0], "pad_token_id": 0,
                       "shared_intermediate_size": 48},
    # Granite 3 MoE with a shared_mlp beside the experts
    "granitemoeshared": {"num_local_experts": 4, "num_experts_per_tok": 2, "embedding_multiplier": 3.0,
                         "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.5,
                         "pad_token_id": 0, "shared_intermediate_size": 48},
    # Granite 4.0-H tiny and small (the tests' name; model_type granitemoehybrid): its Mamba-2 mixer, then attention
    # without RoPE (as its configs: nope), each before Granite 3 MoE's experts (32 wide) and a shared_mlp
    "granitemoehybrid_moe": {"model_type": "granitemoehybrid", "embedding_multiplier": 3.0,
                             "attention_multiplier": 0.2, "residual_multiplier": 0.5, "logits_scaling": 2.5,
                             "layer_types": ["mamba", "attention"], "num_local_experts": 4, "num_experts_per_tok": 2,
                             "intermediate_size": 32, "position_embedding_type": "nope",
                             "shared_intermediate_size": 48, "pad_token_id": 0, "mamba_n_heads": 8,
                             "mamba_n_groups": 2, "mamba_d_state": 16, "mamba_d_conv": 4},
    # fused q/k/v and gate/up; half of each head rotated (Phi-4-mini: 0.75); LongRoPE: longrope()
    "phi3": {"sliding_window": 5, "partial_rotary_factor": 0.5, "pad_token_id": 0, "bos_token_id": 1,
             "eos_token_id": 2},
}


def longrope(head_dim: int, original: int, rotary: float = 0.5) -> dict:
    """A tiny Phi-3's LongRoPE overrides: its short and long factors (one per turning pair) and
    original context (set beside rope_parameters: Phi-3's config takes that one)."""
    pairs = int(head_dim * rotary) // 2
    return {"original_max_position_embeddings": original,
            "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                "short_factor": np.linspace(1.0, 3.5, pairs).tolist(),
                                "long_factor": np.linspace(1.5, 8.0, pairs).tolist()}}


def tiny_checkpoint(root: Path, model_type: str, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """float HF dir -> RTN g32 AWQ checkpoint in root/ckpt; norms and biases randomized so
    that every family-specific piece (q/k norm, (1 + w), qkv bias) changes the logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from awq_edge.families import family_for
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    torch.manual_seed(seed)
    extra = dict(TINY_EXTRA[model_type])
    model_type = extra.pop("model_type", model_type)  # (a name of the tests': Granite 4.0-H's with experts)
    config = AutoConfig.for_model(model_type, **{**TINY, **extra, **overrides})
    model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".linear_attn.norm.weight"):  # (Qwen3.5's gated norm: a weight, not 1 + w)
                p.normal_(mean=1.0, std=0.2)
            elif "norm" in name:
                p.normal_(mean=0.0 if family_for(model_type).norm_offset else 1.0, std=0.2)
            elif name.endswith((".bias", "_bias")) or ".act_fn." in name:  # (xIELU's parameters; gpt-oss's experts')
                p.normal_(std=0.5)
            elif name.endswith(".sinks"):  # (gpt-oss's: large enough to take a share of each softmax)
                p.normal_(mean=2.0, std=1.0)
            elif name.endswith("shared_expert_gate.weight"):  # (Qwen2-MoE's: a gate that varies by token)
                p.normal_(std=1.0)
            elif ".shared_expert." in name or ".shared_mlp." in name:  # (Qwen2-MoE's, Granite's shared expert: loud
                # enough to tell in the logits)
                p.normal_(std=0.1)
            elif name.endswith((".g_proj.weight", ".self_attn.gate_proj.weight")):  # (LFM3's, AFMoE's gates: open
                # and shut by token and head or value)
                p.normal_(std=1.0)
            elif name.endswith(".conv.conv.weight"):  # (LFM2's short convolutions: taps that tell their order)
                p.normal_(std=1.0)
            elif name.endswith(("wpe.weight", "embed_positions.weight")):  # (learned positions: rows that tell apart)
                p.normal_(std=1.0)
            elif name.endswith(".expert_bias"):  # (AFMoE's, a parameter: which experts a token chooses)
                p.normal_(std=0.5)
        for name, buffer in model.named_buffers():
            if name.endswith(".expert_bias"):  # (LFM2-MoE's: which experts a token chooses)
                buffer.normal_(std=0.5)
    float_dir = root / "float"
    model.save_pretrained(float_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the quantizer loads a tokenizer
        shutil.copy(Path(tokenizer_dir) / name, float_dir / name)
    ckpt = root / "ckpt"
    quantize_checkpoint(str(float_dir), ckpt, QuantizeSettings(method="rtn", group_size=32), progress=False)
    return ckpt


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|: the acceptance metric (b = reference)."""
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@contextlib.contextmanager
def torch_one_thread():
    """Run torch on one thread: on the shared 2-core machine, torch's 2 OpenMP threads next to
    another busy process made a SmolLM2 forward 25x slower (5.5 s vs 0.2 s for 60 tokens)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_logits(model, ids: list[int]) -> np.ndarray:
    """Logits [len(ids), vocab] of the torch reference, one full causal forward."""
    import torch

    with torch.no_grad(), torch_one_thread():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def run_backend(export_dir: Path, ids: list[int], prompt_len: int, max_context: int = 128) -> np.ndarray:
    """Prefill ids[:prompt_len], then feed the rest one at a time; logits [1 + rest, vocab]."""
    from awq_edge.backend_ort import OrtBackend

    backend = OrtBackend(export_dir, max_context=max_context)
    out = [backend.forward(ids[:prompt_len])]
    for token in ids[prompt_len:]:
        out.append(backend.forward([token]))
    return np.stack(out)


def check_against_reference(export_dir: Path, ref_model, ids: list[int], prompt_len: int, tol: float) -> float:
    ref = reference_logits(ref_model, ids)[prompt_len - 1:]
    got = run_backend(export_dir, ids, prompt_len)
    errs = [rel_err(g, r) for g, r in zip(got, ref)]
    assert max(errs) < tol, f"max rel err {max(errs):.2e} (prefill {errs[0]:.2e}) over {len(errs)} steps"
    return max(errs)


def export_for_cpu(ckpt: Path, out: Path, target: str, **kwargs) -> Path:
    """Export; a trt export is rewritten by the CPU stand-in so ORT can run it."""
    from awq_edge.export import export_checkpoint
    from awq_edge.export.cpu_standin import standin_dir

    if target == "ort":  # exact mode: float lm_head, fp32 MatMulNBits compute
        kwargs = {"lm_head_bits": None, "accuracy_level": 0, **kwargs}
    path = export_checkpoint(ckpt, out / target, target, **kwargs)
    return standin_dir(path, out / f"{target}-cpu") if target == "trt" else path
