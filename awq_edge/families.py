"""The model family table: what the quantizer and the exporter need to know per architecture.

All supported families use the Hugging Face Llama module names inside a decoder
block (self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm), or name them
otherwise and are read under those (StarCoder 2's mlp.c_fc: module_renames), or store
some of those fused (Phi-3's qkv_proj, gate_up_proj) and are read split, or have no gate
(Arcee's MLP: up_proj, the activation, down_proj); what differs is written here. Adding a
family is one entry, when its block has this shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass(frozen=True, eq=False)  # one object per family: compared and hashed by identity
class Family:
    name: str
    model_types: tuple[str, ...]  # config.json "model_type" values
    mlp_norm: str = "post_attention_layernorm"  # the norm right before gate/up
    # False: no norm before q/k/v (input_layernorm) nor before gate/up; the block's input goes to
    # them as it is (OLMo 2's post-norm block: its norms are post_norms only)
    pre_norms: bool = True
    norm_offset: float = 0.0  # 1.0 for Gemma's (1 + w) RMSNorm, Nemotron's (1 + w) LayerNorm
    # "rms": RMSNorm, x / rms(x) * w; "layer": LayerNorm with a bias, (x - mean) / std * w + b
    # (Nemotron, StableLM, Cohere: the pre-norms and the final norm; no family has q/k or post-norms with it)
    norm: str = "rms"
    norm_bias: bool = True  # a LayerNorm's bias is stored (Cohere's has none: the engines add zeros)
    norm_weight: bool = True  # a norm's weight is stored (OLMo 1's LayerNorms have none: the engines add ones)
    # Cohere: attention and the MLP both read the input norm's output (no norm before the MLP), and
    # h + attention + MLP is the block's output
    parallel_block: bool = False
    # GPT-NeoX: the config switch (use_parallel_residual, on unless false) that puts attention and the MLP
    # side by side, each reading the block's input through its own norm: h + attention(norm1(h)) +
    # MLP(norm2(h)); off, the usual block (export.spec.ModelSpec.parallel_norms)
    parallel_norms_switch: str = ""
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3, Gemma3)
    qk_norm_whole: bool = False  # OLMo 2: the q and k norms span the whole projection (all heads), not one head
    qk_norms: tuple = ("self_attn.q_norm", "self_attn.k_norm")  # their names in a block
    qk_norm_after_rope: bool = False  # Hunyuan: the q/k norms see q and k rotated (everyone else's: before RoPE)
    # the norms on the attention's and the MLP's outputs, before their residual adds, by name (Gemma's
    # "sandwich"; GLM-4's): none, or (after attention, after the MLP)
    post_norms: tuple = ()
    embed_scale: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    embed_scale_switch: str = ""  # the config switch that does so where it is true (AFMoE's mup_enabled)
    # the MLP's activation: silu | gelu_tanh | gelu (exact, with erf: GPT-NeoX's) | relu2 (relu(x)^2) | relu
    # (OPT's) | xielu (Apertus's: two learned parameters a layer)
    activation: str = "silu"
    gated_mlp: bool = True  # down(act(gate(x)) * up(x)); False: down(act(up(x))), no gate_proj (Arcee)
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    # which layers slide when config.json has no layer_types (older configs), as transformers decides:
    # "none"; "all" (Mistral: every layer when sliding_window is set); "qwen" (only with
    # use_sliding_window, from layer max_window_layers on); "gemma" (all but every
    # sliding_window_pattern-th, 6 unless the config says); "alternate" (Gemma 2: layers 0, 2, 4, ...);
    # "nope" (SmolLM3: only with use_sliding_window, the layers without RoPE); "mamba" (Granite 4: none
    # is attention, transformers makes every layer Mamba, which the engines refuse); "gpt_neo" (its
    # attention_layers, global or local, or its attention_types expanded: [[["global", "local"], 12]]);
    # "fourth" (CWM, Granite SWA: layers 0, 4, 8, ... full, the others slide); "lfm3" (layers 2, 6, 10, ...
    # full, 4, 8, 12, ... sliding, the others short convolutions); "afmoe" (every global_attn_every_n_layers-th
    # full, 4 unless the config says, the others sliding, whether or not a sliding_window is set);
    # "attn_layer_indices" (Bamba: the layers it lists attention, the others Mamba)
    sliding_layers: str = "none"
    # what transformers' config class takes for a key config.json leaves out, where that is not the
    # generic default export.spec assumes (head_dim hidden / heads, no window, untied, RoPE base 1e4)
    config_defaults: tuple = ()
    # linears the family's checkpoints store fused, each as (its name, the names of its parts, whose
    # rows it stacks in order): read_checkpoint's callers split them, write_checkpoint fuses them again
    fused_linears: tuple = ()
    # GPT-2, StarCoder 1, OPT: positions by a learned table (model.embed_positions) added to the
    # embeddings, not RoPE; its row for position p is p + this offset (OPT's 2). -1: RoPE
    learned_positions: int = -1
    # GPT-2, StarCoder 1: the MLP's width where config.json gives none (their n_inner null), in hiddens
    mlp_width_default: int = 0
    # StarCoder 1: the config switch (multi_query, on unless false) for one KV head; off, as many as query heads
    multi_query: str = ""
    # GPT-2: its linears are transformers' Conv1D, whose weights are stored [in, out]: the quantizer reads
    # them as nn.Linear (model.linears_from_conv1d), the torch reference writes them back transposed
    conv1d_linears: bool = False
    # OPT: the MLP's linears (fc1, fc2) are the block's own modules, in no mlp module: the quantizer adds one
    # (model.add_block_mlp), into which module_renames move them (.fc1. -> .mlp.up_proj.)
    mlp_in_block: bool = False
    # GPT-Neo: q . k is not divided by sqrt(head_dim) (a score scale of 1)
    unscaled_scores: bool = False
    # GPT-Neo, Bamba: its transformers block returns a tuple (hidden states first), which its model indexes or
    # unpacks; the quantizer's pass-through blocks return one too (quantize.capture_block_inputs)
    block_returns_tuple: bool = False
    # GPT-J: the config key that gives how many of a head's dimensions rotate (its rotary_dim), not a fraction
    rotary_dim_key: str = ""
    # where the decoder blocks are under the transformers model's base model (Llama's model.layers;
    # GPT-2's transformer.h: "h"); our names are model.layers.{i} whatever it is (model.decoder_layers)
    layers_path: str = "layers"
    # GPT-NeoX, StarCoder 1: its fused linears stack their parts head by head (q, k, v of head 0, then
    # of head 1, ...), not part by part, where each part has every head (StarCoder 1's multi-query
    # attention, one KV head, stacks q, k, v one after another; export.spec.fused_part_rows)
    fused_by_head: bool = False
    rope_aliases: tuple = ()  # (older name, RoPE type) pairs of the family's configs
    # Ministral 3: past the RoPE's original_max_position_embeddings transformers scales the queries
    # by 1 + llama_4_scaling_beta * ln(1 + floor(position / original)), which the engines do not:
    # their context ends there (export.spec.model_spec)
    llama4_query_scaling: bool = False
    # layers that do not rotate q and k: "listed" (SmolLM3: those its no_rope_layers marks 0, every
    # no_rope_layer_interval-th, 4, where it lists none); "full" (EXAONE 4: the full-attention
    # layers, when config.json sets a sliding_window); "full_layers" (AFMoE: the full-attention layers);
    # "unless_rope" (Granite 4: every layer, unless position_embedding_type is "rope"); "" (none)
    nope_layers: str = ""
    # Granite SWA: the config key listing each layer's RoPE base (0: that layer does not rotate), which
    # replaces rope_theta layer by layer where config.json sets it; "" (none)
    layer_rope_theta: str = ""
    # Granite: embedding_multiplier, attention_multiplier (the score scale), residual_multiplier (on
    # each attention and MLP output before its residual add) and logits_scaling (the logits divided)
    multipliers: bool = False
    # the config key whose value multiplies the logits: Cohere's logit_scale, HyperCLOVA X's logits_scaling
    # (Granite's logits_scaling divides them); "" (none)
    logit_scale: str = ""
    head_bias: bool = False  # Phi: the lm_head has a bias (lm_head.bias, [vocab]) added to the logits
    # Apertus 1.5: the config key of the head's rows where its head is pruned to the vocabulary's first ids
    # (output_vocab_size): the engines' vocabulary, the embedding cut to it (the ids past it, image and audio
    # tokens, are input only and never in text); "" (none)
    head_vocab_key: str = ""
    rope_interleaved: bool = False  # GLM: RoPE turns the pairs (2i, 2i + 1), not (i, i + rotary_dim / 2)
    # nanochat: RoPE turns each pair the other way (its rotate_half is (x2, -x1)), which is the usual turn
    # of the pair's two dimensions swapped (export.spec.rotary_order)
    rope_reversed: bool = False
    # nanochat: the embeddings go through the final norm before the first layer (one weightless RMSNorm
    # module for both); the engines' copy of that norm is `model.embed_norm`
    embed_norm: bool = False
    # LFM2: the layers its layer_types names "conv" (all but full_attn_idxs' in older configs) are gated
    # short convolutions, not attention: out_proj(C * conv(B * x)), B, C and x from one in_proj, conv a
    # causal depthwise convolution over the last conv_L_cache tokens (export.spec.ModelSpec.conv_layers)
    short_conv: bool = False
    # LFM2: the MLP's width is intermediate_size as transformers' Lfm2MLP adjusts it (block_auto_adjust_ff_dim:
    # 2/3 of it, times block_ffn_dim_multiplier, rounded up to block_multiple_of)
    ff_dim_adjusted: bool = False
    # OLMo 1 (7B 0424, 0724): q, k and v clamped to +-clip_qkv where config.json sets it
    clip_qkv: bool = False
    # a family's own config.json keys, as (theirs, transformers'): read as the second where it lacks that
    config_aliases: tuple = ()
    # keys the family's model reads in place of transformers' usual one, as (theirs, the usual): read as the
    # second whatever that says (Granite 4's MLP width is its shared_intermediate_size)
    config_replaced: tuple = ()
    # a family's own tensor names in its checkpoints, as (a piece of theirs, transformers'), replaced in
    # this order (transformers renames them on load, conversion_mapping.py); checkpoints awq-edge writes
    # use transformers' names, which transformers reads as they are
    tensor_renames: tuple = ()
    # modules the family's transformers model names otherwise, as (a piece of its tensor names, ours), replaced
    # in this order after tensor_renames (Phi's self_attn.dense is our o_proj); pieces that begin with "."
    # name modules inside a block, which the quantizer renames in place (model.rename_block_modules);
    # checkpoints and transformers models get their names back (their_name)
    module_renames: tuple = ()
    # a mixture of experts (Qwen3-MoE, OLMoE, Mixtral, Granite 3 MoE, LFM2-MoE): the config key of the number
    # of experts ("": the family has none); each is a gated MLP expert_width_key wide, and a token runs the
    # num_experts_per_tok its router scores highest, weighted by their softmax probabilities, which
    # norm_top_k renormalizes over the chosen: the config key of that switch, or "always" (Mixtral's)
    experts_key: str = ""
    expert_width_key: str = "intermediate_size"
    norm_top_k: str = "always"
    # the layers with experts, the others a dense MLP: "all"; "qwen" (Qwen3-MoE: decoder_sparse_step and
    # mlp_only_layers say); "after_dense" (LFM2-MoE: all but the first num_dense_layers); "ernie" (ERNIE 4.5:
    # moe_layer_start_index to moe_layer_end_index, every moe_layer_interval-th); "listed" (Mellum: those its
    # mlp_layer_types names "sparse", the others "dense", all where it lists none)
    expert_layers: str = "all"
    # "softmax"; "sigmoid" (LFM2-MoE): each expert's weight the sigmoid of its logit, the chosen those whose
    # weight plus the layer's expert_bias (mlp.expert_bias, with use_expert_bias) is highest, their weights
    # times routed_scaling_factor after any renormalizing
    router: str = "softmax"
    # biases added to the scores a token's experts are chosen by, not to their weights: "" none;
    # "use_expert_bias" (LFM2-MoE: mlp.expert_bias [E], unless that config switch is false); "moe_statics"
    # (ERNIE 4.5: always, stored [1, E] as its router's moe_statics.e_score_correction_bias: our mlp.expert_bias)
    expert_bias: str = ""
    # gpt-oss: its router's logits have a bias (mlp.gate.bias); its experts' linears have biases, are stored
    # [E, hidden, 2 x width] with gate and up interleaved by column ("interleaved": transformers' GptOssExperts),
    # and compute clamped SwiGLU: (clamp(up, +-limit) + 1) * g * sigmoid(alpha g), g = min(gate, limit)
    # (swiglu_alpha, swiglu_limit), which no scale folds across (no down groups)
    router_bias: bool = False
    experts_layout: str = "stacked"
    expert_act: str = "silu"
    # gpt-oss, Granite SWA: each head's learned sink, a logit (self_attn.sinks [heads]) in the softmax's
    # denominator only (Granite SWA's output times sigmoid(logsumexp(scores) - sink): the same numbers)
    attention_sinks: bool = False
    # LFM3: the config switch (use_attention_gate, on unless false) of a gate on each head's output: the
    # attention's output for head j times sigmoid(self_attn.g_proj(x))[j], x the attention's normed input
    attention_gate: str = ""
    # AFMoE: the attention's output times sigmoid(self_attn.gate_proj(x)) value by value before o_proj, x the
    # attention's normed input; that gate a quantized linear [heads x head_dim, hidden], ours out_gate_proj
    output_gate: bool = False
    # Qwen3.5: that gate's rows stored in q_proj, each head's after its query's ([heads x 2 head_dim, hidden], as
    # transformers' model computes them): the quantizer keeps q_proj whole, the engines read it split
    # (checkpoint.split_fused: q_proj and out_gate_proj)
    query_gate: bool = False
    # the layers its layer_types names "linear_attention" (older configs: "mamba") keep a recurrent state in place
    # of a KV cache (linear_attn; export.spec.DeltaNet): "gated" (Qwen3.5's gated delta nets) or "mamba2"
    # (Granite 4.0-H's Mamba-2 mixers); "": none
    delta_net: str = ""
    # gpt-oss: its MLP returns (output, router scores), which its block unpacks; the quantizer's SparseMoe too
    moe_returns_tuple: bool = False
    # Qwen2-MoE: a shared expert beside the routed ones, on every token (mlp.shared_expert, a gated MLP as wide as
    # this config key says), its output times sigmoid(mlp.shared_expert_gate . x) with shared_expert_gate
    shared_expert_key: str = ""
    shared_expert_gate: bool = False
    # ERNIE 4.5 MoE: the config key of how many experts wide its shared expert is (one MLP, that many times
    # expert_width_key wide, moe_num_shared_experts), where shared_expert_key gives no width
    shared_experts_key: str = ""
    # Granite 4.0: the family that reads its configs with experts (num_local_experts above 0, or left out:
    # transformers' default is 8), whose MLP modules are named otherwise (find_family)
    with_experts: str = ""
    # config.json switches the engines do not compute, as (key, what it turns on): refused when set (true or
    # not 0, config_defaults' value where config.json has none)
    refused_switches: tuple = ()
    # config.json switches the engines need on, as (key, what turning it off leaves out): refused when false
    required_switches: tuple = ()
    # pieces of the names of tensors the family's checkpoints may hold that are no weights (GPT-NeoX's
    # causal-mask and RoPE buffers, which older transformers saved): never read
    ignored_tensors: tuple = ()
    # config.json keys the family's transformers model does not read (StableLM's head is always
    # hidden / heads, whatever head_dim says; OLMo 1's eps is always 1e-5): left out, config_defaults' taken
    config_ignored: tuple = ()

    def transformers_name(self, stored: str) -> str:
        """A tensor's name in a checkpoint -> the name transformers' module gives it."""
        for theirs, ours in self.tensor_renames:
            stored = stored.replace(theirs, ours, 1)
        return stored

    def ignored(self, stored: str) -> bool:
        """Whether a stored tensor is one of the family's buffers that hold no weights (ignored_tensors)."""
        return any(piece in stored for piece in self.ignored_tensors)

    def our_name(self, stored: str) -> str:
        """A tensor's name in a checkpoint -> the name the quantizer and the engines use (Llama's)."""
        stored = self.transformers_name(stored)
        for theirs, ours in self.module_renames:
            stored = stored.replace(theirs, ours, 1)
        return stored

    def their_name(self, ours: str) -> str:
        """The inverse of our_name's module renames: our tensor name -> transformers'."""
        for theirs, ours_piece in reversed(self.module_renames):
            ours = ours.replace(ours_piece, theirs, 1)
        return ours


