"""What the graph needs to know about a model, read once from the checkpoint's config.json.

ModelSpec turns the Hugging Face config (which differs per family and per transformers
version) into plain numbers: sizes, per-layer attention kind (full or sliding window) and
per-layer RoPE frequencies.

The engines rotate the pairs (i, i + head_dim / 2) of each q and k head. A model that rotates
only its first rotary_dim dimensions (Phi-3's partial_rotary_factor, pairs (i, i + rotary_dim / 2)),
or other pairs (GLM's interleaved (2i, 2i + 1)), is brought to that form by reordering its q/k head
dimensions (rotary_order, applied to the weights by checkpoint.read_for_engine) and a frequency of
zero for the pairs that do not turn.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..families import Family, family_for
from ..untrusted import (MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_INTERMEDIATE, MAX_LAYERS, MAX_POSITIONS,
                         MAX_VOCAB, Fields)

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope", "proportional")
FIX = "the checkpoint config is incomplete or corrupt"
# config.json's names (hidden_act; Gemma's hidden_activation) of each families.Family.activation
ACTIVATION_NAMES = {"silu": ("silu", "swish"), "gelu_tanh": ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new"),
                    "gelu": ("gelu",), "relu2": ("relu2",), "relu": ("relu",), "xielu": ("xielu",)}
# an activation's learned parameters, each layer's `mlp.act_fn.{name}` of this shape (Apertus's xIELU)
ACTIVATION_PARAMS = {"xielu": (("alpha_p", (1,)), ("alpha_n", (1,)), ("beta", ()), ("eps", ()))}
XIELU_PARAMS = tuple(name for name, _ in ACTIVATION_PARAMS["xielu"])


def xielu_constants(alpha_p, alpha_n, beta, eps) -> np.ndarray:
    """Apertus's xIELU of one layer as it computes, float32 (a_p, a_n, beta, eps): a_p = softplus(alpha_p),
    a_n = beta + softplus(alpha_n); what every engine uses (the graph's scalars, the cuda kernels' params)."""
    alpha_p, alpha_n, beta, eps = (float(np.asarray(v, np.float64).reshape(-1)[0])
                                   for v in (alpha_p, alpha_n, beta, eps))
    softplus = np.logaddexp  # softplus(v) = ln(1 + e^v) = logaddexp(0, v)
    return np.array([softplus(0.0, alpha_p), beta + softplus(0.0, alpha_n), beta, eps], np.float32)

LEGACY_LAYER_TYPES = {"attention": "full_attention", "mamba": "linear_attention"}  # config.json's older names
MAX_ROPE_TABLE = 1 << 27  # positions x head_dim: 2 x 512 MiB of float32 cos/sin at most
MAX_CONV_KERNEL = 16  # an LFM2 short convolution's tokens (its conv_L_cache: 3)
MAX_DELTA_STATE = 1 << 30  # bytes of a DeltaNet layer's state (Qwen3.5 27B's: 3 MiB; Granite 4.0-H micro's: 3 MiB)
MAX_EXPERTS = 1024  # a mixture of experts' per layer (Qwen3-MoE's: 128)
MAX_EXPERTS_IN_ALL = 1 << 16  # over all layers (Qwen3-MoE 30B's: 48 x 128; DeepSeek-V3's 58 x 256)


@dataclass(frozen=True, eq=False)
class Rope:
    """One layer's rotary embedding: cos/sin of position x inv_freq, times scale."""
    inv_freq: np.ndarray  # [head_dim / 2] float64, in the engines' order (zeros: pairs that do not turn)
    scale: float = 1.0  # what cos and sin are multiplied by (YaRN's and LongRoPE's attention factor; else 1)
    long_inv_freq: np.ndarray | None = None  # LongRoPE: the frequencies of positions long_from and on
    long_from: int = 0
    turning: int | None = None  # the pairs that turn, first (partial rotary: the others keep cos 1, sin 0); all

    def key(self) -> bytes:
        """Equal for layers that can share one pair of tables."""
        long = b"" if self.long_inv_freq is None else self.long_inv_freq.tobytes()
        numbers = np.array([self.scale, self.long_from, -1 if self.turning is None else self.turning], np.float64)
        return self.inv_freq.tobytes() + long + numbers.tobytes()

    def padded(self, half: int) -> "Rope":
        """Over `half` pairs: the pairs past these (partial rotary's) do not turn."""
        def pad(f):
            return None if f is None else np.concatenate([f, np.zeros(half - len(f))])
        return Rope(pad(self.inv_freq), self.scale, pad(self.long_inv_freq), self.long_from, len(self.inv_freq))


@dataclass(frozen=True)
class DeltaNet:
    """The layers that keep a recurrent state in place of a KV cache (Family.delta_net): those layer_types names
    linear_attention (older configs: mamba). Each reads the normed x through in_proj_qkv (conv_dim wide), a causal
    depthwise convolution over the last `kernel` tokens (its weight conv1d [conv_dim, 1, kernel], and bias where
    conv_bias) and SiLU; z (v_dim per value head) by in_proj_z; a (one per value head) by in_proj_a, float. Value
    head h reads key head h // (v_heads / k_heads), and decays its state S [k_dim, v_dim] by
        decay = exp(-exp(A_log[h]) * softplus(a + dt_bias[h]))

    rule "gated" (Qwen3.5's gated delta nets): the convolution's channels are q, k (k_heads x k_dim each), v
    (v_heads x v_dim); q and k L2-normed, q / sqrt(k_dim); b by in_proj_b (float), beta = sigmoid(b):
        S = decay S;  S += k (beta (v - S^T k))^T;  o = S^T q
    then out_proj(rms_norm(o) * norm.weight * silu(z)), the norm per value head.

    rule "mamba2" (Mamba-2 mixers: Granite 4.0-H's): the channels are x (v_heads x v_dim: v), B and C (k_heads
    x k_dim each: k and q; k_heads its groups, k_dim its state size); dt = softplus(a + dt_bias[h]) within
    dt_min..dt_max (time_step_limit), the decay's:
        S = decay S;  S += B (dt x)^T;  o = S^T C + D[h] x
    then out_proj(rms_norm(o * silu(z)) * norm.weight), the norm over each of k_heads equal groups of o.

    The runtime keeps S (float32) and the convolution's last kernel - 1 inputs per layer: a fixed size, not a
    row per token."""
    layers: tuple
    k_heads: int
    v_heads: int
    k_dim: int
    v_dim: int
    kernel: int
    rule: str = "gated"
    conv_bias: bool = False
    dt_min: float = 0.0
    dt_max: float | None = None  # (None: no bound)

    @property
    def key_dim(self) -> int:
        return self.k_heads * self.k_dim

    @property
    def value_dim(self) -> int:
        return self.v_heads * self.v_dim

    @property
    def conv_dim(self) -> int:  # q, k and v side by side (x, B and C): what the convolution runs over
        return 2 * self.key_dim + self.value_dim

    @property
    def conv_parts(self) -> tuple[int, int, int]:
        """Where q, k and v begin among the convolution's channels (C, B and x: a Mamba-2's x B C)."""
        return (0, self.key_dim, 2 * self.key_dim) if self.rule == "gated" else (
            self.value_dim + self.key_dim, self.value_dim, 0)

    @property
    def norm_width(self) -> int:
        """What each rms_norm of the output spans: a value head's (gated) or a group's (mamba2)."""
        return self.v_dim if self.rule == "gated" else self.value_dim // self.k_heads

    @property
    def state_shapes(self) -> tuple[tuple, tuple]:
        """The float32 arrays one layer keeps: its convolution's inputs of the kernel - 1 tokens before
        [1, kernel - 1, conv_dim] (oldest first), then S of every value head [v_heads, k_dim, v_dim]."""
        return (1, self.kernel - 1, self.conv_dim), (self.v_heads, self.k_dim, self.v_dim)

    @property
    def state_elems(self) -> int:
        """Float32 elements one layer keeps (state_shapes')."""
        return sum(int(np.prod(shape)) for shape in self.state_shapes)


