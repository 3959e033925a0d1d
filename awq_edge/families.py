"""The model family table: what the quantizer and the exporter need to know per architecture.

All supported families use the Hugging Face Llama module names inside a decoder
block (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm), or store
some of those fused (Phi-3's qkv_proj, gate_up_proj) and are read split; what
differs is written here. Adding a family is one entry, when its block has this shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True, eq=False)  # one object per family: compared and hashed by identity
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    mlp_norm: str = "post_attention_layernorm"  # the norm right before gate/up
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + w) RMSNorm
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma3)
    sandwich_norm: bool = False  # extra norms after attention and MLP (Gemma3)
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    activation: str = "silu"  # gate activation: silu | gelu_tanh
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    # which layers slide when config.json has no layer_types (older configs), as transformers decides:
    # "none"; "all" (Mistral: every layer when sliding_window is set); "qwen" (only with
    # use_sliding_window, from layer max_window_layers on); "gemma" (all but every
    # sliding_window_pattern-th, 6 unless the config says); "alternate" (Gemma 2: layers 0, 2, 4, ...);
    # "nope" (SmolLM3: only with use_sliding_window, the layers without RoPE)
    sliding_layers: str = "none"
    # what transformers' config class takes for a key config.json leaves out, where that is not the
    # generic default export.spec assumes (head_dim hidden / heads, no window, untied, RoPE base 1e4)
    config_defaults: tuple = ()
    # linears the family's checkpoints store fused, each as (its name, the names of its parts, whose
    # rows it stacks in order): read_checkpoint's callers split them, write_checkpoint fuses them again
    fused_linears: tuple = ()
    rope_aliases: tuple = ()  # (older name, RoPE type) pairs of the family's configs
    # Ministral 3: past the RoPE's original_max_position_embeddings transformers scales the queries
    # by 1 + llama_4_scaling_beta * ln(1 + floor(position / original)), which the engines do not:
    # their context ends there (export.spec.model_spec)
    llama4_query_scaling: bool = False
    # SmolLM3: the layers its no_rope_layers marks 0 do not rotate q and k (every
    # no_rope_layer_interval-th, 4, where it lists none)
    nope_layers: bool = False
    # Granite: embedding_multiplier, attention_multiplier (the score scale), residual_multiplier (on
    # each attention and MLP output before its residual add) and logits_scaling (the logits divided)
    multipliers: bool = False
    rope_interleaved: bool = False  # GLM: RoPE turns the pairs (2i, 2i + 1), not (i, i + rotary_dim / 2)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",), config_defaults=(("max_position_embeddings", 2048),)),
        Family("mistral", ("mistral",), sliding_layers="all",
               config_defaults=(("max_position_embeddings", 131072), ("sliding_window", 4096),
                                ("num_key_value_heads", 8))),
        Family("qwen2", ("qwen2",), qkv_bias=True, sliding_layers="qwen",
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 32))),
        Family("qwen3", ("qwen3",), qk_norm=True, sliding_layers="qwen",
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 32), ("head_dim", 128))),
        Family("gemma3", ("gemma3_text",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
               qk_norm=True, sandwich_norm=True, embed_scale=True, activation="gelu_tanh",
               sliding_layers="gemma",
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 4), ("head_dim", 256),
                                ("sliding_window", 4096), ("tie_word_embeddings", True),
                                ("query_pre_attn_scalar", 256), ("rope_theta", 1e6),
                                ("rope_local_base_freq", 10000.0))),
        # Ministral 3 (3B, 8B, 14B; the language model of their vision-language checkpoints): Mistral
        # with YaRN, queries scaled past the original context
        Family("ministral3", ("ministral3",), sliding_layers="all", llama4_query_scaling=True,
               config_defaults=(("max_position_embeddings", 262144), ("num_key_value_heads", 8), ("head_dim", 128),
                                ("rms_norm_eps", 1e-5),
                                ("rope_parameters", {"type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                                                     "original_max_position_embeddings": 16384, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0,
                                                     "llama_4_scaling_beta": 0.1}))),
        # Granite 3 (2B, 8B): Llama with four multipliers
        Family("granite", ("granite",), multipliers=True, config_defaults=(("max_position_embeddings", 2048),)),
        # GLM-Edge (1.5B, 4B) and GLM-4-9B-0414's predecessors: q/k/v bias, fused gate/up, half of
        # each head rotated in interleaved pairs
        Family("glm", ("glm",), qkv_bias=True, rope_interleaved=True,
               fused_linears=(("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj")),),
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 2), ("head_dim", 128),
                                ("rms_norm_eps", 1.5625e-07), ("partial_rotary_factor", 0.5))),
        # SmolLM3: Llama with every 4th layer without RoPE
        Family("smollm3", ("smollm3",), nope_layers=True, sliding_layers="nope",
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 4),
                                ("tie_word_embeddings", True), ("rope_theta", 2e6))),
        # Gemma 2 (2B, 9B, 27B): Gemma 3 without the q/k norms, with soft-capped scores and logits,
        # every other layer sliding, one RoPE base
        Family("gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
               sandwich_norm=True, embed_scale=True, activation="gelu_tanh", sliding_layers="alternate",
               config_defaults=(("max_position_embeddings", 8192), ("num_key_value_heads", 4), ("head_dim", 256),
                                ("sliding_window", 4096), ("tie_word_embeddings", True),
                                ("query_pre_attn_scalar", 256), ("attn_logit_softcapping", 50.0),
                                ("final_logit_softcapping", 30.0))),
        # Phi-3, 3.5 and 4-mini: fused q/k/v and gate/up, partial rotary (4-mini), LongRoPE (the long-context ones)
        Family("phi3", ("phi3",), sliding_layers="all",
               fused_linears=(("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))),
               rope_aliases=(("su", "longrope"), ("yarn", "longrope")),
               config_defaults=(("rms_norm_eps", 1e-5), ("original_max_position_embeddings", 4096))),
    )
}

SUPPORTED_TYPES = frozenset(t for f in FAMILIES.values() for t in f.model_types)
SUPPORTED = ", ".join(sorted(SUPPORTED_TYPES))


def family_for(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UserError(f"model type {model_type!r} is not supported; supported model types: {SUPPORTED}")