GEMMA_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
FUSED_GATE_UP = ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))
FUSED_QKV = ("self_attn.qkv_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
FUSED_SHARED_GATE_UP = ("mlp.shared_expert.gate_up_proj", ("mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"))
# Granite's MoE blocks: experts and router under their names (block_sparse_moe, router), and the shared_mlp
# beside them (a gated MLP on every token, ungated; gate and up stored as one input_linear): our shared expert
GRANITE_MOE_NAMES = ((".block_sparse_moe.", ".mlp."), (".mlp.router.", ".mlp.gate."))
GRANITE_SHARED_MLP_NAMES = ((".shared_mlp.", ".mlp.shared_expert."),
                            (".mlp.shared_expert.input_linear.", ".mlp.shared_expert.gate_up_proj."),
                            (".mlp.shared_expert.output_linear.", ".mlp.shared_expert.down_proj."))
# a Mamba-2 mixer's in_proj: z, then x B C (what its convolution runs over), then dt (Family.delta_net "mamba2")
FUSED_MAMBA_IN = ("linear_attn.in_proj", ("linear_attn.in_proj_z", "linear_attn.in_proj_qkv", "linear_attn.in_proj_a"))
# the Mamba-2 mixers' config keys as transformers' classes default them (Granite 4.0-H's and Bamba's alike), and what
# the engines do not compute of them
MAMBA_DEFAULTS = (("mamba_n_heads", 128), ("mamba_n_groups", 1), ("mamba_d_state", 256), ("mamba_d_conv", 4),
                  ("mamba_expand", 2), ("mamba_conv_bias", True))
MAMBA_REFUSED = (("mamba_proj_bias", "biases on the Mamba mixers' in_proj and out_proj"),)
GLM_DEFAULTS = (("max_position_embeddings", 131072), ("num_key_value_heads", 2), ("head_dim", 128),
                ("rms_norm_eps", 1.5625e-07), ("partial_rotary_factor", 0.5))  # GLM's and GLM-4's
GEMMA2_DEFAULTS = (("max_position_embeddings", 8192), ("num_key_value_heads", 4), ("head_dim", 256),
                   ("sliding_window", 4096), ("tie_word_embeddings", True), ("query_pre_attn_scalar", 256),
                   ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0))  # Gemma 2's and VaultGemma's