@dataclass
class ModelSpec:
    family: Family
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int
    eps: float
    max_positions: int
    tie_embeddings: bool
    attn_scale: float  # multiplies q.k
    layer_windows: list[int | None]  # per layer: sliding window (tokens attended, self included) or None
    layer_rope: list[Rope]  # per layer: its RoPE, over head_dim / 2 pairs in the engines' order
    rotary_dim: int  # the head dimensions the model rotates (head_dim unless partial rotary)
    attn_softcap: float | None
    final_softcap: float | None
    embed_multiplier: float | None  # what embeddings are multiplied by (Gemma: sqrt(hidden); Granite's)
    residual_multiplier: float  # Granite: on attention and MLP outputs before their residual adds; else 1
    logits_scaling: float  # Granite: what the logits are divided by; else 1
    # LFM2: the layers that are gated short convolutions (Family.short_conv), not attention; the others
    # keep their per-layer entries above. conv_kernel: the tokens each convolves (its conv_L_cache)
    conv_layers: tuple = ()
    conv_kernel: int = 0
    conv_bias: bool = False  # in_proj, out_proj and the convolution carry biases
    clip_qkv: float | None = None  # OLMo 1: q, k and v clamped to +-this (Family.clip_qkv), or None
    # GPT-2, StarCoder 1, OPT: a learned position table (model.embed_positions) whose row for position p
    # is p + this (OPT's 2); None: RoPE (Family.learned_positions)
    position_offset: int | None = None
    # GPT-NeoX with use_parallel_residual: attention and the MLP side by side, each on its own norm of the
    # block's input (Family.parallel_norms_switch)
    parallel_norms: bool = False
    # a mixture of experts (Family.experts_key): the layers whose MLP is `experts` gated MLPs, each
    # expert_width wide, of which a token runs the experts_per_token its router (mlp.gate, float) scores
    # highest, weighted by their softmax probabilities (renormalized over the chosen with norm_top_k);
    # the other layers' MLP is the dense one, intermediate wide. LFM2-MoE's router (Family.router
    # "sigmoid"): weights the sigmoids of the logits, times routed_scale after renormalizing. With
    # expert_bias (LFM2-MoE's, ERNIE 4.5's: mlp.expert_bias) the chosen are those highest with it added
    moe_layers: tuple = ()
    experts: int = 0
    experts_per_token: int = 0
    expert_width: int = 0
    norm_top_k: bool = False
    expert_bias: bool = False
    routed_scale: float = 1.0
    # gpt-oss: clamped SwiGLU's alpha and limit (Family.expert_act), None: SiLU; the heads' attention sinks
    # (gpt-oss's, Granite SWA's)
    swiglu_alpha: float = 1.0
    swiglu_limit: float | None = None
    attention_sinks: bool = False
    # Qwen2-MoE, ERNIE 4.5: a shared expert as wide as this (0: none) beside the routed ones, its output
    # gated by sigmoid(mlp.shared_expert_gate . x) with shared_gate (Qwen2-MoE's)
    shared_width: int = 0
    shared_gate: bool = False
    # LFM3: each head's output times sigmoid(self_attn.g_proj(x))[head] (Family.attention_gate), x the
    # attention's normed input; g_proj stays float (self_attn.g_proj.weight [heads, hidden]), as a router
    attention_gate: bool = False
    output_gate: bool = False  # AFMoE: the attention's output times sigmoid(self_attn.out_gate_proj(x)) (Family's)
    # the checkpoint's embedding rows, where more than vocab (Apertus 1.5's pruned head: vocab is the head's,
    # the ids past it are input only; the engines keep the first vocab rows); 0: vocab
    embed_vocab: int = 0
    delta: DeltaNet | None = None  # Qwen3.5's gated delta nets, Granite 4.0-H's Mamba-2 (Family.delta_net), or none

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.layers) if i not in self.conv_layers and i not in self.delta_layers]

    @property
    def delta_layers(self) -> tuple:
        return self.delta.layers if self.delta else ()

    @property
    def kv_bytes_per_token(self) -> int:
        """Cache elements per token (multiply by itemsize): K and V of every attention layer, and a conv
        layer's B * x row (what its convolution reads of the tokens before; kept per position, as K and
        V are, so that a rewind costs nothing)."""
        return 2 * len(self.attention_layers) * self.kv_heads * self.head_dim + len(self.conv_layers) * self.hidden

    @property
    def state_elems(self) -> int:
        """Float32 elements of the fixed state the runtime keeps besides the cache (DeltaNet's layers')."""
        return len(self.delta_layers) * self.delta.state_elems if self.delta else 0


def rope_type_of(rope: Fields, aliases: dict | None = None) -> str:
    """A rope parameter dict's type (rope_type, or older configs' type; "default"), under a family's
    older names of a type (aliases; Phi-3: su -> longrope)."""
    rope_type = rope.str("rope_type", default=None) or rope.str("type", default="default")
    return (aliases or {}).get(rope_type, rope_type)


def rope_frequencies(rope: Fields, dim: int, max_positions: int, aliases: dict | None = None) -> Rope:
    """The RoPE over the first `dim` head dimensions (all but partial rotary's), for one rope
    parameter dict (Hugging Face's semantics, transformers 5 `modeling_rope_utils`).
    aliases: a family's older names of a type (Phi-3: su -> longrope)."""
    rope_type = rope_type_of(rope, aliases)
    theta = rope.float("rope_theta", 1e-3, 1e12, default=10000.0)
    freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope_type == "dynamic" and rope.raw.get("alpha") is not None:
        # Hunyuan's NTK alpha: a base stretched once, whatever the length (transformers: "ntk_alpha")
        if dim <= 2:
            raise UserError(f"{rope.where}: NTK alpha scaling needs more than 2 rotated dimensions; {rope.fix}")
        theta *= rope.float("alpha", 1e-6, 1e9) ** (dim / (dim - 2))
        freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    if rope_type in ("default", "dynamic"):
        # dynamic NTK scales the base only past max_position_embeddings, which is our tables' end
        return Rope(freq)
    if rope_type == "linear":
        return Rope(freq / rope.float("factor", 1e-3, 1e6))
    if rope_type == "proportional":  # (LFM3's) the first pairs as default's, the rest past partial_rotary_factor 0
        turning = int(rope.float("partial_rotary_factor", 1e-6, 1.0, default=1.0) * dim // 2)
        return Rope(np.where(np.arange(len(freq)) < turning, freq, 0.0) / rope.float("factor", 1e-3, 1e6, default=1.0))
    if rope_type == "llama3":
        factor = rope.float("factor", 1e-3, 1e6)
        low, high = rope.float("low_freq_factor", 1e-6, 1e6), rope.float("high_freq_factor", 1e-6, 1e6)
        old_ctx = rope.float("original_max_position_embeddings", 1, MAX_POSITIONS)
        if high <= low:
            raise UserError(f"{rope.where}: high_freq_factor must be above low_freq_factor; {rope.fix}")
        wavelen = 2 * math.pi / freq
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * freq / factor + smooth * freq
        out = np.where(wavelen > old_ctx / low, freq / factor, freq)
        medium = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
        return Rope(np.where(medium, smoothed, out))
    if rope_type == "yarn":
        if theta <= 1:  # its correction range divides by ln(theta)
            raise UserError(f"{rope.where}: rope_theta {theta} must be above 1 for YaRN; {rope.fix}")
        return yarn_frequencies(rope, theta, freq, dim, max_positions)
    if rope_type == "longrope":
        return longrope_frequencies(rope, freq, max_positions)
    raise UserError(f"{rope.where}: RoPE type {rope_type!r} is not supported by the exporter "
                    f"(supported: {', '.join(ROPE_TYPES)})")


def yarn_frequencies(rope: Fields, theta: float, freq: np.ndarray, dim: int, max_positions: int) -> Rope:
    """YaRN (Qwen's long-context setting): the low frequencies divided by `factor`, the high ones
    kept, a linear ramp between; cos/sin scaled by 0.1 ln(factor) + 1 unless attention_factor says."""
    old_ctx = rope.float("original_max_position_embeddings", 1, MAX_POSITIONS, default=max_positions)
    factor = rope.float("factor", 1e-3, 1e6, default=max_positions / old_ctx)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.float("attention_factor", 1e-6, 1e3, default=None)
    if attention is None:
        m, m_all = rope.float("mscale", 0.0, 1e3, default=None), rope.float("mscale_all_dim", 0.0, 1e3, default=None)
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    fast = rope.float("beta_fast", 1e-6, 1e6, default=None) or 32.0
    slow = rope.float("beta_slow", 1e-6, 1e6, default=None) or 1.0

    def correction_dim(rotations: float) -> float:  # the dimension that turns `rotations` times in old_ctx
        return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(fast), correction_dim(slow)
    if rope.bool("truncate", default=True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / ((high - low) or 0.001), 0, 1)
    return Rope(freq / factor * ramp + freq * (1 - ramp), float(attention))


def longrope_frequencies(rope: Fields, freq: np.ndarray, max_positions: int) -> Rope:
    """Phi-3's LongRoPE: each frequency divided by its short_factor; from position
    original_max_position_embeddings on, by its long_factor. That is what transformers computes
    token by token (a forward whose last position is past the original context takes the long
    set; a prompt prefilled past it in one forward takes it for every position, which no table
    keyed by position can). cos/sin times sqrt(1 + ln(factor) / ln(original context))."""
    old_ctx = rope.int("original_max_position_embeddings", 2, MAX_POSITIONS)
    factor = rope.float("factor", 1e-3, 1e6, default=max_positions / old_ctx)
    attention = rope.float("attention_factor", 1e-6, 1e3, default=None)
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(old_ctx))
    short, long = (np.array(rope.floats(key, len(freq), 1e-6, 1e6)) for key in ("short_factor", "long_factor"))
    return Rope(freq / short, attention, freq / long, old_ctx)


def _rope_params(config: Fields) -> dict[str, Fields]:
    """Per layer type ('full_attention', 'sliding_attention') -> rope parameters, from old or new configs."""
    raw = config.raw
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        return {k: Fields(v, f"{config.where} rope_parameters.{k}", config.fix) for k, v in params.items()}
    if isinstance(params, dict) and params:
        base = dict(params)
    else:  # transformers 4 style: rope_theta + rope_scaling
        scaling = raw.get("rope_scaling")
        base = dict(scaling) if isinstance(scaling, dict) else {}
    base.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if raw.get("original_max_position_embeddings") is not None:  # Phi-3 style: outside, and it wins (as in HF)
        base["original_max_position_embeddings"] = raw["original_max_position_embeddings"]
    out = {"full_attention": Fields(base, f"{config.where} rope parameters", config.fix)}
    local = raw.get("rope_local_base_freq")
    out["sliding_attention"] = (Fields({"rope_type": "default", "rope_theta": local},
                                       f"{config.where} rope_local_base_freq", config.fix) if local else out["full_attention"])
    return out


def rotating_layers(c: Fields, family: Family, layers: int) -> list[bool]:
    """Which layers rotate q and k: all, but those SmolLM3's no_rope_layers marks 0 (every
    no_rope_layer_interval-th where it lists none, as transformers decides); none of Granite 4's
    unless its position_embedding_type is "rope". (EXAONE 4's rule follows the layer types: model_spec.)"""
    if family.learned_positions >= 0:  # (GPT-2's: positions are a learned table, no layer rotates)
        return [False] * layers
    if family.nope_layers == "unless_rope":
        # (Granite 4.0-H's configs say "nope": transformers rotates with "rope" alone)
        return [c.str("position_embedding_type", ("rope", "nope"), default=None) == "rope"] * layers
    if family.nope_layers != "listed":
        return [True] * layers
    listed = c.raw.get("no_rope_layers")
    if listed is None:
        interval = c.int("no_rope_layer_interval", 1, MAX_LAYERS, default=4)
        return [(i + 1) % interval != 0 for i in range(layers)]
    if not isinstance(listed, list) or len(listed) != layers or not all(v in (0, 1) for v in listed):
        raise UserError(f"{c.where}: no_rope_layers must list 0 or 1 for each of the {layers} layers; {c.fix}")
    return [bool(v) for v in listed]


def gpt_neo_layer_types(c: Fields, layers: int) -> list[str]:
    """GPT-Neo's layers, global (full) or local (sliding), as transformers reads its config: attention_layers,
    or attention_types ([[pattern, times], ...]) expanded."""
    listed = c.raw.get("attention_layers")
    if listed is None:
        types = c.raw.get("attention_types")
        types = [[["global", "local"], 12]] if types is None else types
        listed = []
        for entry in types if isinstance(types, list) else [None]:
            ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], list)
            if not ok or not isinstance(entry[1], int) or not 0 < entry[1] * len(entry[0]) <= MAX_LAYERS - len(listed):
                raise UserError(f"{c.where}: attention_types must list [[kinds, times], ...] for its {layers} layers; "
                                f"{c.fix}")
            listed += entry[0] * entry[1]
    kinds = {"global": "full_attention", "local": "sliding_attention"}
    if not (isinstance(listed, list) and len(listed) == layers and all(isinstance(k, str) and k in kinds
                                                                     for k in listed)):
        raise UserError(f"{c.where}: attention_layers must list global or local for each of the {layers} layers; "
                        f"{c.fix}")
    return [kinds[k] for k in listed]