# GPT-2's config keys (StarCoder 1's and GPT-J's too) and module names (StarCoder 1's too)
GPT2_CONFIG_NAMES = (("n_embd", "hidden_size"), ("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
                     ("n_inner", "intermediate_size"), ("n_positions", "max_position_embeddings"),
                     ("layer_norm_epsilon", "rms_norm_eps"), ("activation_function", "hidden_act"))
GPT2_MODULE_NAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.wpe.", "model.embed_positions."),
                     ("transformer.ln_f.", "model.norm."), ("transformer.h.", "model.layers."),
                     (".attn.", ".self_attn."), (".self_attn.c_attn.", ".self_attn.qkv_proj."),
                     (".self_attn.c_proj.", ".self_attn.o_proj."), (".mlp.c_fc.", ".mlp.up_proj."),
                     (".mlp.c_proj.", ".mlp.down_proj."), (".ln_1.", ".input_layernorm."),
                     (".ln_2.", ".post_attention_layernorm."))

# GPT-2's block (StarCoder 1's too): LayerNorms with a bias, an MLP without a gate (gelu_tanh, n_inner or
# 4 x hidden wide), learned positions, q/k/v fused, biases on every linear, its names (n_inner is the MLP's width:
# a config's intermediate_size is not read)
GPT2_BLOCK = dict(norm="layer", activation="gelu_tanh", gated_mlp=False, learned_positions=0, layers_path="h",
                  mlp_width_default=4, fused_linears=(FUSED_QKV,), config_aliases=GPT2_CONFIG_NAMES,
                  module_renames=GPT2_MODULE_NAMES, ignored_tensors=(".attn.bias", ".attn.masked_bias"),
                  config_ignored=("head_dim", "num_key_value_heads", "intermediate_size"),
                  required_switches=(("scale_attn_weights", "scores scaled by head_dim ** -0.5"),))