def default_layer_types(c: Fields, family: Family, layers: int, window: int | None,
                        rotating: list[bool]) -> list[str]:
    """Each layer's attention for a config without layer_types, by the family's rule (transformers')."""
    rule = family.sliding_layers
    if rule == "mamba":
        return ["linear_attention"] * layers
    if rule == "attn_layer_indices":  # (Bamba's; none listed: every layer Mamba, as transformers builds it)
        listed = layer_numbers(c, rule, layers) if c.raw.get(rule) is not None else []
        return ["full_attention" if i in listed else "linear_attention" for i in range(layers)]
    if rule == "afmoe":  # (whatever the window: its full layers are the ones without RoPE)
        every = c.int("global_attn_every_n_layers", 1, MAX_LAYERS, default=4)
        return ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
    if window is None or rule == "none":
        return ["full_attention"] * layers
    if rule == "nope":
        return ["full_attention" if turns else "sliding_attention" for turns in rotating]
    if rule == "gpt_neo":
        return gpt_neo_layer_types(c, layers)
    if rule == "qwen":
        first = c.int("max_window_layers", 0, MAX_LAYERS, default=28)
        return ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if rule == "fourth":
        return ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(layers)]
    if rule in ("gemma", "alternate"):
        pattern = 2 if rule == "alternate" else c.int("sliding_window_pattern", 1, MAX_LAYERS, default=6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    return ["sliding_attention"] * layers  # "all"


def model_spec(config: dict, where: str = "config.json", fix: str = FIX) -> ModelSpec:
    """The checked numbers of a model config (untrusted input: every field typed and bounded)."""
    model_type = Fields(config, where, fix).str("model_type", default="?")
    family = family_for(model_type, config)
    # a key left out means what it means to transformers (dicts copied: the table's own are shared)
    defaults = {k: dict(v) if isinstance(v, dict) else v for k, v in family.config_defaults}
    if config.get("rope_scaling") is not None:  # (which reads an older config's rope_scaling as rope_parameters)
        defaults.pop("rope_parameters", None)
    aliased = {ours: config[theirs] for theirs, ours in family.config_aliases if theirs in config}
    config = {**defaults, **aliased, **{k: v for k, v in config.items() if k not in family.config_ignored}}
    config.update({usual: config[theirs] for theirs, usual in family.config_replaced if theirs in config})
    c = Fields(config, where, fix)
    for key, what in family.refused_switches:
        if config.get(key) not in (None, False, 0):
            raise UserError(f"{where}: {key} {config[key]!r:.40} ({what}) is not supported for {model_type}: "
                            "awq-edge's engines do not compute it")
    for key, what in family.required_switches:
        if config.get(key) is not None and not c.bool(key):
            raise UserError(f"{where}: {key} false ({what}) is not supported for {model_type}: awq-edge's engines "
                            "compute its model with it on")
    hidden = c.int("hidden_size", 1, MAX_HIDDEN)
    layers = c.int("num_hidden_layers", 1, MAX_LAYERS)
    heads = c.int("num_attention_heads", 1, MAX_HEADS)
    kv_heads = c.int("num_key_value_heads", 1, heads, default=heads)
    if family.multi_query and c.bool(family.multi_query, default=True):  # (StarCoder 1's) one KV head
        kv_heads = 1
    head_dim = c.int("head_dim", 2, MAX_HEAD_DIM, default=max(hidden // heads, 2))
    vocab = embed_vocab = c.int("vocab_size", 1, MAX_VOCAB)
    if family.head_vocab_key and c.raw.get(family.head_vocab_key) is not None:  # (Apertus 1.5's pruned head)
        vocab = c.int(family.head_vocab_key, 1, embed_vocab)
        if vocab < embed_vocab and c.bool("tie_word_embeddings", default=False):
            raise UserError(f"{where}: {family.head_vocab_key} {vocab} prunes a head tied to the embedding of "
                            f"{embed_vocab} rows, which transformers does not build; {fix}")
    if c.has("word_embed_proj_dim") and c.int("word_embed_proj_dim", 1, MAX_HIDDEN) != hidden:
        raise UserError(f"{where}: word_embed_proj_dim {c.raw['word_embed_proj_dim']} is not hidden_size {hidden} "
                        "(OPT-350M's projected embeddings), which awq-edge's engines do not compute; take another "
                        "model")
    width = {"default": family.mlp_width_default * hidden} if family.mlp_width_default else {}  # (GPT-2's n_inner)
    intermediate = c.int("intermediate_size", 1, MAX_INTERMEDIATE, **width)
    max_positions = c.int("max_position_embeddings", 1, MAX_POSITIONS, default=4096)
    moe = experts_spec(c, family, layers) if family.experts_key else {}
    act = c.str("hidden_activation", default=None) or c.str("hidden_act", default=None)
    if act is not None and act not in ACTIVATION_NAMES[family.activation]:  # not silently another function
        raise UserError(f"{where}: hidden activation {act!r} is not supported for {model_type} (its engines compute "
                        f"{' / '.join(ACTIVATION_NAMES[family.activation])})")
    if heads % kv_heads:
        raise UserError(f"model type {model_type}: {heads} attention heads is not a multiple of {kv_heads} KV heads")
    if head_dim % 2:
        raise UserError(f"{where}: head_dim {head_dim} is odd; RoPE needs an even head size; {fix}")
    if max_positions * head_dim > MAX_ROPE_TABLE:  # the graph holds cos/sin tables of this size
        raise UserError(f"{where}: max_position_embeddings {max_positions} x head_dim {head_dim} makes RoPE tables "
                        f"too large to export; {fix}")

    # Which layers use a sliding window, and how wide (tokens attended, the query's own included).
    # (Qwen's and SmolLM3's configs keep a sliding_window that is off, which transformers nulls: Qwen2-MoE's 0)
    off = family.sliding_layers in ("qwen", "nope") and not c.bool("use_sliding_window", default=False)
    window = None if off else c.int("sliding_window", 1, MAX_POSITIONS, default=None)
    rotating = rotating_layers(c, family, layers)
    layer_types = config.get("layer_types") or default_layer_types(c, family, layers, window, rotating)
    conv_layers: tuple = ()
    delta = None
    if isinstance(layer_types, list):  # (older configs' names, as transformers reads them: Granite 4's mamba)
        layer_types = [LEGACY_LAYER_TYPES.get(t, t) if isinstance(t, str) else t for t in layer_types]
    if family.delta_net:  # "linear_attention" layers keep a state (Qwen3.5's default: every fourth layer full)
        if family.delta_net == "gated" and config.get("layer_types") is None:
            every = c.int("full_attention_interval", 1, MAX_LAYERS, default=4)
            layer_types = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(layers)]
        delta, layer_types = delta_net_spec(c, family, layer_types, layers)
    if family.short_conv:  # LFM2: "conv" layers (older configs: all but full_attn_idxs), as transformers reads them
        layer_types = conv_layer_types(c, family, layers) if config.get("layer_types") is None else layer_types
        if isinstance(layer_types, list):
            conv_layers = tuple(i for i, t in enumerate(layer_types) if t == "conv")
            layer_types = ["full_attention" if t == "conv" else t for t in layer_types]
        if len(conv_layers) == layers:
            raise UserError(f"{where}: every layer is a short convolution (conv), and awq-edge's engines take a model "
                            f"with attention too; {fix}")
    if isinstance(layer_types, list) and "linear_attention" in layer_types:
        raise UserError(f"{where}: layer {layer_types.index('linear_attention')} is a linear attention (Mamba) layer, "
                        f"which awq-edge's engines do not compute for {model_type}; take a model whose every layer "
                        "is attention")
    if (not isinstance(layer_types, list) or len(layer_types) != layers
            or not all(t in ("full_attention", "sliding_attention") for t in layer_types)):
        kinds = ("full_attention, sliding_attention or conv" if family.short_conv else
                 "full_attention or sliding_attention")
        raise UserError(f"{where}: layer_types must list {kinds} for each of the {layers} layers; {fix}")
    if family.nope_layers == "full_layers" or family.nope_layers == "full" and c.raw.get("sliding_window") is not None:
        rotating = [t == "sliding_attention" for t in layer_types]  # EXAONE 4: its full layers do not rotate
    if window is not None and window >= max_positions:  # no narrower than the context (Phi-3.5's 262144): none
        window = None
    windows = [window if t == "sliding_attention" and window else None for t in layer_types]

    ropes = _rope_params(c)
    thetas = [None] * layers  # Granite SWA's RoPE base per layer (Family.layer_rope_theta), 0 for none
    if family.layer_rope_theta and c.raw.get(family.layer_rope_theta) is not None:
        thetas = c.floats(family.layer_rope_theta, layers, 0.0, 1e12)
        rotating = [turns and theta != 0 for turns, theta in zip(rotating, thetas)]
    rotary_dims, layer_rope = set(), []
    for t, turns, theta in zip(layer_types, rotating, thetas):
        rope = ropes.get(t) or ropes.get("full_attention")
        if rope is None:
            raise UserError(f"{where}: no RoPE parameters for layer type {t!r}; {fix}")
        if theta:
            rope = Fields({**rope.raw, "rope_theta": theta}, f"{where} {family.layer_rope_theta}", fix)
        # partial rotary (Phi-3.5/4-mini: 0.75): inside the rope parameters (transformers 5) or beside them
        factor = rope.float("partial_rotary_factor", 1e-6, 1.0, default=c.float("partial_rotary_factor", 1e-6, 1.0,
                                                                                 default=1.0))
        dim = int(head_dim * factor)  # as transformers rounds it
        if rope_type_of(rope, dict(family.rope_aliases)) == "proportional":
            dim = head_dim  # (its pairs past the factor's turn at frequency 0: rope_frequencies)
        if family.rotary_dim_key:  # (GPT-J's rotary_dim: the rotated dimensions themselves)
            dim = c.int(family.rotary_dim_key, 2, head_dim)
        if dim < 2 or dim % 2:
            raise UserError(f"{where}: partial_rotary_factor {factor} rotates {dim} of {head_dim} head dimensions; "
                            f"RoPE needs an even number of at least 2; {fix}")
        rotary_dims.add(dim)
        turning = rope_frequencies(rope, dim, max_positions, dict(family.rope_aliases)).padded(head_dim // 2)
        layer_rope.append(turning if turns else Rope(np.zeros(head_dim // 2)))  # (a frequency of 0: cos 1, sin 0)
    if len(rotary_dims) != 1:
        raise UserError(f"{where}: layer types rotate different numbers of head dimensions {sorted(rotary_dims)}, "
                        "which the engines do not take")
    if family.llama4_query_scaling and ropes["full_attention"].float("llama_4_scaling_beta", 0.0, 1e3, default=0.0):
        # queries scaled by position from the original context on (Family.llama4_query_scaling): the
        # engines end there; a RoPE table cannot scale q alone, its rows rotate k too
        original = ropes["full_attention"].int("original_max_position_embeddings", 1, MAX_POSITIONS)
        max_positions = min(max_positions, original)

    if family.ff_dim_adjusted and c.bool("block_auto_adjust_ff_dim", default=True):  # LFM2's, as its Lfm2MLP
        intermediate = int(2 * intermediate / 3)
        intermediate = int(c.float("block_ffn_dim_multiplier", 1e-3, 1e3, default=1.0) * intermediate)
        multiple = c.int("block_multiple_of", 1, MAX_INTERMEDIATE, default=256)
        intermediate = multiple * -(-intermediate // multiple)
        if not 1 <= intermediate <= MAX_INTERMEDIATE:
            raise UserError(f"{where}: the MLP's width {intermediate} (intermediate_size adjusted) is out of range; "
                            f"{fix}")

    scalar = c.float("query_pre_attn_scalar", 1e-6, 1e9, default=None)  # Gemma: scale by this, not head_dim
    attn_scale = scalar ** -0.5 if scalar else head_dim ** -0.5
    if family.unscaled_scores:  # (GPT-Neo's)
        attn_scale = 1.0
    scaled = family.embed_scale or bool(family.embed_scale_switch) and c.bool(family.embed_scale_switch, default=False)
    embed, residual, logits_scaling = float(hidden) ** 0.5 if scaled else None, 1.0, 1.0
    if family.multipliers:  # Granite's, each 1 unless set (its score scale too: config_defaults)
        embed = c.float("embedding_multiplier", 1e-6, 1e6, default=1.0)
        attn_scale = c.float("attention_multiplier", 1e-9, 1e3, default=attn_scale)
        residual = c.float("residual_multiplier", 1e-6, 1e6, default=1.0)
        logits_scaling = c.float("logits_scaling", 1e-6, 1e6, default=1.0)
    if family.logit_scale:  # Cohere and HyperCLOVA X multiply the logits by it: the same fold, by its inverse
        logits_scaling = 1.0 / c.float(family.logit_scale, 1e-6, 1e6, default=1.0)
    return ModelSpec(
        family=family, model_type=model_type, hidden=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, head_dim=head_dim, vocab=vocab, intermediate=intermediate,
        eps=c.float("rms_norm_eps", 1e-12, 1.0, default=1e-6),
        max_positions=max_positions,
        tie_embeddings=c.bool("tie_word_embeddings", default=False),
        attn_scale=attn_scale, layer_windows=windows, layer_rope=layer_rope,
        rotary_dim=rotary_dims.pop(),
        attn_softcap=c.float("attn_logit_softcapping", 1e-3, 1e6, default=None),
        final_softcap=c.float("final_logit_softcapping", 1e-3, 1e6, default=None),
        embed_multiplier=embed, residual_multiplier=residual, logits_scaling=logits_scaling,
        conv_layers=conv_layers,
        position_offset=family.learned_positions if family.learned_positions >= 0 else None,
        parallel_norms=bool(family.parallel_norms_switch) and c.bool(family.parallel_norms_switch, default=True),
        conv_kernel=c.int("conv_L_cache", 2, MAX_CONV_KERNEL, default=3) if conv_layers else 0,
        conv_bias=bool(conv_layers) and c.bool("conv_bias", default=False),
        clip_qkv=c.float("clip_qkv", 1e-6, 1e6, default=None) if family.clip_qkv else None,
        attention_sinks=family.attention_sinks,
        attention_gate=bool(family.attention_gate) and c.bool(family.attention_gate, default=True),
        output_gate=family.output_gate, embed_vocab=embed_vocab if embed_vocab != vocab else 0, delta=delta, **moe,
    )


def delta_net_spec(c: Fields, family: Family, layer_types, layers: int) -> tuple[DeltaNet | None, list]:
    """(DeltaNet, layer_types with its layers as full attention's, whose per-layer entries they keep) of a
    Qwen3.5 or Granite 4.0-H config (None where no layer is one); refused where no layer is attention (the
    engines' graph needs one) or the heads do not group."""
    mamba = family.delta_net == "mamba2"
    what = "a Mamba-2 mixer (mamba)" if mamba else "a gated delta net (linear_attention)"
    if not isinstance(layer_types, list) or len(layer_types) != layers:
        raise UserError(f"{c.where}: layer_types must list full_attention or linear_attention for each of the "
                        f"{layers} layers; {c.fix}")
    listed = tuple(i for i, t in enumerate(layer_types) if t == "linear_attention")
    if not listed:  # (every layer attention: no state to keep)
        return None, layer_types
    if len(listed) == layers:
        raise UserError(f"{c.where}: every layer is {what}, and awq-edge's engines take a model with attention too; "
                        f"{c.fix}")
    if mamba:
        delta = mamba_spec(c, listed)
    else:
        k_heads = c.int("linear_num_key_heads", 1, MAX_HEADS)
        v_heads = c.int("linear_num_value_heads", 1, MAX_HEADS)
        if v_heads % k_heads:
            raise UserError(f"{c.where}: linear_num_value_heads {v_heads} is not a multiple of linear_num_key_heads "
                            f"{k_heads}; {c.fix}")
        delta = DeltaNet(layers=listed, k_heads=k_heads, v_heads=v_heads,
                         k_dim=c.int("linear_key_head_dim", 1, MAX_HEAD_DIM),
                         v_dim=c.int("linear_value_head_dim", 1, MAX_HEAD_DIM),
                         kernel=c.int("linear_conv_kernel_dim", 2, MAX_CONV_KERNEL))
    if delta.conv_dim > MAX_INTERMEDIATE or delta.state_elems * 4 > MAX_DELTA_STATE:
        raise UserError(f"{c.where}: the {'Mamba-2 mixers' if mamba else 'gated delta nets'}' inputs "
                        f"({delta.conv_dim} wide) or state ({delta.state_elems * 4 >> 20} MiB a layer) are out of "
                        f"range; {c.fix}")
    return delta, ["full_attention" if t == "linear_attention" else t for t in layer_types]


def mamba_spec(c: Fields, layers: tuple) -> DeltaNet:
    """A Granite 4.0-H config's Mamba-2 mixers (transformers' GraniteMoeHybridMambaLayer) as a DeltaNet: its
    groups as key heads, its state size as their width, its heads (mamba_d_head wide, "auto": the expanded
    width over the heads) as value heads."""
    inner = c.int("mamba_expand", 1, 64) * c.int("hidden_size", 1, MAX_HIDDEN)
    heads = c.int("mamba_n_heads", 1, MAX_HEADS)
    groups = c.int("mamba_n_groups", 1, heads)
    width = inner // heads if c.raw.get("mamba_d_head", "auto") == "auto" else c.int("mamba_d_head", 1, MAX_HEAD_DIM)
    if heads * width != inner or heads % groups:
        raise UserError(f"{c.where}: mamba_n_heads {heads} x mamba_d_head {width} is not mamba_expand x hidden_size "
                        f"{inner}, or not a multiple of mamba_n_groups {groups}; {c.fix}")
    state = c.int("mamba_d_state", 1, MAX_HEAD_DIM)
    rows = 2 * inner + 2 * groups * state + heads
    if rows % 8:  # (z, x, B, C and dt: AutoAWQ's layout packs 8 rows a word)
        raise UserError(f"{c.where}: the Mamba mixers' in_proj has {rows} rows, not a multiple of 8, which 4-bit "
                        f"packing takes (mamba_n_heads {heads}); {c.fix}")
    limit = c.raw.get("time_step_limit")
    if limit is None:
        limit = (0.0, None)
    else:  # (transformers 5 writes infinity as {"__float__": "Infinity"}; older ones as JSON's Infinity)
        limit = [float("inf") if v == {"__float__": "Infinity"} else v for v in limit] if isinstance(
            limit, (list, tuple)) else limit
        if (not isinstance(limit, list) or len(limit) != 2 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in limit)
                or not limit[0] <= limit[1]):
            raise UserError(f"{c.where}: time_step_limit must be two numbers, low <= high, 0 or more; {c.fix}")
    return DeltaNet(layers=layers, k_heads=groups, v_heads=heads, k_dim=state,
                    v_dim=width, kernel=c.int("mamba_d_conv", 2, MAX_CONV_KERNEL), rule="mamba2",
                    conv_bias=c.bool("mamba_conv_bias", default=True), dt_min=float(limit[0]),
                    dt_max=None if limit[1] is None or limit[1] == float("inf") else float(limit[1]))


def experts_spec(c: Fields, family: Family, layers: int) -> dict:
    """A mixture of experts' ModelSpec fields (Family.experts_key): every layer has experts, or those Qwen3-MoE's
    decoder_sparse_step and mlp_only_layers leave, or all but LFM2-MoE's first num_dense_layers, as their
    decoder layers read them."""
    experts = c.int(family.experts_key, 1, MAX_EXPERTS)
    moe_layers = tuple(range(layers))
    if family.expert_layers == "qwen":
        step = c.int("decoder_sparse_step", 1, MAX_LAYERS, default=1)
        dense = layer_numbers(c, "mlp_only_layers", layers) if c.raw.get("mlp_only_layers") is not None else []
        moe_layers = tuple(i for i in moe_layers if i not in dense and (i + 1) % step == 0)
    elif family.expert_layers == "after_dense":
        moe_layers = moe_layers[c.int("num_dense_layers", 0, layers):]
    elif family.expert_layers == "listed" and c.raw.get("mlp_layer_types") is not None:  # (Mellum's)
        kinds = c.raw["mlp_layer_types"]
        if not isinstance(kinds, list) or len(kinds) != layers or not all(k in ("sparse", "dense") for k in kinds):
            raise UserError(f"{c.where}: mlp_layer_types must list sparse or dense for each of the {layers} layers; "
                            f"{c.fix}")
        moe_layers = tuple(i for i, kind in enumerate(kinds) if kind == "sparse")
    elif family.expert_layers == "ernie":  # (its end index -1: the last layer)
        first, interval = c.int("moe_layer_start_index", 0, MAX_LAYERS), c.int("moe_layer_interval", 1, MAX_LAYERS)
        last = c.int("moe_layer_end_index", -1, MAX_LAYERS, default=-1)
        last = layers - 1 if last == -1 else last
        moe_layers = tuple(i for i in moe_layers if first <= i <= last and (i + 1) % interval == 0)
    sigmoid = family.router == "sigmoid"
    clamped = ({"swiglu_alpha": c.float("swiglu_alpha", 1e-6, 1e6), "swiglu_limit": c.float("swiglu_limit", 1e-6, 1e6)}
               if family.expert_act == "clamped_swiglu" else {})
    if experts * len(moe_layers) > MAX_EXPERTS_IN_ALL:  # (each a checkpoint's three linears to list and check)
        raise UserError(f"{c.where}: {experts} experts in each of {len(moe_layers)} layers is more than any model has "
                        f"({MAX_EXPERTS_IN_ALL} experts in all at most); {c.fix}")
    return dict(moe_layers=moe_layers, experts=experts, experts_per_token=c.int("num_experts_per_tok", 1, experts),
                expert_width=c.int(family.expert_width_key, 1, MAX_INTERMEDIATE),
                norm_top_k=family.norm_top_k == "always" or c.bool(family.norm_top_k, default=False),
                expert_bias=family.expert_bias == "moe_statics" or (family.expert_bias == "use_expert_bias"
                                                                    and c.bool("use_expert_bias", default=True)),
                routed_scale=c.float("routed_scaling_factor", 1e-6, 1e6, default=1.0) if sigmoid else 1.0,
                shared_width=shared_width(c, family),
                shared_gate=family.shared_expert_gate, **clamped)


def shared_width(c: Fields, family: Family) -> int:
    """A mixture's shared expert's width: its own key's (Qwen2-MoE's shared_expert_intermediate_size), or
    ERNIE 4.5's moe_num_shared_experts experts' widths; 0: none."""
    if family.shared_experts_key:
        width = c.int(family.shared_experts_key, 0, 64) * c.int(family.expert_width_key, 1, MAX_INTERMEDIATE)
        if width > MAX_INTERMEDIATE:
            raise UserError(f"{c.where}: a shared expert {width} wide is out of range; {c.fix}")
        return width
    return c.int(family.shared_expert_key, 0, MAX_INTERMEDIATE) if family.shared_expert_key else 0


def layer_numbers(c: Fields, key: str, layers: int) -> list[int]:
    """A config's list of layer numbers (LFM2's full_attn_idxs, Qwen3-MoE's mlp_only_layers), each checked."""
    listed = c.raw.get(key)
    if (not isinstance(listed, list) or len(listed) > layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < layers for i in listed)):
        raise UserError(f"{c.where}: {key} must list layer numbers below {layers}; {c.fix}")
    return listed


def conv_layer_types(c: Fields, family: Family, layers: int) -> list[str]:
    """An LFM2 config without layer_types: full attention at full_attn_idxs (every layer where it
    lists none, as transformers reads it), a short convolution elsewhere; LFM3's by its rule."""
    if family.sliding_layers == "lfm3":  # (LFM3's: every 4th from 2 full, every 4th from 4 sliding)
        return ["full_attention" if i % 4 == 2 else "sliding_attention" if i % 4 == 0 and i else "conv"
                for i in range(layers)]
    if c.raw.get("full_attn_idxs") is None:
        return ["full_attention"] * layers
    listed = layer_numbers(c, "full_attn_idxs", layers)
    return ["full_attention" if i in listed else "conv" for i in range(layers)]


def layer_linear_shapes(spec: ModelSpec, layer: int | None = None) -> dict[str, tuple[int, int]]:
    """A decoder layer's quantized linears, as read (split): name in the layer -> [out, in]. An
    attention layer's unless `layer` is one of LFM2's short convolutions (conv.in_proj, conv.out_proj)."""
    h, inter = spec.hidden, spec.intermediate
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    d = spec.delta
    mixer = ({"conv.in_proj": (3 * h, h), "conv.out_proj": (h, h)} if layer in spec.conv_layers else
             {"linear_attn.in_proj_qkv": (d.conv_dim, h), "linear_attn.in_proj_z": (d.value_dim, h),
              "linear_attn.out_proj": (h, d.value_dim)} if layer in spec.delta_layers else
             {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
              "self_attn.o_proj": (h, q), **({"self_attn.out_gate_proj": (q, h)} if spec.output_gate else {})})
    if layer in spec.moe_layers:  # (gated, each expert_width wide; Qwen2-MoE's shared expert, shared_width)
        width, shared = spec.expert_width, spec.shared_width
        experts = {f"mlp.experts.{j}.{name}": shape for j in range(spec.experts) for name, shape in
                   (("gate_proj", (width, h)), ("up_proj", (width, h)), ("down_proj", (h, width)))}
        if shared:
            experts.update({"mlp.shared_expert.gate_proj": (shared, h), "mlp.shared_expert.up_proj": (shared, h),
                            "mlp.shared_expert.down_proj": (h, shared)})
        return {**mixer, **experts}
    return {**mixer, **({"mlp.gate_proj": (inter, h)} if spec.family.gated_mlp else {}),
            "mlp.up_proj": (inter, h), "mlp.down_proj": (h, inter)}


def part_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """What a fused linear's parts may be: an attention layer's linears, a mixture of experts' (Granite's shared
    expert), and a state-keeping layer's (a Mamba-2's in_proj_a too: its dt, float once read)."""
    shapes = layer_linear_shapes(spec)
    if spec.moe_layers:
        shapes.update(layer_linear_shapes(spec, spec.moe_layers[0]))
    if spec.delta:
        shapes.update(layer_linear_shapes(spec, spec.delta.layers[0]))
        shapes["linear_attn.in_proj_a"] = (spec.delta.v_heads, spec.hidden)
    return shapes


def fused_part_rows(spec: ModelSpec, parts: tuple[str, ...]) -> list[np.ndarray]:
    """The rows of a fused linear (Family.fused_linears) each of its parts takes, in order: its parts
    one after another, or (Family.fused_by_head: GPT-NeoX's query_key_value) head by head, each head's
    rows of every part in turn. The one layout checkpoint.split_fused, fuse_linears and the quantizer's
    split_fused_modules read."""
    rows = [part_shapes(spec)[part][0] for part in parts]
    if not spec.family.fused_by_head or spec.kv_heads != spec.heads:  # (StarCoder 1's multi-query: one after another)
        starts = np.cumsum([0] + rows)
        return [np.arange(start, end) for start, end in zip(starts, starts[1:])]
    per_head = [n // spec.heads for n in rows]
    starts = np.cumsum([0] + per_head)[:-1]
    head_rows = np.arange(spec.heads)[:, None] * sum(per_head)
    return [(head_rows + start + np.arange(n)).reshape(-1) for start, n in zip(starts, per_head)]


def stored_fused(spec: ModelSpec) -> list[tuple[str, tuple[str, ...], list[np.ndarray]]]:
    """The linears a checkpoint of this model stores fused, as (the fused name, its parts, the rows of it each
    part takes): the family's fused_linears, and Qwen3.5's q_proj whose rows are each head's query then its
    output gate's (Family.query_gate), read as q_proj and out_gate_proj."""
    shapes = part_shapes(spec)  # (Granite 4.0's dense models have no Mamba in_proj)
    fused = [(name, parts, fused_part_rows(spec, parts)) for name, parts in spec.family.fused_linears
             if all(part in shapes for part in parts)]
    if spec.family.query_gate:
        head = np.arange(spec.heads)[:, None] * 2 * spec.head_dim + np.arange(spec.head_dim)
        fused.append(("self_attn.q_proj", ("self_attn.q_proj", "self_attn.out_gate_proj"),
                      [head.reshape(-1), (head + spec.head_dim).reshape(-1)]))
    return fused


def fused_rows_back(rows: list[np.ndarray]) -> np.ndarray | None:
    """The fused linear's rows from its parts' (`rows`: each part's rows of it, fused_part_rows' or
    stored_fused's) stacked one after another: row j is stacked row back[j] (GPT-NeoX's, by head; Qwen3.5's
    q_proj); None where the parts are stacked in order already (every other family's)."""
    order = np.concatenate(rows)  # (stacked row r is fused row order[r])
    return None if np.array_equal(order, np.arange(order.size)) else np.argsort(order)


def all_linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Every decoder layer's quantized linears: `model.layers.{i}.{name}` -> [out, in]."""
    return {f"model.layers.{i}.{name}": shape for i in range(spec.layers)
            for name, shape in layer_linear_shapes(spec, i).items()}


def block_norms(family: Family) -> set[str]:
    """The names of a block's norms (on the hidden size): pre-norms (one in a parallel block) and post-norms."""
    pre = ("input_layernorm",) if family.parallel_block else ("input_layernorm", family.mlp_norm)
    return {*(pre if family.pre_norms else ()), *family.post_norms}


def qk_norm_widths(spec: ModelSpec) -> tuple[int, int]:
    """The q and k norms' weight sizes: one head's, or (OLMo 2) the whole projection's."""
    hd = spec.head_dim
    return (spec.heads * hd, spec.kv_heads * hd) if spec.family.qk_norm_whole else (hd, hd)


def checkpoint_shapes(spec: ModelSpec) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """What a checkpoint of this model holds: (quantized linears prefix -> [out, in], float tensors
    name -> shape). Biases and an untied lm_head are optional (checked when present)."""
    h, family = spec.hidden, spec.family
    linears, tensors = all_linear_shapes(spec), {"model.embed_tokens.weight": (spec.embed_vocab or spec.vocab, h)}
    norms = block_norms(family)
    biased = family.norm == "layer" and family.norm_bias  # (LayerNorm's: the block's norms and the final one)
    kinds = ("weight", "bias") if biased else ("weight",) if family.norm_weight else ()  # (OLMo 1's: none)
    tensors.update({f"model.norm.{kind}": (h,) for kind in kinds})
    if family.head_bias:
        tensors["lm_head.bias"] = (spec.vocab,)
    if spec.position_offset is not None:  # (GPT-2's learned positions: a row for each, from the offset on)
        tensors["model.embed_positions.weight"] = (spec.position_offset + spec.max_positions, h)
    q_norm, k_norm = qk_norm_widths(spec)
    for i in range(spec.layers):
        p = f"model.layers.{i}"
        tensors.update({f"{p}.{n}.{kind}": (h,) for n in norms for kind in kinds})
        tensors.update({f"{p}.mlp.act_fn.{n}": shape for n, shape in ACTIVATION_PARAMS.get(family.activation, ())})
        if i in spec.moe_layers:  # the router's weight (and LFM2-MoE's expert biases), float
            tensors[f"{p}.mlp.gate.weight"] = (spec.experts, h)
            if spec.expert_bias:  # (ERNIE 4.5's stored as one row)
                tensors[f"{p}.mlp.expert_bias"] = (1, spec.experts) if family.expert_bias == "moe_statics" else (
                    spec.experts,)
            if family.router_bias:  # (gpt-oss's)
                tensors[f"{p}.mlp.gate.bias"] = (spec.experts,)
            if spec.shared_width and spec.shared_gate:  # (Qwen2-MoE's)
                tensors[f"{p}.mlp.shared_expert_gate.weight"] = (1, h)
        if spec.attention_sinks and i in spec.attention_layers:  # (gpt-oss's: a logit per head)
            tensors[f"{p}.self_attn.sinks"] = (spec.heads,)
        if spec.attention_gate and i in spec.attention_layers:  # (LFM3's head gates, float: float_gates)
            tensors[f"{p}.self_attn.g_proj.weight"] = (spec.heads, h)
        if i in spec.conv_layers:  # (LFM2's) the depthwise convolution's weight [hidden, 1, kernel], float
            tensors.update({f"{p}.conv.conv.weight": (h, 1, spec.conv_kernel),
                            **({f"{p}.conv.conv.bias": (h,)} if spec.conv_bias else {})})
        elif i in spec.delta_layers:  # a, (Qwen3.5's) b, the convolution, the decay's and the norm's, float
            d, a = spec.delta, f"{p}.linear_attn"
            tensors.update({f"{a}.in_proj_a.weight": (d.v_heads, h), f"{a}.conv1d.weight": (d.conv_dim, 1, d.kernel),
                            f"{a}.dt_bias": (d.v_heads,), f"{a}.A_log": (d.v_heads,),
                            f"{a}.norm.weight": (d.v_dim if d.rule == "gated" else d.value_dim,)})
            tensors.update({f"{a}.in_proj_b.weight": (d.v_heads, h)} if d.rule == "gated" else
                           {f"{a}.D": (d.v_heads,), **({f"{a}.conv1d.bias": (d.conv_dim,)} if d.conv_bias else {})})
        elif family.qk_norm and family.norm_weight:  # (nanochat's q/k norms have no weight either)
            q_name, k_name = family.qk_norms
            tensors.update({f"{p}.{q_name}.weight": (q_norm,), f"{p}.{k_name}.weight": (k_norm,)})
    return linears, tensors


def check_checkpoint_shapes(linears: dict, tensors: dict, spec: ModelSpec, where: str) -> None:
    """The checkpoint's tensors are the ones its config describes, with the config's shapes.

    linears: prefix -> checkpoint.LinearInfo (.shape [out, in], .bias: None or its length);
    tensors: name -> array. One line names the first tensor that does not fit."""
    want_linears, want_tensors = checkpoint_shapes(spec)
    for prefix, shape in want_linears.items():
        lin = linears.get(prefix)
        if lin is None:
            raise UserError(f"{where} lacks the quantized linear {prefix}; it does not match its config.json")
        if tuple(lin.shape) != shape or (lin.bias is not None and lin.bias != shape[0]):
            raise UserError(f"{where}: {prefix} is {list(lin.shape)}, its config.json implies {list(shape)}; "
                            "the checkpoint is corrupt or belongs to another model")
    extra = sorted(set(linears) - set(want_linears))
    if extra:
        raise UserError(f"{where} holds quantized linears its config.json does not describe ({extra[0]}, ...); "
                        "the checkpoint does not match its config")
    if not spec.tie_embeddings and "lm_head.weight" in tensors:
        want_tensors["lm_head.weight"] = (spec.vocab, spec.hidden)
    for name, shape in want_tensors.items():
        if name not in tensors:
            raise UserError(f"{where} lacks the tensor {name}; it does not match its config.json")
        if tuple(tensors[name].shape) != shape:
            raise UserError(f"{where}: {name} is {list(tensors[name].shape)}, its config.json implies {list(shape)}; "
                            "the checkpoint is corrupt or belongs to another model")


def rope_tables(rope: Rope, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [positions, head_dim / 2] in float32, the turning pairs' times rope.scale (the
    others stay 1 and 0); LongRoPE's rows from long_from on from its long frequencies.

    The angle is rounded to float32 like Hugging Face's float32 `position * inv_freq`, so long
    positions (large angles) agree with the reference model to float32 rounding of cos/sin."""
    freq = np.broadcast_to(rope.inv_freq.astype(np.float32), (positions, len(rope.inv_freq)))
    if rope.long_inv_freq is not None:
        rows = np.arange(positions)[:, None] >= rope.long_from
        freq = np.where(rows, rope.long_inv_freq.astype(np.float32), freq)
    angles = np.arange(positions, dtype=np.float32)[:, None] * freq
    half = len(rope.inv_freq)
    scale = np.where(np.arange(half) < (half if rope.turning is None else rope.turning), rope.scale, 1.0)
    return ((np.cos(angles.astype(np.float64)) * scale).astype(np.float32),
            (np.sin(angles.astype(np.float64)) * scale).astype(np.float32))


def distinct_ropes(layer_rope: list[Rope]) -> tuple[list[Rope], list[int]]:
    """The distinct RoPEs, one pair of tables each (Gemma 3: local and global), in the order the
    layers first use them, and each layer's index among them."""
    index: dict[bytes, int] = {}
    ropes = []
    for rope in layer_rope:
        if rope.key() not in index:
            index[rope.key()] = len(ropes)
            ropes.append(rope)
    return ropes, [index[rope.key()] for rope in layer_rope]


def rotary_order(head_dim: int, rotary_dim: int, interleaved: bool = False, reversed_: bool = False) -> np.ndarray:
    """The engines' order of one q/k head's dimensions, as indices into the model's: the model's
    rotary pair j, (j, j + rotary_dim / 2) or interleaved (2j, 2j + 1), becomes the engines'
    (j, j + head_dim / 2); the dimensions it does not rotate fill the rest (their frequency is zero).
    reversed_ (nanochat's RoPE, which turns each pair by -angle): the pair's two dimensions swapped,
    since turning (b, a) by the angle is turning (a, b) by -angle with the result swapped back (q . k
    sees both swapped alike). The identity without partial rotary, interleaving or reversal."""
    half, turn = head_dim // 2, rotary_dim // 2
    still = half - turn  # pairs that do not turn
    first, second = ((np.arange(0, rotary_dim, 2), np.arange(1, rotary_dim, 2)) if interleaved
                     else (np.arange(turn), np.arange(turn, rotary_dim)))
    if reversed_:
        first, second = second, first
    return np.concatenate([first, np.arange(rotary_dim, rotary_dim + still),
                           second, np.arange(rotary_dim + still, head_dim)])