# LFM2's (LFM2-MoE's too): q/k norms, module names (feed_forward's w1, w3, w2 are gate, up, down), defaults
LFM2_QK_NORMS = ("self_attn.q_layernorm", "self_attn.k_layernorm")
LFM2_NAMES = ((".operator_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
              (".feed_forward.", ".mlp."), (".mlp.w1.", ".mlp.gate_proj."), (".mlp.w3.", ".mlp.up_proj."),
              (".mlp.w2.", ".mlp.down_proj."), (".self_attn.out_proj.", ".self_attn.o_proj."),
              ("model.embedding_norm.", "model.norm."))
LFM2_DEFAULTS = (("max_position_embeddings", 128000), ("num_key_value_heads", 8), ("rms_norm_eps", 1e-5),
                 ("tie_word_embeddings", True), ("rope_theta", 1000000.0))

# LFM3's: LFM2's names with Qwen3's attention (o_proj, q_norm, k_norm) and sandwich norms
LFM3_NAMES = tuple(pair for pair in LFM2_NAMES if pair[0] != ".self_attn.out_proj.")

# Apertus's (Apertus 1.5's too): xIELU MLP without a gate, q/k norms, its norms' names, Llama 3's RoPE scaling
APERTUS = dict(activation="xielu", gated_mlp=False, qk_norm=True,
               module_renames=((".attention_layernorm.", ".input_layernorm."),
                               (".feedforward_layernorm.", ".post_attention_layernorm.")),
               config_defaults=(("max_position_embeddings", 65536), ("rms_norm_eps", 1e-5),
                                ("rope_parameters", {"rope_type": "llama3", "rope_theta": 12000000.0, "factor": 8.0,
                                                     "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0})))

# Qwen3.5's (Qwen3.5 MoE's too): gated delta nets beside Qwen3's attention, its output gate stored in q_proj, (1 + w)
# norms; its MTP layer never read; text-only checkpoints that keep their vision-language one's prefix
# (model.language_model.*) read as a causal LM's names, as transformers reads them
QWEN3_5 = dict(qk_norm=True, norm_offset=1.0, output_gate=True, query_gate=True, delta_net="gated",
               refused_switches=(("attention_bias", "biases on q, k, v and o"),), ignored_tensors=("mtp.",),
               tensor_renames=(("model.language_model.", "model."),))
QWEN3_5_DEFAULTS = (("max_position_embeddings", 32768), ("head_dim", 256), ("partial_rotary_factor", 0.25),
                    ("linear_conv_kernel_dim", 4), ("linear_key_head_dim", 128), ("linear_value_head_dim", 128),
                    ("linear_num_key_heads", 16), ("linear_num_value_heads", 32))

GRANITE4 = dict(multipliers=True, nope_layers="unless_rope", sliding_layers="mamba", delta_net="mamba2",
                config_aliases=(("layers_block_type", "layer_types"),),  # (its configs' older name, as transformers')
                refused_switches=MAMBA_REFUSED)
GRANITE4_DEFAULTS = (("max_position_embeddings", 2048), ("shared_intermediate_size", 1024), ("num_local_experts", 8),
                     ("attention_multiplier", 1.0), *MAMBA_DEFAULTS)

COHERE_DEFAULTS = (("rms_norm_eps", 1e-5), ("tie_word_embeddings", True), ("logit_scale", 0.0625))

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("llama", ("llama",), config_defaults=(("max_position_embeddings", 2048),)),
        # Meta's Code World Model: Llama with layers 0, 4, 8, ... full and the rest sliding (8192 tokens), Llama
        # 3's RoPE scaling unless its config says
        Family("cwm", ("cwm",), sliding_layers="fourth",
               config_defaults=(("max_position_embeddings", 131072), ("sliding_window", 8192),
                                ("num_key_value_heads", 8), ("head_dim", 128), ("rms_norm_eps", 1e-5),
                                ("rope_parameters", {"rope_type": "llama3", "rope_theta": 1000000.0, "factor": 16.0,
                                                     "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                     "original_max_position_embeddings": 8192}))),
        Family("mistral", ("mistral",), sliding_layers="all",
               config_defaults=(("max_position_embeddings", 131072), ("sliding_window", 4096),
                                ("num_key_value_heads", 8))),
        Family("qwen2", ("qwen2",), qkv_bias=True, sliding_layers="qwen",
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 32))),
        Family("qwen3", ("qwen3",), qk_norm=True, sliding_layers="qwen",
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 32), ("head_dim", 128))),
        Family("gemma3", ("gemma3_text",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
               qk_norm=True, post_norms=GEMMA_POST_NORMS, embed_scale=True, activation="gelu_tanh",
               sliding_layers="gemma",
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 4), ("head_dim", 256),
                                ("sliding_window", 4096), ("tie_word_embeddings", True),
                                ("query_pre_attn_scalar", 256), ("rope_theta", 1e6),
                                ("rope_local_base_freq", 10000.0))),
        # Ministral 8B (2410): Mistral under its own model_type, its sliding layers as config.json lists them
        Family("ministral", ("ministral",), sliding_layers="all",
               config_defaults=(("max_position_embeddings", 131072), ("sliding_window", 4096),
                                ("num_key_value_heads", 8))),
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
        Family("granite", ("granite",), multipliers=True,
               config_defaults=(("max_position_embeddings", 2048), ("attention_multiplier", 1.0))),
        # Granite SWA: Granite's multipliers, layers 0, 4, 8, ... full and the rest sliding, a sink per head,
        # a RoPE base per layer (0: none)
        Family("granite_swa", ("granite_swa",), multipliers=True, sliding_layers="fourth", attention_sinks=True,
               layer_rope_theta="layer_rope_theta",
               config_defaults=(("max_position_embeddings", 8192), ("attention_multiplier", 1.0),
                                ("num_key_value_heads", 4), ("rms_norm_eps", 1e-5), ("tie_word_embeddings", True),
                                ("sliding_window", 128))),
        # HyperCLOVA X SEED: Granite's multipliers (but the logits times logits_scaling, the score scale
        # head_dim ** -0.5 unless set) with Peri-LN: an RMSNorm on each of the attention's and the MLP's outputs
        Family("hyperclovax", ("hyperclovax",), multipliers=True, logit_scale="logits_scaling",
               post_norms=("post_norm1", "post_norm2"), config_defaults=(("max_position_embeddings", 2048),),
               required_switches=(("use_post_norm", "HyperCLOVA X without its Peri-LN post-norms"),)),
        # GLM-Edge (1.5B, 4B) and GLM-4-9B-0414's predecessors: q/k/v bias, fused gate/up, half of
        # each head rotated in interleaved pairs
        Family("glm", ("glm",), qkv_bias=True, rope_interleaved=True, fused_linears=(FUSED_GATE_UP,),
               config_defaults=GLM_DEFAULTS),
        # GLM-4-0414 and GLM-Z1 (9B; 32B): GLM with a norm on the attention's and the MLP's outputs
        Family("glm4", ("glm4",), qkv_bias=True, rope_interleaved=True,
               post_norms=("post_self_attn_layernorm", "post_mlp_layernorm"), fused_linears=(FUSED_GATE_UP,),
               config_defaults=GLM_DEFAULTS),
        # ERNIE 4.5 (0.3B dense): Llama whose RoPE turns interleaved pairs of the whole head
        Family("ernie4_5", ("ernie4_5",), rope_interleaved=True,
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 2), ("head_dim", 128),
                                ("rms_norm_eps", 1e-5), ("tie_word_embeddings", True), ("rope_theta", 500000.0))),
        # ERNIE 4.5 MoE (21B-A3B, 300B-A47B): ERNIE 4.5's attention; 6 of 64 experts a token by their softmax
        # probabilities, chosen with a bias added (moe_statics), renormalized, from layer 1 on; a shared expert 2
        # experts wide; its multi-token-prediction layers (mtp_*) never read
        Family("ernie4_5_moe", ("ernie4_5_moe",), rope_interleaved=True, experts_key="moe_num_experts",
               expert_width_key="moe_intermediate_size", expert_layers="ernie", expert_bias="moe_statics",
               shared_experts_key="moe_num_shared_experts", config_aliases=(("moe_k", "num_experts_per_tok"),),
               tensor_renames=((".mlp.moe_statics.", ".mlp.gate.moe_statics."),),
               module_renames=((".mlp.shared_experts.", ".mlp.shared_expert."),
                               (".mlp.gate.moe_statics.e_score_correction_bias", ".mlp.expert_bias")),
               ignored_tensors=("mtp",),
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 4), ("rms_norm_eps", 1e-5),
                                ("tie_word_embeddings", True), ("rope_theta", 500000.0), ("moe_num_experts", 64),
                                ("num_experts_per_tok", 6), ("moe_intermediate_size", 1536),
                                ("moe_num_shared_experts", 2), ("moe_layer_start_index", 1),
                                ("moe_layer_interval", 1))),
        # Helium 1 (2B): Llama whose RoPE turns interleaved pairs
        Family("helium", ("helium",), rope_interleaved=True,
               config_defaults=(("max_position_embeddings", 4096), ("num_key_value_heads", 20), ("head_dim", 128),
                                ("rms_norm_eps", 1e-8), ("rope_theta", 100000.0))),
        # EXAONE 3.0 / 3.5 / Deep: Llama under GPT-2's names
        Family("exaone", ("exaone",),
               config_aliases=(("num_layers", "num_hidden_layers"), ("layer_norm_epsilon", "rms_norm_eps"),
                               ("activation_function", "hidden_act")),
               tensor_renames=(("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
                               ("transformer.ln_f.", "model.norm."),
                               (".attn.attention.out_proj.", ".self_attn.o_proj."), (".attn.attention.", ".self_attn."),
                               (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
                               (".mlp.c_fc_0.", ".mlp.gate_proj."), (".mlp.c_fc_1.", ".mlp.up_proj."),
                               (".mlp.c_proj.", ".mlp.down_proj.")),
               config_defaults=(("max_position_embeddings", 4096), ("num_key_value_heads", 8), ("rms_norm_eps", 1e-5),
                                ("rope_theta", 500000.0))),
        # Arcee (AFM-4.5B): Llama with an MLP without a gate, relu(up(x))^2
        Family("arcee", ("arcee",), activation="relu2", gated_mlp=False, config_defaults=(("rms_norm_eps", 1e-5),)),
        # Nemotron (Minitron 4B / 8B, Nemotron-Mini-4B): LayerNorm (1 + w) with a bias, Arcee's MLP,
        # half of each head rotated
        Family("nemotron", ("nemotron",), norm="layer", norm_offset=1.0, activation="relu2", gated_mlp=False,
               config_aliases=(("norm_eps", "rms_norm_eps"),),
               config_defaults=(("rms_norm_eps", 1e-5), ("partial_rotary_factor", 0.5))),
        # StableLM 2 (1.6B, Zephyr 1.6B): LayerNorm with a bias, a quarter of each head rotated, q/k/v
        # biases with use_qkv_bias
        Family("stablelm", ("stablelm",), norm="layer", config_aliases=(("layer_norm_eps", "rms_norm_eps"),),
               config_defaults=(("rms_norm_eps", 1e-5), ("partial_rotary_factor", 0.25), ("num_key_value_heads", 32)),
               refused_switches=(("use_parallel_residual", "attention and the MLP side by side (StableLM 2 12B)"),
                                 ("qk_layernorm", "LayerNorms on q's and k's heads (StableLM 2 12B)")),
               config_ignored=("head_dim",)),
        # Cohere (Command R, Aya 23 and Expanse 8B): LayerNorms without a bias, attention and the MLP
        # side by side on one norm, RoPE on interleaved pairs, logits times logit_scale
        Family("cohere", ("cohere",), norm="layer", norm_bias=False, parallel_block=True, rope_interleaved=True,
               logit_scale="logit_scale", config_aliases=(("layer_norm_eps", "rms_norm_eps"),),
               config_defaults=COHERE_DEFAULTS + (("max_position_embeddings", 8192), ("rope_theta", 500000.0)),
               refused_switches=(("use_qk_norm", "LayerNorms on q's and k's heads (Command R+)"),)),
        # Cohere 2 (Command R7B): Cohere's block, three of every four layers sliding, the full ones without RoPE
        Family("cohere2", ("cohere2",), norm="layer", norm_bias=False, parallel_block=True, rope_interleaved=True,
               logit_scale="logit_scale", sliding_layers="gemma", nope_layers="full",
               config_aliases=(("layer_norm_eps", "rms_norm_eps"),),
               config_defaults=COHERE_DEFAULTS + (("max_position_embeddings", 8192), ("sliding_window", 4096),
                                                  ("sliding_window_pattern", 4))),
        # Jais 2 (Arabic-English): LayerNorms with a bias, Arcee's MLP, biases on every linear
        Family("jais2", ("jais2",), norm="layer", activation="relu2", gated_mlp=False,
               config_aliases=(("layer_norm_eps", "rms_norm_eps"),),
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 8192))),
        # StarCoder 2 (3B, 7B, 15B): LayerNorms with a bias, biases on every linear, an MLP without a gate
        # under GPT-2's names (c_fc, gelu_tanh, c_proj), every layer sliding when a window is set
        Family("starcoder2", ("starcoder2",), norm="layer", activation="gelu_tanh", gated_mlp=False,
               sliding_layers="all", config_aliases=(("norm_epsilon", "rms_norm_eps"),),
               module_renames=((".mlp.c_fc.", ".mlp.up_proj."), (".mlp.c_proj.", ".mlp.down_proj.")),
               config_defaults=(("rms_norm_eps", 1e-5), ("num_key_value_heads", 2), ("tie_word_embeddings", True))),
        # Apertus (8B, 70B): an MLP without a gate whose activation, xIELU, has learned parameters in each
        # layer (mlp.act_fn.alpha_p, alpha_n, beta, eps), per-head q/k norms, its norms under their own
        # names
        Family("apertus", ("apertus",), **APERTUS),
        # Apertus 1.5's language model: Apertus with a vocabulary extended by image and audio tokens, its head
        # pruned to the text ids before them (output_vocab_size) where config.json says
        Family("apertus1p5", ("apertus1p5_text",), **APERTUS, head_vocab_key="output_vocab_size"),
        # Granite 4.0 (micro, 1B, 350M) and 4.0-H (H-micro, H-1B, H-350M): Granite 3's attention, without RoPE
        # unless position_embedding_type says so, and the layers layer_types names "mamba" Mamba-2 mixers (its
        # in_proj stacks z, x B C and dt: read as in_proj_z, in_proj_qkv and in_proj_a, dt float); no experts
        # (num_local_experts 0; granite4_moe reads the others); its MLP (shared_mlp) stores gate and up as one
        # input_linear
        Family("granite4", ("granitemoehybrid",), **GRANITE4, with_experts="granite4_moe",
               fused_linears=(FUSED_GATE_UP, FUSED_MAMBA_IN),
               module_renames=((".shared_mlp.", ".mlp."), (".mlp.input_linear.", ".mlp.gate_up_proj."),
                               (".mlp.output_linear.", ".mlp.down_proj."), (".mamba.", ".linear_attn.")),
               config_replaced=(("shared_intermediate_size", "intermediate_size"),),
               config_defaults=GRANITE4_DEFAULTS),
        # Granite 4.0-H tiny and small (granitemoehybrid with num_local_experts above 0): Granite 4.0-H whose MLPs
        # are Granite 3 MoE's experts (intermediate_size wide, renormalized) beside its shared_mlp, on every token
        Family("granite4_moe", (), **GRANITE4, experts_key="num_local_experts",
               shared_expert_key="shared_intermediate_size", fused_linears=(FUSED_SHARED_GATE_UP, FUSED_MAMBA_IN),
               module_renames=(*GRANITE_MOE_NAMES, *GRANITE_SHARED_MLP_NAMES, (".mamba.", ".linear_attn.")),
               config_defaults=(*GRANITE4_DEFAULTS, ("num_experts_per_tok", 2))),
        # Bamba (9B v1, v2): Llama's attention (half of each head rotated, whatever the config says: transformers
        # fixes it) at the layers attn_layer_indices lists, Granite 4.0-H's Mamba-2 mixers at the others; its MLP
        # feed_forward after pre_ff_layernorm, its final norm final_layernorm
        Family("bamba", ("bamba",), delta_net="mamba2", sliding_layers="attn_layer_indices",
               mlp_norm="pre_ff_layernorm", fused_linears=(FUSED_MAMBA_IN,), block_returns_tuple=True,
               module_renames=((".feed_forward.", ".mlp."), ("model.final_layernorm.", "model.norm."),
                               (".mamba.", ".linear_attn.")),
               config_ignored=("partial_rotary_factor",),
               config_defaults=(("partial_rotary_factor", 0.5), ("max_position_embeddings", 262144),
                                ("num_key_value_heads", 8), ("rms_norm_eps", 1e-5), *MAMBA_DEFAULTS),
               refused_switches=(*MAMBA_REFUSED, ("attention_bias", "biases on q, k, v and o"),
                                 ("mlp_bias", "biases on the MLP"))),
        # Phi-1, 1.5 and 2: attention and an MLP without a gate (fc1, gelu_tanh, fc2) side by side on
        # one LayerNorm, biases on every linear and on the head, partial rotary, under their own names
        Family("phi", ("phi",), norm="layer", parallel_block=True, activation="gelu_tanh", gated_mlp=False,
               head_bias=True, config_aliases=(("layer_norm_eps", "rms_norm_eps"),),
               module_renames=((".self_attn.dense.", ".self_attn.o_proj."), (".mlp.fc1.", ".mlp.up_proj."),
                               (".mlp.fc2.", ".mlp.down_proj."), ("model.final_layernorm.", "model.norm.")),
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 2048),
                                ("partial_rotary_factor", 0.5)),
               refused_switches=(("qk_layernorm", "LayerNorms on q's and k's heads"),)),
        # GPT-NeoX (Pythia 14M-12B, and models trained on its code): attention and an MLP without a gate
        # (exact GELU) side by side, each on its own LayerNorm, with use_parallel_residual (else one after
        # the other); q, k and v fused head by head; biases on every linear; a quarter of each head rotated
        Family("gpt_neox", ("gpt_neox",), norm="layer", activation="gelu", gated_mlp=False,
               parallel_norms_switch="use_parallel_residual",
               fused_linears=(FUSED_QKV,),
               fused_by_head=True,
               config_aliases=(("layer_norm_eps", "rms_norm_eps"), ("rotary_pct", "partial_rotary_factor"),
                               ("rotary_emb_base", "rope_theta")),
               tensor_renames=(("embed_out.", "lm_head."),),
               module_renames=(("gpt_neox.embed_in.", "model.embed_tokens."),
                               ("gpt_neox.final_layer_norm.", "model.norm."), ("gpt_neox.layers.", "model.layers."),
                               (".attention.", ".self_attn."),
                               (".self_attn.query_key_value.", ".self_attn.qkv_proj."),
                               (".self_attn.dense.", ".self_attn.o_proj."),
                               (".mlp.dense_h_to_4h.", ".mlp.up_proj."), (".mlp.dense_4h_to_h.", ".mlp.down_proj.")),
               ignored_tensors=(".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq"),
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 2048),
                                ("partial_rotary_factor", 0.25)),
               config_ignored=("head_dim", "num_key_value_heads")),
        # StarCoder 1 (1B-15B), SantaCoder, Granite 20B Code: GPT-2's block (LayerNorms with a bias, an MLP
        # without a gate, biases on every linear) with learned positions, multi-query attention (multi_query),
        # q/k/v fused (head by head without multi_query), under GPT-2's names
        Family("gpt_bigcode", ("gpt_bigcode",), **GPT2_BLOCK, multi_query="multi_query", fused_by_head=True,
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 1024),
                                ("tie_word_embeddings", True), ("hidden_act", "gelu_pytorch_tanh"))),
        # GPT-2 (124M-1.5B, DistilGPT2): StarCoder 1's block with multi-head attention, its linears transformers'
        # Conv1D (weights [in, out]), refused: scores divided by the layer's number too
        Family("gpt2", ("gpt2",), **GPT2_BLOCK, conv1d_linears=True,
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 1024),
                                ("tie_word_embeddings", True), ("hidden_act", "gelu_new")),
               refused_switches=(("scale_attn_by_inverse_layer_idx", "scores divided by the layer's number too"),
                                 ("add_cross_attention", "cross-attention to an encoder"))),
        # GPT-Neo (125M-2.7B; TinyStories' models): GPT-2's block (separate q/k/v without biases) with every other
        # layer local (a window of window_size tokens), scores not scaled, under its own names
        Family("gpt_neo", ("gpt_neo",), norm="layer", activation="gelu_tanh", gated_mlp=False, learned_positions=0,
               layers_path="h", mlp_width_default=4, sliding_layers="gpt_neo", unscaled_scores=True,
               block_returns_tuple=True,
               config_aliases=(("num_layers", "num_hidden_layers"), ("num_heads", "num_attention_heads"),
                               ("window_size", "sliding_window"), ("layer_norm_epsilon", "rms_norm_eps"),
                               ("activation_function", "hidden_act")),
               module_renames=(("transformer.wte.", "model.embed_tokens."),
                               ("transformer.wpe.", "model.embed_positions."), ("transformer.ln_f.", "model.norm."),
                               ("transformer.h.", "model.layers."), (".attn.attention.", ".self_attn."),
                               (".self_attn.out_proj.", ".self_attn.o_proj."), (".mlp.c_fc.", ".mlp.up_proj."),
                               (".mlp.c_proj.", ".mlp.down_proj."), (".ln_1.", ".input_layernorm."),
                               (".ln_2.", ".post_attention_layernorm.")),
               ignored_tensors=(".attn.attention.bias", ".attn.attention.masked_bias"),
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 2048),
                                ("tie_word_embeddings", True), ("hidden_act", "gelu_new"), ("sliding_window", 256)),
               config_ignored=("head_dim", "num_key_value_heads", "layer_types")),
        # GPT-J (6B) and its fine-tunes: attention and an MLP without a gate (gelu_tanh) side by side on one
        # LayerNorm, rotary_dim of each head rotated in interleaved pairs, a bias on the head and the MLP's
        # linears (none on attention's), under GPT-2's names
        Family("gptj", ("gptj",), norm="layer", parallel_block=True, rope_interleaved=True, activation="gelu_tanh",
               gated_mlp=False, head_bias=True, layers_path="h", mlp_width_default=4, rotary_dim_key="rotary_dim",
               config_aliases=GPT2_CONFIG_NAMES,
               module_renames=(("transformer.wte.", "model.embed_tokens."), ("transformer.ln_f.", "model.norm."),
                               ("transformer.h.", "model.layers."), (".attn.", ".self_attn."),
                               (".self_attn.out_proj.", ".self_attn.o_proj."), (".mlp.fc_in.", ".mlp.up_proj."),
                               (".mlp.fc_out.", ".mlp.down_proj."), (".ln_1.", ".input_layernorm.")),
               ignored_tensors=(".attn.bias", ".attn.masked_bias"),
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 2048), ("hidden_act", "gelu_new"),
                                ("rotary_dim", 64)),
               config_ignored=("head_dim", "num_key_value_heads", "intermediate_size", "partial_rotary_factor")),
        # OPT (125M-66B): LayerNorms with a bias before attention and a ReLU MLP without a gate (the
        # block's own fc1, fc2), biases on every linear, learned positions from row 2 on, under its own names
        Family("opt", ("opt",), norm="layer", activation="relu", gated_mlp=False, learned_positions=2,
               layers_path="decoder.layers", mlp_in_block=True,
               config_aliases=(("ffn_dim", "intermediate_size"), ("activation_function", "hidden_act")),
               module_renames=(("model.decoder.final_layer_norm.", "model.norm."),
                               ("model.decoder.embed_tokens.", "model.embed_tokens."),
                               ("model.decoder.embed_positions.", "model.embed_positions."),
                               ("model.decoder.layers.", "model.layers."),
                               (".self_attn.out_proj.", ".self_attn.o_proj."),
                               (".self_attn_layer_norm.", ".input_layernorm."),
                               (".final_layer_norm.", ".post_attention_layernorm."),
                               (".fc1.", ".mlp.up_proj."), (".fc2.", ".mlp.down_proj.")),
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 2048),
                                ("tie_word_embeddings", True), ("hidden_act", "relu"), ("intermediate_size", 3072)),
               config_ignored=("head_dim", "num_key_value_heads", "intermediate_size", "rms_norm_eps",
                               "layer_norm_eps"),
               required_switches=(("do_layer_norm_before", "OPT-350M's norms after each residual add"),
                                  ("layer_norm_elementwise_affine", "LayerNorms without a weight and bias")),
               refused_switches=(("_remove_final_layer_norm", "no final norm"),)),
        # Seed-OSS (36B): Llama with q/k/v biases (attention_bias) and none on o_proj (attention_out_bias)
        Family("seed_oss", ("seed_oss",),
               config_defaults=(("max_position_embeddings", 524288), ("num_key_value_heads", 8), ("head_dim", 128),
                                ("rms_norm_eps", 1e-6))),
        # IQuest-Coder-V1 (40B): Llama under its own model_type (transformers builds a LlamaForCausalLM);
        # clip_qkv and use_sliding_window, which no released checkpoint sets, refused as its config is
        Family("iquestcoder", ("iquestcoder",),
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 8), ("head_dim", 128),
                                ("rms_norm_eps", 1e-5)),
               refused_switches=(("clip_qkv", "q, k and v clamped"), ("use_sliding_window", "a sliding window"))),
        # InternLM3 (8B): Llama under its own model_type
        Family("internlm3", ("internlm3",),
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 2), ("head_dim", 128),
                                ("rms_norm_eps", 1e-5))),
        # Hunyuan dense (0.5B-7B, Hy-MT): Llama with per-head q/k norms after RoPE, under their own names
        Family("hunyuan", ("hunyuan_v1_dense",), qk_norm=True, qk_norm_after_rope=True,
               qk_norms=("self_attn.query_layernorm", "self_attn.key_layernorm"),
               config_defaults=(("max_position_embeddings", 2048), ("rms_norm_eps", 1e-5))),
        # LFM2 (350M-2.6B; LFM2.5): most layers gated short convolutions, the others attention with per-head
        # q/k norms, under their own names; the final norm is its embedding_norm
        Family("lfm2", ("lfm2",), qk_norm=True, qk_norms=LFM2_QK_NORMS, short_conv=True, ff_dim_adjusted=True,
               config_aliases=(("norm_eps", "rms_norm_eps"),),
               config_replaced=(("block_ff_dim", "intermediate_size"), ("tie_embedding", "tie_word_embeddings")),
               module_renames=LFM2_NAMES, config_defaults=LFM2_DEFAULTS),
        # LFM3: LFM2's short convolutions and MLP, attention layers full (every 4th from layer 2: RoPE on half
        # of each head's pairs, "proportional") or sliding (every 4th from layer 4), each head's output gated
        # (attention_gate), sandwich norms; no ff_dim adjusting (its MLP is intermediate_size wide)
        Family("lfm3", ("lfm3",), qk_norm=True, short_conv=True, sliding_layers="lfm3",
               attention_gate="use_attention_gate", post_norms=("post_operator_norm", "post_ffn_norm"),
               config_aliases=(("norm_eps", "rms_norm_eps"),), module_renames=LFM3_NAMES,
               config_defaults=(("max_position_embeddings", 128000), ("num_key_value_heads", 4), ("head_dim", 128),
                                ("rms_norm_eps", 1e-5), ("tie_word_embeddings", True), ("sliding_window", 256),
                                ("conv_L_cache", 7),
                                ("rope_parameters", {"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                     "full_attention": {"rope_type": "proportional",
                                                                        "rope_theta": 1e6,
                                                                        "partial_rotary_factor": 0.5}})),
               required_switches=(("use_sandwich_norm", "a norm on each attention, convolution and MLP output"),),
               refused_switches=(("attention_bias", "biases on q, k, v and o"),)),
        # AFMoE (Arcee's Trinity: Nano 6B-A1B, Mini 26B-A3B): Llama's attention with per-head q/k norms, its output
        # gated value by value (output_gate), every 4th layer full and without RoPE, the others sliding; sandwich
        # norms; after num_dense_layers dense MLPs, experts chosen by a sigmoid router with expert biases, their
        # weights renormalized and times route_scale, beside shared experts (num_shared_experts experts wide)
        Family("afmoe", ("afmoe",), qk_norm=True, mlp_norm="pre_mlp_layernorm",
               post_norms=("post_attention_layernorm", "post_mlp_layernorm"), sliding_layers="afmoe",
               nope_layers="full_layers", embed_scale_switch="mup_enabled", output_gate=True,
               experts_key="num_experts", expert_width_key="moe_intermediate_size", expert_layers="after_dense",
               router="sigmoid", expert_bias="use_expert_bias", shared_experts_key="num_shared_experts",
               config_aliases=(("route_scale", "routed_scaling_factor"),),
               module_renames=((".self_attn.gate_proj.", ".self_attn.out_gate_proj."),
                               (".mlp.router.gate.", ".mlp.gate."), (".mlp.shared_experts.", ".mlp.shared_expert.")),
               config_defaults=(("max_position_embeddings", 16384), ("head_dim", 128), ("rms_norm_eps", 1e-5),
                                ("num_experts", 64), ("num_experts_per_tok", 6), ("moe_intermediate_size", 1408),
                                ("num_shared_experts", 2), ("num_dense_layers", 1), ("sliding_window", 1024))),
        # Mellum (JetBrains' Mellum 2, 12B-A2.5B): Qwen3-MoE's block, sliding and full layers as layer_types lists
        # them (a RoPE base each), dense and sparse MLPs as mlp_layer_types does; its multi-token-prediction layer
        # (mtp.*) not read
        Family("mellum", ("mellum",), qk_norm=True, experts_key="num_local_experts",
               expert_width_key="moe_intermediate_size", norm_top_k="norm_topk_prob", expert_layers="listed",
               ignored_tensors=("mtp.",), config_aliases=(("num_experts", "num_local_experts"),),
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 4), ("head_dim", 128),
                                ("sliding_window", 1024), ("num_local_experts", 64), ("num_experts_per_tok", 8),
                                ("moe_intermediate_size", 896), ("norm_topk_prob", True),
                                ("rope_parameters", {"full_attention": {"rope_type": "default", "rope_theta": 5e5},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 1e4}}))),
        # LFM2-MoE (8B-A1B): LFM2's layers with experts after the first num_dense_layers (whose MLP is as wide as
        # intermediate_size says), 4 of 32 a token by a sigmoid router with expert biases; its experts' w1, w3, w2
        Family("lfm2_moe", ("lfm2_moe",), qk_norm=True, qk_norms=LFM2_QK_NORMS, short_conv=True,
               experts_key="num_experts", expert_width_key="moe_intermediate_size", norm_top_k="norm_topk_prob",
               expert_layers="after_dense", router="sigmoid", expert_bias="use_expert_bias",
               config_aliases=(("norm_eps", "rms_norm_eps"),),
               config_replaced=(("tie_embedding", "tie_word_embeddings"),),
               # (its experts' w1, w3, w2 after the dense MLP's: stored as the hub has them, feed_forward.experts.N.w1)
               module_renames=LFM2_NAMES + ((".w1.", ".gate_proj."), (".w3.", ".up_proj."), (".w2.", ".down_proj.")),
               config_defaults=LFM2_DEFAULTS + (("num_experts", 32), ("num_experts_per_tok", 4),
                                                ("moe_intermediate_size", 1792), ("num_dense_layers", 2),
                                                ("norm_topk_prob", True))),
        # nanochat: RMSNorms without weights everywhere (the embeddings normed too), per-head q/k norms
        # after a RoPE that turns the other way, Arcee's MLP (relu(fc1(x))^2) under CLIP's names, a
        # soft-capped head. Its q/k norms have no weight, and a rotation keeps a head's RMS, so they are
        # the same before RoPE, where every engine computes q/k norms
        Family("nanochat", ("nanochat",), norm_weight=False, embed_norm=True, qk_norm=True, rope_reversed=True,
               activation="relu2", gated_mlp=False,
               module_renames=((".mlp.fc1.", ".mlp.up_proj."), (".mlp.fc2.", ".mlp.down_proj.")),
               config_defaults=(("max_position_embeddings", 2048), ("final_logit_softcapping", 15.0))),
        # OLMo 1 (1B, 7B): Llama with LayerNorms that have neither weight nor bias, eps 1e-5 always;
        # q, k and v clamped with clip_qkv (OLMo 0424's and 0724's 7B)
        Family("olmo", ("olmo",), norm="layer", norm_bias=False, norm_weight=False, clip_qkv=True,
               config_defaults=(("rms_norm_eps", 1e-5), ("max_position_embeddings", 2048)),
               config_ignored=("rms_norm_eps", "layer_norm_eps")),
        # OLMo 2 (1B, 7B, 13B): no norm before attention or the MLP, one after each (Gemma's names),
        # q/k norms over the whole projection
        Family("olmo2", ("olmo2",), pre_norms=False, post_norms=GEMMA_POST_NORMS, qk_norm=True, qk_norm_whole=True,
               config_defaults=(("max_position_embeddings", 2048), ("rms_norm_eps", 1e-5))),
        # OLMo 3 (7B, 32B): OLMo 2 with three of every four layers sliding
        Family("olmo3", ("olmo3",), pre_norms=False, post_norms=GEMMA_POST_NORMS, qk_norm=True, qk_norm_whole=True,
               sliding_layers="gemma",
               config_defaults=(("max_position_embeddings", 2048), ("rms_norm_eps", 1e-5), ("sliding_window", 4096),
                                ("sliding_window_pattern", 4), ("rope_theta", 500000.0))),
        # EXAONE 4.0 (1.2B, 32B): OLMo 2's block with per-head q/k norms; with a sliding window,
        # three of every four layers slide and the others do not rotate q and k
        Family("exaone4", ("exaone4",), pre_norms=False, post_norms=GEMMA_POST_NORMS, qk_norm=True,
               sliding_layers="gemma", nope_layers="full",
               config_defaults=(("max_position_embeddings", 2048), ("num_key_value_heads", 32), ("rms_norm_eps", 1e-5),
                                ("sliding_window", 4096), ("sliding_window_pattern", 4))),
        # SmolLM3: Llama with every 4th layer without RoPE
        Family("smollm3", ("smollm3",), nope_layers="listed", sliding_layers="nope",
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 4),
                                ("tie_word_embeddings", True), ("rope_theta", 2e6))),
        # Gemma (2B, 7B; CodeGemma): Llama with Gemma's (1 + w) norms, scaled embeddings and gelu_tanh
        Family("gemma", ("gemma",), norm_offset=1.0, embed_scale=True, activation="gelu_tanh",
               config_defaults=(("max_position_embeddings", 8192), ("num_key_value_heads", 16), ("head_dim", 256),
                                ("tie_word_embeddings", True))),
        # Gemma 2 (2B, 9B, 27B): Gemma 3 without the q/k norms, with soft-capped scores and logits,
        # every other layer sliding, one RoPE base
        Family("gemma2", ("gemma2",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
               post_norms=GEMMA_POST_NORMS, embed_scale=True, activation="gelu_tanh", sliding_layers="alternate",
               config_defaults=GEMMA2_DEFAULTS),
        # VaultGemma (1B): Gemma 2 without the post-norms
        Family("vaultgemma", ("vaultgemma",), mlp_norm="pre_feedforward_layernorm", norm_offset=1.0,
               embed_scale=True, activation="gelu_tanh", sliding_layers="alternate", config_defaults=GEMMA2_DEFAULTS),
        # Qwen3.5 (0.8B to 27B; the language model of their vision-language checkpoints): three of every four
        # layers gated delta nets, the fourth Qwen3's attention with a gate on its output (in q_proj) and a
        # quarter of each head rotated; (1 + w) RMSNorms
        Family("qwen3_5", ("qwen3_5_text",), **QWEN3_5,
               config_defaults=QWEN3_5_DEFAULTS + (("num_key_value_heads", 4),)),
        # Qwen3.5 MoE (35B-A3B, 122B-A10B, 397B-A17B): Qwen3.5's layers, every MLP a mixture as Qwen2-MoE's (the
        # chosen experts' weights renormalized, a shared expert gated by a sigmoid)
        Family("qwen3_5_moe", ("qwen3_5_moe_text",), **QWEN3_5, experts_key="num_local_experts",
               expert_width_key="moe_intermediate_size", shared_expert_key="shared_expert_intermediate_size",
               shared_expert_gate=True, config_aliases=(("num_experts", "num_local_experts"),),
               config_defaults=QWEN3_5_DEFAULTS + (("num_key_value_heads", 2), ("num_local_experts", 256),
                                                   ("num_experts_per_tok", 8), ("moe_intermediate_size", 512),
                                                   ("shared_expert_intermediate_size", 512))),
        # Qwen3-MoE (30B-A3B, Coder-30B-A3B): Qwen3 whose MLPs are experts, moe_intermediate_size wide, 8 of 128 a
        # token; decoder_sparse_step and mlp_only_layers may leave dense MLPs (intermediate_size wide)
        Family("qwen3_moe", ("qwen3_moe",), qk_norm=True, sliding_layers="qwen", experts_key="num_local_experts",
               expert_width_key="moe_intermediate_size", norm_top_k="norm_topk_prob", expert_layers="qwen",
               config_aliases=(("num_experts", "num_local_experts"),),
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 4),
                                ("num_local_experts", 128), ("num_experts_per_tok", 8),
                                ("moe_intermediate_size", 768))),
        # Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen2 with 4 of 60 (64) experts a token and a shared expert
        # on every token, gated by a sigmoid
        Family("qwen2_moe", ("qwen2_moe",), qkv_bias=True, sliding_layers="qwen", experts_key="num_local_experts",
               expert_width_key="moe_intermediate_size", norm_top_k="norm_topk_prob", expert_layers="qwen",
               shared_expert_key="shared_expert_intermediate_size", shared_expert_gate=True,
               config_aliases=(("num_experts", "num_local_experts"),),
               config_defaults=(("max_position_embeddings", 32768), ("num_key_value_heads", 16),
                                ("num_local_experts", 60), ("num_experts_per_tok", 4), ("moe_intermediate_size", 1408),
                                ("shared_expert_intermediate_size", 5632))),
        # OLMoE (1B-7B): Llama with q/k norms over the whole projection (OLMo 2's) and 8 of 64 experts a token;
        # its clip_qkv clamps after those norms, where the engines' clamp comes before: refused
        Family("olmoe", ("olmoe",), qk_norm=True, qk_norm_whole=True, experts_key="num_experts",
               norm_top_k="norm_topk_prob",
               config_defaults=(("max_position_embeddings", 4096), ("rms_norm_eps", 1e-5),
                                ("num_experts", 64), ("num_experts_per_tok", 8)),
               refused_switches=(("clip_qkv", "q, k and v clamped after their norms"),)),
        # Mixtral (8x7B, 8x22B): Mistral with 2 of 8 experts a token, their weights renormalized; AutoAWQ's
        # checkpoints keep the experts under their own names (block_sparse_moe, w1, w3, w2)
        Family("mixtral", ("mixtral",), sliding_layers="all", experts_key="num_local_experts",
               tensor_renames=((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                               (".w2.", ".down_proj.")),
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 8), ("rms_norm_eps", 1e-5),
                                ("rope_theta", 1e6), ("num_local_experts", 8), ("num_experts_per_tok", 2))),
        # Granite 3 MoE (1B-A400M, 3B-A800M): Granite 3 (its multipliers) with 8 of 32 or 40 experts a token,
        # renormalized, under its own names
        Family("granitemoe", ("granitemoe",), multipliers=True, experts_key="num_local_experts",
               module_renames=GRANITE_MOE_NAMES,
               config_defaults=(("max_position_embeddings", 2048), ("attention_multiplier", 1.0),
                                ("num_local_experts", 8), ("num_experts_per_tok", 2))),
        # Granite MoE Shared: Granite 3 MoE with a shared_mlp beside the experts (shared_intermediate_size wide;
        # 0, the default: none)
        Family("granitemoeshared", ("granitemoeshared",), multipliers=True, experts_key="num_local_experts",
               shared_expert_key="shared_intermediate_size", fused_linears=(FUSED_SHARED_GATE_UP,),
               module_renames=(*GRANITE_MOE_NAMES, *GRANITE_SHARED_MLP_NAMES),
               config_defaults=(("max_position_embeddings", 2048), ("attention_multiplier", 1.0),
                                ("num_local_experts", 8), ("num_experts_per_tok", 2), ("shared_intermediate_size", 0))),
        # Granite MoE SWA: Granite MoE Shared with Granite SWA's attention (sinks, layers 0, 4, 8, ... full, a RoPE
        # base per layer)
        Family("granitemoe_swa", ("granitemoe_swa",), multipliers=True, experts_key="num_local_experts",
               sliding_layers="fourth", attention_sinks=True, layer_rope_theta="layer_rope_theta",
               shared_expert_key="shared_intermediate_size", fused_linears=(FUSED_SHARED_GATE_UP,),
               module_renames=(*GRANITE_MOE_NAMES, *GRANITE_SHARED_MLP_NAMES),
               config_defaults=(("max_position_embeddings", 2048), ("attention_multiplier", 1.0),
                                ("num_local_experts", 8), ("num_experts_per_tok", 2), ("sliding_window", 128),
                                ("shared_intermediate_size", 0))),
        # gpt-oss (20B, 120B): 4 of 32 (128) experts a token with clamped SwiGLU and biases, its router's logits
        # biased, softmax over the chosen; attention with biases and a sink per head, every other layer sliding
        Family("gpt_oss", ("gpt_oss",), experts_key="num_local_experts", router_bias=True, sliding_layers="alternate",
               experts_layout="interleaved", expert_act="clamped_swiglu", attention_sinks=True, moe_returns_tuple=True,
               module_renames=((".mlp.router.", ".mlp.gate."),),
               config_defaults=(("max_position_embeddings", 131072), ("num_key_value_heads", 8), ("head_dim", 64),
                                ("num_local_experts", 128), ("num_experts_per_tok", 4), ("sliding_window", 128),
                                ("rms_norm_eps", 1e-5), ("swiglu_alpha", 1.702), ("swiglu_limit", 7.0),
                                ("rope_parameters", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "truncate": False,
                                                     "original_max_position_embeddings": 4096,
                                                     "rope_theta": 150000.0}))),
        # Phi-3, 3.5 and 4-mini: fused q/k/v and gate/up, partial rotary (4-mini), LongRoPE (the long-context ones)
        Family("phi3", ("phi3",), sliding_layers="all",
               fused_linears=(FUSED_QKV, FUSED_GATE_UP),
               rope_aliases=(("su", "longrope"), ("yarn", "longrope")),
               config_defaults=(("rms_norm_eps", 1e-5), ("original_max_position_embeddings", 4096))),
    )
}

SUPPORTED_TYPES = frozenset(t for f in FAMILIES.values() for t in f.model_types)
SUPPORTED = ", ".join(sorted(SUPPORTED_TYPES))


def find_family(model_type, config=None) -> Family | None:
    """The family of a config's model_type, or None. Where it reads configs with experts as another family
    (Family.with_experts: Granite 4.0's), that one for a config (a dict or transformers') that has them: callers
    reading a model pass its config."""
    family = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
    if family is None or not family.with_experts or config is None:
        return family
    moe = FAMILIES[family.with_experts]
    experts = config.get(moe.experts_key) if isinstance(config, dict) else getattr(config, moe.experts_key, None)
    if experts is None:  # (transformers' default)
        experts = dict(moe.config_defaults)[moe.experts_key]
    return family if experts == 0 and not isinstance(experts, bool) else moe  # (anything else: moe's spec checks it)


def family_for(model_type: str, config=None) -> Family:
    family = find_family(model_type, config)
    if family is not None:
        return family
    raise UserError(f"model type {model_type!r} is not supported; supported model types: {SUPPORTED}")
