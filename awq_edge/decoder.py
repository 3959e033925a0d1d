"""The decoder step of a native engine, written once: the op list every executor runs.

    spec = decoder_spec(model_spec(config), group_size)
    ops = decode_ops(spec)               # [Op("embed", ...), Op("norm", ...), ..., Op("lm_head", ...)]
    tensors = pack_weights(ckpt, spec)   # (name, array) pairs, in the kernels' layout
    layout = tensor_layout(spec)         # name -> (dtype, shape): what a cuda engine must hold

Two executors read the same list: awq_edge/reference_backend.py (numpy, the CPU twin that CI
runs against the ONNX Runtime engine) and awq_edge/cuda_backend.py (our kernels, through the
CUDA driver API). So what a step does (which norms, the fused q/k/v and gate/up linears, q/k
norms, biases, post-norms, soft-caps, sliding windows) is decided here and nowhere else.

A step feeds S new tokens. Its activations are fp16 buffers of S rows (the kernels' W4A16):
    h        [S, hidden]          the residual stream
    x        [S, hidden]          a normed copy of it, the linears' input (none without pre-norms:
                                  OLMo 2's q/k/v and gate/up read h)
    qkv      [S, (H + 2 Hkv) D]   q, k and v side by side (one fused linear)
    ctx      [S, H D]             attention output (LFM3's: each head's then times its gate, head_gate;
                                  AFMoE's: each value times its gate's sigmoid, output_gate)
    gate     [S, H D]             AFMoE: out_gate_proj(x), the gates of ctx's values
    attn     [S, hidden]          after o_proj (and a post-norm: Gemma's, GLM-4's, OLMo 2's)
    gate_up  [S, 2 I]             gate and up, rows interleaved (g0 u0 g1 u1 ...; one linear); an
                                  MLP without a gate (Arcee): up alone, [S, I] at its start
    act      [S, I]               act(gate) * up, or act(up)
    mlp      [S, hidden]          after down_proj (and a post-norm)
    mlp_x    [S, hidden]          GPT-NeoX's parallel block: the MLP's own norm of h, taken before
                                  o_proj adds into h
    bcx      [S, 3 hidden]        an LFM2 short convolution's in_proj: B, C and x side by side
    conv     [S, hidden]          C * conv(B * x), out_proj's input (the convolution reads B * x of the
                                  tokens before from its layer's store: awq_short_conv)
    dqkvz    [S, Cq + Hv Dv]      a Qwen3.5 delta net's in_proj_qkv and in_proj_z (one linear): q, k and v
                                  (Cq wide; a Granite 4.0-H Mamba-2's x, B and C), through its convolution
                                  and SiLU in place (delta_conv), then z
    dout     [S, Hv Dv]           the delta net's output, out_proj's input (delta_rule: its state S a value
                                  head, float32, kept by the executor as the convolution's last inputs; a
                                  Mamba-2's mamba_rule, then group_norm in place)
    ordered  [S, K]               a linear's input in the order its levels are stored (GPTQ
                                  act-order engines only: a gather op before each linear)
    logits   [V] float32          the last row's, after the final soft-cap
In the fused op list (the default) the norms run in the next linear's prologue, the activation and
the residual adds in the linears' epilogues (decode_ops); unfused, the residual add is fused into
the next norm (add_norm: h += pending; x = norm(h)), as the ONNX graph does; without pre-norms
(OLMo 2) the add is an op of its own (add: h += pending). A LayerNorm (Nemotron, StableLM, Cohere,
Jais 2: a norm op's `bias`) is always an op: the GEMV prologue computes RMSNorm only. A parallel
block's MLP (Cohere's) reads the attention's input x; GPT-NeoX's, mlp_x. The final norm and the
lm_head run on the last row only.

Weights, in the kernels' layout (plugins/README.md): each linear as `{name}.qweight` int32 [N, K/8]
(AWQ nibble order), `.scales` and `.zeros` fp16 [N, groups] (+ `.bias` fp16 [N]); q/k/v concatenated
along N, gate/up with their rows interleaved (gate row j at 2j, up row j at 2j + 1: a GEMV block
holds both halves of its outputs; without a gate, up_proj as it is); norms as float32 (w + the
family's offset: Gemma's 1 + w; a LayerNorm's bias as it is); the head as int8 rows with an fp16
scale per 32 values (`lm_head.q8`, `lm_head.q8_scales`: spec.lm_head "int8", the default, half the
bytes per token), as fp16 (`lm_head.weight`, or the embedding's table when tied), or as a 4-bit
linear like the others (`lm_head.q4` at group 32, rows padded to a multiple of 8: "int4", under a
third of the bytes), whose top HEAD_TOP_K logits are then recomputed from the fp16 table, as the CPU
engine's graph does; a head's bias (Phi's) as `lm_head.bias` float32 [V]; an LFM2 short
convolution's weight as float32 [hidden, kernel] (`{layer}.conv.conv.weight`, + `.bias` [hidden]); the embedding as int8
rows too (`model.embed_tokens.q8`, `.q8_scales`; a tied model's are `lm_head.q8`), or fp16
`model.embed_tokens.weight` where a tied head keeps it (embed_table); learned positions (GPT-2's, OPT's)
as fp16 `model.embed_positions` [max_positions, hidden], which the embed op adds; RoPE tables fp16
[max_positions, D/2] per distinct frequency set; a GPTQ act-order linear's permutation of its
inputs as int32 `{name}.input_order` [K]; attention sinks (gpt-oss's, Granite SWA's: a logit per head
in its softmax's denominator) as float32 `{layer}.self_attn.sinks` [H]; LFM3's head gates as float32
`{layer}.self_attn.g_proj.weight` [H, hidden]; a Qwen3.5 delta net's convolution as float32 [Cq, kernel]
(`{layer}.linear_attn.conv1d.weight`), its b and a float32 [Hv, hidden] (`.in_proj_b.weight`,
`.in_proj_a.weight`), `.dt_bias` and `.decay_rate` (-exp(A_log)) float32 [Hv], its norm float32 [Dv]
(`.norm.weight`, no offset: a plain weight); a Mamba-2's the same but b, with its convolution's bias float32
[Cq] (`.conv1d.bias`), D float32 [Hv] (`.D`) and its norm float32 [Hv Dv]; a mixture of experts' router
and experts as experts_layout says.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from .errors import UserError
from .packing import INT8_BLOCK

ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_tanh", "gelu": "gelu", "relu2": "relu2", "relu": "relu",
               "xielu": "xielu"}
# activations with parameters in each layer (`{mlp}.act_fn.xielu`: export.spec.xielu_constants): an act op of their own,
# never the GEMV's act epilogue
PARAMETERIZED_ACTIVATIONS = ("xielu",)


@dataclass(frozen=True)
class DecoderSpec:
    """What the op list needs of a model (from export.spec.ModelSpec and the checkpoint)."""
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    max_positions: int
    group_size: int
    tie_embeddings: bool
    norm_offset: float             # Gemma: 1.0 (the norm multiplies by 1 + w)
    layer_norm: bool               # LayerNorms with a bias (Nemotron, ...): norm ops' `bias`, no prologue norms
    parallel_block: bool           # Cohere: the MLP reads the attention's input x too (no MLP norm)
    parallel_norms: bool           # GPT-NeoX: the MLP reads its own norm of h as attention found it (buffer mlp_x)
    qk_norm: bool                  # Qwen3, Gemma3, OLMo 2
    qk_norm_whole: bool            # OLMo 2: q/k norms over the whole projection, not per head
    qk_norms: tuple                # the q and k norms' names in a block
    qk_norm_after_rope: bool       # Hunyuan: q and k rotated in place (a rope op) before their norms
    pre_norms: bool                # False (OLMo 2): q/k/v and gate/up read h itself
    post_norms: tuple              # norms after attention and the MLP (Gemma, GLM-4): their names, or ()
    qkv_bias: bool                 # Qwen2 (and any checkpoint whose q/k/v carry a bias)
    embed_scale: float | None      # embeddings times this (Gemma: sqrt(hidden); Granite's multiplier)
    # GPT-2, OPT: the embed op adds the position's row of the learned table, which is the checkpoint's
    # model.embed_positions from this offset on (OPT's 2; POSITIONS_TABLE); None: RoPE
    position_offset: int | None
    activation: str                # silu | gelu_tanh | gelu | relu2 | relu | xielu
    gated_mlp: bool                # act(gate) * up; False (Arcee): act(up), no gate
    mlp_norm: str                  # the norm before gate/up
    attn_scale: float
    attn_softcap: float            # 0: none
    final_softcap: float           # 0: none
    layer_windows: tuple           # per layer: sliding window or 0
    layer_rope: tuple              # per layer: index of its RoPE table
    ropes: tuple = field(repr=False)  # per table: its export.spec.Rope
    lm_head: str = "int8"          # the head in the engine: LM_HEADS
    act_order: bool = False        # GPTQ act-order: each linear's input gathered into its order first
    out_bias: bool = False         # o_proj, gate/up and down carry biases (ERNIE 4.5's use_bias, Jais 2's)
    head_bias: bool = False        # Phi: the logits get lm_head.bias (float32 [V]) before the soft-cap
    embed_norm: bool = False       # nanochat: h normed after the embedding (model.embed_norm, a norm op)
    conv_layers: tuple = ()        # LFM2: the layers that are short convolutions (a short_conv op), not attention
    conv_kernel: int = 0           # the tokens a short convolution reads (its own and kernel - 1 before it)
    conv_bias: bool = False        # in_proj, out_proj and the convolution carry biases
    clip_qkv: float = 0.0          # OLMo 1: q, k and v clamped to +-this after their linear (a clamp op); 0: none
    # a mixture of experts (export.spec.ModelSpec's): its layers' MLP is one moe op (the native CPU decode's alone)
    moe_layers: tuple = ()
    experts: int = 0
    experts_per_token: int = 0
    expert_width: int = 0
    norm_top_k: bool = False
    sigmoid_router: bool = False   # LFM2-MoE: the weights the logits' sigmoids, chosen with mlp.expert_bias added
    expert_bias: bool = False
    routed_scale: float = 1.0      # the chosen's weights times this (LFM2-MoE's routed_scaling_factor)
    router_bias: bool = False      # gpt-oss: mlp.gate.bias on the router's logits
    swiglu_alpha: float = 1.0      # gpt-oss: its experts' clamped SwiGLU, where swiglu_limit > 0
    swiglu_limit: float = 0.0
    attention_sinks: bool = False  # gpt-oss, Granite SWA: each head's sink (self_attn.sinks), a softmax's denominator
    shared_width: int = 0          # Qwen2-MoE: its shared expert's width (0: none), an MLP the moe op adds in
    shared_gate: bool = False      # ... times sigmoid(mlp.shared_expert_gate . x)
    attention_gate: bool = False   # LFM3: head j's ctx times sigmoid(self_attn.g_proj.weight[j] . x) (head_gate)
    output_gate: bool = False      # AFMoE: ctx times sigmoid(self_attn.out_gate_proj(x)), value by value (output_gate)
    delta: object = None           # Qwen3.5: its export.spec.DeltaNet (delta_conv and delta_rule ops), or None

    @property
    def qkv_width(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    @property
    def delta_layers(self) -> tuple:
        return self.delta.layers if self.delta else ()

    @property
    def attention_layers(self) -> list[int]:
        return [i for i in range(self.layers) if i not in self.conv_layers and i not in self.delta_layers]

    @property
    def kv_bytes_per_token(self) -> int:
        """fp16 cache of one token: K and V of every attention layer (what the attention kernels
        write), and B * x of every short convolution (awq_short_conv's store)."""
        return (2 * len(self.attention_layers) * self.kv_heads * self.head_dim * 2
                + len(self.conv_layers) * self.hidden * 2)


# the head in an engine: int8 rows (blocks of 32, fp16 scales), a 4-bit linear whose top HEAD_TOP_K
# logits are re-scored with the fp16 table, or the fp16 table itself
LM_HEADS = ("int8", "int4", "fp16")
HEAD_DIMS = (64, 80, 96, 128, 256)  # what plugins/kernels/attention.cu's kernels take (80: EXAONE 3.5 2.4B;
                                   # 96: Phi-3 and 3.5-mini)
# GPT-2's, OPT's learned positions in an engine: fp16 [max_positions, hidden], row p position p's (the
# checkpoint's model.embed_positions.weight from its offset on); the ONNX graph's initializer of that name too
POSITIONS_TABLE = "model.embed_positions"
HEAD_TOP_K = 64                  # an int4 head's candidates re-scored each step (as export's default)
HEAD_INT4_GROUP = 32             # an int4 head's group size, whatever the body's (as the CPU engine's head):
                                 # a full softmax sums its approximate tail (benchmarks/cuda_head_quality.py)
HEAD_SELECT_CAPACITY = 8192      # plugins/kernels/head_top_k.cu: keys a block selects among


def decoder_spec(model, group_size: int, qkv_bias: bool = False, lm_head: str = "int8",
                 act_order: bool = False, out_bias: bool = False, positions: int | None = None,
                 experts: bool = False) -> DecoderSpec:
    """A DecoderSpec from an export.spec.ModelSpec (a checked config), the group size, which
    linears carry biases (checkpoint_biases), the head's kind, and whether the linears are GPTQ
    act-order ones; positions: the RoPE tables' rows, where fewer than the model's (an engine
    built for a shorter context: cuda_build.rope_sized_to_context); experts: the caller is the native
    CPU decode, whose moe op takes any expert width."""
    family = model.family
    if model.moe_layers and (model.expert_width % 8 or model.hidden % 8) and not experts:
        raise UserError(f"{model.model_type}'s experts ({model.expert_width} wide, hidden {model.hidden}) are not "
                        "multiples of 8, which the cuda backend's expert GEMV takes; build for the CPU (--device cpu)")
    if model.delta and max(model.delta.k_dim, model.delta.v_dim) > 256:  # (cuda_backend.DELTA_THREADS)
        raise UserError(f"{model.model_type}'s delta-net heads ({model.delta.k_dim} and {model.delta.v_dim} wide) are "
                        "wider than the cuda backend's delta-net kernel takes (256); use the CPU engine (--device cpu)")
    if model.head_dim not in HEAD_DIMS:
        raise UserError(f"head_dim {model.head_dim} is not supported by the cuda backend's attention kernel "
                        f"({', '.join(map(str, HEAD_DIMS))}); use the CPU engine (--device cpu)")
    if lm_head not in LM_HEADS:
        raise UserError(f"lm_head {lm_head!r} is not one of {', '.join(LM_HEADS)}")
    if lm_head == "int4" and family.head_bias:
        raise UserError(f"{model.model_type}'s head has a bias, which the int4 head's kernels do not add; build with "
                        "--lm-head int8 (the default) or fp16")
    if lm_head == "int4" and model.vocab > HEAD_SELECT_CAPACITY ** 2 // HEAD_TOP_K:
        raise UserError(f"a vocabulary of {model.vocab} is more than the int4 head's candidate search takes "
                        f"({HEAD_SELECT_CAPACITY ** 2 // HEAD_TOP_K}); build with --lm-head int8")
    from .export.spec import distinct_ropes

    ropes, layer_rope = distinct_ropes(model.layer_rope)
    return DecoderSpec(
        model_type=model.model_type, hidden=model.hidden, intermediate=model.intermediate, layers=model.layers,
        heads=model.heads, kv_heads=model.kv_heads, head_dim=model.head_dim, vocab=model.vocab, eps=model.eps,
        max_positions=min(model.max_positions, positions or model.max_positions), group_size=group_size,
        tie_embeddings=model.tie_embeddings,
        norm_offset=family.norm_offset, layer_norm=family.norm == "layer", parallel_block=family.parallel_block,
        parallel_norms=model.parallel_norms,
        qk_norm=family.qk_norm, qk_norm_whole=family.qk_norm_whole, qk_norms=family.qk_norms,
        qk_norm_after_rope=family.qk_norm_after_rope,
        pre_norms=family.pre_norms, post_norms=family.post_norms,
        qkv_bias=family.qkv_bias or qkv_bias, embed_scale=model.embed_multiplier,
        position_offset=model.position_offset,
        activation=ACTIVATIONS[family.activation], gated_mlp=family.gated_mlp, mlp_norm=family.mlp_norm,
        attn_scale=model.attn_scale,
        attn_softcap=float(model.attn_softcap or 0.0), final_softcap=float(model.final_softcap or 0.0),
        layer_windows=tuple(int(w or 0) for w in model.layer_windows), layer_rope=tuple(layer_rope),
        ropes=tuple(ropes), lm_head=lm_head, act_order=act_order, out_bias=out_bias, head_bias=family.head_bias,
        embed_norm=family.embed_norm, conv_layers=tuple(model.conv_layers), conv_kernel=model.conv_kernel,
        conv_bias=model.conv_bias, clip_qkv=float(model.clip_qkv or 0.0), moe_layers=tuple(model.moe_layers),
        experts=model.experts, experts_per_token=model.experts_per_token, expert_width=model.expert_width,
        norm_top_k=model.norm_top_k, sigmoid_router=family.router == "sigmoid", expert_bias=model.expert_bias,
        routed_scale=model.routed_scale, router_bias=family.router_bias, swiglu_alpha=model.swiglu_alpha,
        swiglu_limit=float(model.swiglu_limit or 0.0), attention_sinks=model.attention_sinks,
        shared_width=model.shared_width, shared_gate=model.shared_gate, attention_gate=model.attention_gate,
        output_gate=model.output_gate, delta=model.delta)


# ---------------------------------------------------------------- the op list

@dataclass(frozen=True)
class Op:
    """One kernel launch of a step. args: buffer names (x, out, ...), tensor names (weight, ...)
    and sizes; each executor maps `kind` to its implementation."""
    kind: str
    args: dict


def decode_ops(spec: DecoderSpec, fused: bool = True) -> list[Op]:
    """Every op of one decoder step, in order (the module docstring names the buffers).

    fused (the default): the norms before q/k/v and gate/up run in those linears' prologue, RoPE
    and the KV-cache write in q/k/v's epilogue (not with q/k norms, which come between), the
    activation in gate/up's epilogue, the residual adds in o_proj's and down's epilogues, so a
    Llama layer is 4 linears and the attention. Gemma 3's sandwich norms sit between a linear and
    its residual add, so there the adds stay in add_norm ops. fused=False lists one op per step
    of the arithmetic; both lists compute the same numbers (the twins round at the same places).
    An act-order engine gathers each linear's input into its order first (a gather op), so there
    the norms are ops of their own in either list.
    """
    H, Hkv, D = spec.heads, spec.kv_heads, spec.head_dim
    table, scales = embed_table(spec)
    ops = [Op("embed", {"out": "h", "table": table, "scales": scales, "scale": spec.embed_scale,
                        "positions": None if spec.position_offset is None else POSITIONS_TABLE})]

    def norm_args(weight: str) -> dict:
        """A pre-norm's or the final norm's tensors: its weight, and a LayerNorm's bias (else None)."""
        return {"weight": weight, "bias": weight.removesuffix(".weight") + ".bias" if spec.layer_norm else None}

    if spec.embed_norm:  # in place, on every row
        ops.append(Op("norm", {"x": "h", "out": "h", **norm_args("model.embed_norm.weight")}))
    fuse_residual = fused and not spec.post_norms
    pending = None  # a buffer not yet added into h: the next norm adds it (add_norm)

    def normed_input(weight: str, kept: bool = False) -> tuple[str, str | None]:
        """(the linear's input buffer, the norm its prologue applies): the norm of h, fused or not,
        with the pending buffer added into h first (it is then no longer pending). Without pre-norms
        (OLMo 2) h itself, the pending buffer added by an add op. kept: the norm in x, never in a
        prologue (LFM3's and AFMoE's gates read it after the attention)."""
        nonlocal pending
        if not spec.pre_norms:
            if pending is not None:
                ops.append(Op("add", {"x": pending, "residual": "h"}))
            pending = None
            return "h", None
        if (fused and pending is None and not spec.act_order and not spec.layer_norm and not spec.parallel_block
                and not kept):
            return "h", weight
        ops.append(Op("norm", {"x": "h", "out": "x", **norm_args(weight)}) if pending is None else
                   Op("add_norm", {"x": pending, "residual": "h", "out": "x", **norm_args(weight)}))
        pending = None
        return "x", None

    def residual_linear(x: str, weight: str, k: int, bias: bool, out: str, post_norm: str | None = None):
        """A linear whose output the residual stream takes (o_proj, an LFM2 out_proj, down): added into h
        in its epilogue where fused, else into `out` (then its post-norm), which is returned: pending, for
        the next norm's add (None where fused)."""
        if fuse_residual:
            ops.append(linear_op(x, "h", weight, spec.hidden, k, bias, epilogue="residual"))
            return None
        ops.append(linear_op(x, out, weight, spec.hidden, k, bias))
        if post_norm:
            ops.append(Op("norm", {"x": out, "out": out, "weight": post_norm, "bias": None}))
        return out

    def in_order(x: str, weight: str, k: int) -> str:
        """The buffer the linear `weight` reads: x, or x gathered into its act-order."""
        if not spec.act_order:
            return x
        ops.append(Op("gather", {"x": x, "out": "ordered", "order": f"{weight}.input_order", "n": k}))
        return "ordered"

    for i in range(spec.layers):
        p = f"model.layers.{i}"
        # (LFM3's and AFMoE's gates, a delta net's b and a, read the normed input after a linear: x, not a prologue)
        kept = i in spec.delta_layers or (spec.attention_gate or spec.output_gate) and i in spec.attention_layers
        normed, norm = normed_input(f"{p}.input_layernorm.weight", kept=kept)
        if spec.parallel_norms:  # (GPT-NeoX) the MLP's norm of h now: o_proj's epilogue adds into h
            ops.append(Op("norm", {"x": "h", "out": "mlp_x", **norm_args(f"{p}.{spec.mlp_norm}.weight")}))
        if i in spec.conv_layers:  # (LFM2's) out_proj(C * conv(B * x)), B, C and x from in_proj
            x = in_order(normed, f"{p}.conv.in_proj", spec.hidden)
            ops.append(linear_op(x, "bcx", f"{p}.conv.in_proj", 3 * spec.hidden, spec.hidden, spec.conv_bias, norm))
            ops.append(Op("short_conv", {"x": "bcx", "out": "conv", "layer": i, "weight": f"{p}.conv.conv.weight",
                                         "bias": f"{p}.conv.conv.bias" if spec.conv_bias else None}))
            conv = in_order("conv", f"{p}.conv.out_proj", spec.hidden)
            pending = residual_linear(conv, f"{p}.conv.out_proj", spec.hidden, spec.conv_bias, "attn",
                                      f"{p}.{spec.post_norms[0]}.weight" if spec.post_norms else None)
        elif i in spec.delta_layers:  # q, k, v and z by one linear; the convolution, then the rule (a Mamba-2's
            d, la = spec.delta, f"{p}.linear_attn"  # gated norm by group after it)
            x = in_order(normed, f"{la}.in_proj_qkvz", spec.hidden)
            ops.append(linear_op(x, "dqkvz", f"{la}.in_proj_qkvz", d.conv_dim + d.value_dim, spec.hidden, norm=norm))
            ops.append(Op("delta_conv", {"x": "dqkvz", "layer": i, "weight": f"{la}.conv1d.weight",
                                         "bias": f"{la}.conv1d.bias" if d.conv_bias else None}))
            rule = {"x": "dqkvz", "normed": normed, "out": "dout", "layer": i, "a": f"{la}.in_proj_a.weight",
                    "dt_bias": f"{la}.dt_bias", "rate": f"{la}.decay_rate"}
            if d.rule == "gated":
                ops.append(Op("delta_rule", {**rule, "b": f"{la}.in_proj_b.weight", "norm": f"{la}.norm.weight"}))
            else:
                ops.append(Op("mamba_rule", {**rule, "skip": f"{la}.D"}))
                ops.append(Op("group_norm", {"x": "dout", "weight": f"{la}.norm.weight", "groups": d.k_heads}))
            out = in_order("dout", f"{la}.out_proj", d.value_dim)
            pending = residual_linear(out, f"{la}.out_proj", d.value_dim, False, "attn",
                                      f"{p}.{spec.post_norms[0]}.weight" if spec.post_norms else None)
        else:
            # q/k norms, and OLMo 1's clamp, must see q and k before RoPE
            rope_in_linear = fused and not spec.qk_norm and not spec.clip_qkv
            x = in_order(normed, f"{p}.self_attn.qkv_proj", spec.hidden)
            in_linear = {"epilogue": "rope", "layer": i, "rope": spec.layer_rope[i]} if rope_in_linear else {}
            ops.append(linear_op(x, "qkv", f"{p}.self_attn.qkv_proj", spec.qkv_width, spec.hidden, spec.qkv_bias, norm,
                                 **in_linear))
            if spec.clip_qkv:
                ops.append(Op("clamp", {"x": "qkv", "n": spec.qkv_width, "limit": spec.clip_qkv}))
            rope = spec.layer_rope[i]
            if spec.qk_norm_after_rope:  # q and k rotated in place first; the attention then rotates nothing
                ops.append(Op("rope", {"qkv": "qkv", "heads": H + Hkv, "rope": rope}))
                rope = None
            if spec.qk_norm:  # per head, or (OLMo 2) one norm over all heads
                q_heads, kv_heads, size = (1, 1, None) if spec.qk_norm_whole else (H, Hkv, D)
                ops.append(Op("head_norm", {"x": "qkv", "offset": 0, "heads": q_heads, "size": size or H * D,
                                            "weight": f"{p}.{spec.qk_norms[0]}.weight"}))
                ops.append(Op("head_norm", {"x": "qkv", "offset": H * D, "heads": kv_heads, "size": size or Hkv * D,
                                            "weight": f"{p}.{spec.qk_norms[1]}.weight"}))
            ops.append(Op("attention", {"qkv": "qkv", "out": "ctx", "layer": i, "rope": rope,
                                        "window": spec.layer_windows[i], "rotated": rope_in_linear,
                                        "sinks": f"{p}.self_attn.sinks" if spec.attention_sinks else None}))
            if spec.attention_gate:  # (LFM3's) each head's output times sigmoid(its gate row . x), in place
                ops.append(Op("head_gate", {"x": normed, "ctx": "ctx", "weight": f"{p}.self_attn.g_proj.weight",
                                            "heads": H, "size": D}))
            if spec.output_gate:  # (AFMoE's) each value times the sigmoid of its gate, in place
                gate_x = in_order(normed, f"{p}.self_attn.out_gate_proj", spec.hidden)
                ops.append(linear_op(gate_x, "gate", f"{p}.self_attn.out_gate_proj", H * D, spec.hidden))
                ops.append(Op("output_gate", {"x": "gate", "ctx": "ctx", "n": H * D}))
            ctx = in_order("ctx", f"{p}.self_attn.o_proj", H * D)
            pending = residual_linear(ctx, f"{p}.self_attn.o_proj", H * D, spec.out_bias, "attn",
                                      f"{p}.{spec.post_norms[0]}.weight" if spec.post_norms else None)
        if spec.parallel_block or spec.parallel_norms:  # the MLP reads the attention's normed input or its own
            if pending:
                ops.append(Op("add", {"x": pending, "residual": "h"}))
            x, norm, pending = "mlp_x" if spec.parallel_norms else normed, None, None
        else:
            x, norm = normed_input(f"{p}.{spec.mlp_norm}.weight")
        if i in spec.moe_layers and spec.shared_width:  # (Qwen2-MoE's shared expert into `shared`, first)
            shared = f"{p}.mlp.shared_expert"
            ops.append(linear_op(x, "gate_up", f"{shared}.gate_up_proj", 2 * spec.shared_width, spec.hidden, norm=norm))
            ops.append(Op("act", {"x": "gate_up", "out": "act", "kind": spec.activation, "gated": True, "params": None,
                                  "n": spec.shared_width}))
            ops.append(linear_op("act", "shared", f"{shared}.down_proj", spec.hidden, spec.shared_width))
        if i in spec.moe_layers:  # (a mixture of experts' pieces: the ORT graph's QMoE initializers)
            ops.append(Op("moe", {"x": x, "out": "mlp", "norm": norm, "router": f"{p}.mlp.gate.weight",
                                  "experts": f"{p}.mlp.experts", "n": spec.expert_width, "k": spec.hidden,
                                  "count": spec.experts, "top_k": spec.experts_per_token,
                                  "normalize": spec.norm_top_k, "sigmoid": spec.sigmoid_router,
                                  "bias": f"{p}.mlp.expert_bias" if spec.expert_bias else None,
                                  "scale": spec.routed_scale,
                                  "router_bias": f"{p}.mlp.gate.bias" if spec.router_bias else None,
                                  "swiglu": (spec.swiglu_alpha, spec.swiglu_limit) if spec.swiglu_limit else None,
                                  "shared": "shared" if spec.shared_width else None,
                                  "shared_gate": f"{p}.mlp.shared_expert_gate.weight" if spec.shared_gate else None}))
            if spec.post_norms:  # (AFMoE's sandwich norm after the mixture)
                ops.append(Op("norm", {"x": "mlp", "out": "mlp", "weight": f"{p}.{spec.post_norms[1]}.weight",
                                       "bias": None}))
            pending = "mlp"
            continue
        gate_up, width = (f"{p}.mlp.gate_up_proj", 2) if spec.gated_mlp else (f"{p}.mlp.up_proj", 1)
        x = in_order(x, gate_up, spec.hidden)
        params = f"{p}.mlp.act_fn.{spec.activation}" if spec.activation in PARAMETERIZED_ACTIVATIONS else None
        if fused and not params:
            ops.append(linear_op(x, "act", gate_up, width * spec.intermediate, spec.hidden, spec.out_bias, norm=norm,
                                 epilogue="act", act=spec.activation, gated=spec.gated_mlp))
        else:
            ops.append(linear_op(x, "gate_up", gate_up, width * spec.intermediate, spec.hidden, spec.out_bias,
                                 norm=norm if fused else None))
            ops.append(Op("act", {"x": "gate_up", "out": "act", "kind": spec.activation, "gated": spec.gated_mlp,
                                  "params": params, "n": spec.intermediate}))
        act = in_order("act", f"{p}.mlp.down_proj", spec.intermediate)
        pending = residual_linear(act, f"{p}.mlp.down_proj", spec.intermediate, spec.out_bias, "mlp",
                                  f"{p}.{spec.post_norms[1]}.weight" if spec.post_norms else None)
    final = {"out": "x", **norm_args("model.norm.weight"), "last_row": True}
    ops.append(Op("add_norm", {"x": pending, "residual": "h", **final}) if pending else Op("norm", {"x": "h", **final}))
    heads = {"int8": {"bits": 8, "table": "lm_head.q8", "scales": "lm_head.q8_scales"},
             "int4": {"bits": 4, "weight": "lm_head.q4", "N": padded_vocab(spec), "K": spec.hidden,
                      "group_size": HEAD_INT4_GROUP, "exact": lm_head_table(spec),
                      "top_k": min(HEAD_TOP_K, spec.vocab)},
             "fp16": {"bits": 16, "table": lm_head_table(spec)}}
    ops.append(Op("lm_head", {"x": "x", "out": "logits", **heads[spec.lm_head], "softcap": spec.final_softcap,
                              "bias": "lm_head.bias" if spec.head_bias else None}))
    return ops


def padded_vocab(spec: DecoderSpec) -> int:
    """Rows of an int4 head: the vocabulary rounded up to 8 (the GEMV's rows come 8 at a time);
    the rows past it are zeros, and their logits are never written."""
    return -(-spec.vocab // 8) * 8


def head_slices(vocab: int) -> tuple[int, int]:
    """(slices, slice length) of an int4 head's candidate search: each slice's top HEAD_TOP_K,
    then the top of those; both fit HEAD_SELECT_CAPACITY keys (so vocab <= 128 x 8192)."""
    length = max(2048, -(-vocab // (HEAD_SELECT_CAPACITY // HEAD_TOP_K)))
    return -(-vocab // length), length


def linear_op(x: str, out: str, name: str, n: int, k: int, bias: bool = False, norm: str | None = None,
              epilogue: str = "store", act: str | None = None, gated: bool = True, layer: int | None = None,
              rope: int | None = None) -> Op:
    """out = epilogue(norm(x) @ W^T + bias). norm: an RMSNorm weight applied to x first (the
    prologue). epilogue: store | act (out = act(gate) * up of the row-interleaved gate/up result,
    N / 2 wide; not gated: act(result), N wide) | residual (out += the result; out is h) | rope
    (the q/k/v result rotated with RoPE table `rope`, q kept for the attention, k and v written
    into `layer`'s cache row, as the attention op does otherwise; its attention op then has
    rotated=True)."""
    return Op("linear", {"x": x, "out": out, "weight": name, "N": n, "K": k, "bias": bias, "norm": norm,
                         "epilogue": epilogue, "act": act, "gated": gated, "layer": layer, "rope": rope})


def lm_head_table(spec: DecoderSpec) -> str:
    """The fp16 table of an fp16 head, or of an int4 head's re-scoring."""
    return "model.embed_tokens.weight" if spec.tie_embeddings else "lm_head.weight"


def embed_table(spec: DecoderSpec) -> tuple[str, str | None]:
    """(table, its int8 scales or None) the embedding reads: int8 rows with an fp16 scale per 32
    values (a tied model's are the int8 head's own), unless a tied model keeps its fp16 table for
    the head anyway (--lm-head int4 or float). Half the bytes of fp16 or none at all: 0.3-1.3 GB
    for the 150k-262k vocabularies of Qwen, Llama 3 and Gemma 3; perplexity unchanged to 4
    digits on SmolLM2 (benchmarks/embedding_int8_quality.py)."""
    if spec.tie_embeddings:
        return ("lm_head.q8", "lm_head.q8_scales") if spec.lm_head == "int8" else ("model.embed_tokens.weight", None)
    return "model.embed_tokens.q8", "model.embed_tokens.q8_scales"


def buffer_shapes(spec: DecoderSpec, rows: int) -> dict[str, tuple]:
    """The activation buffers of a step of `rows` tokens (fp16, but logits float32)."""
    width = max(spec.intermediate, spec.shared_width)  # (Qwen2-MoE's shared expert's gate_up and act here too)
    shapes = {"h": (rows, spec.hidden), "x": (rows, spec.hidden), "qkv": (rows, spec.qkv_width),
              "ctx": (rows, spec.heads * spec.head_dim), "attn": (rows, spec.hidden),
              "gate_up": (rows, (2 if spec.gated_mlp else 1) * width), "act": (rows, width),
              "mlp": (rows, spec.hidden), "logits": (spec.vocab,)}
    if spec.shared_width:
        shapes["shared"] = (rows, spec.hidden)
    if spec.moe_layers:  # (the cuda backend's moe op: each slot's act and output; the chosen ids (int32)
        # and weights (float32) in fp16 units; its normed input goes to x, as a linear's prefill norm)
        k = spec.experts_per_token
        shapes.update(moe_act=(rows, k * spec.expert_width), moe_out=(rows, k * spec.hidden),
                      moe_ids=(rows, 2 * k), moe_weights=(rows, 2 * k))
        if spec.swiglu_limit:  # (gpt-oss's gate/up before its clamped SwiGLU, an op of its own)
            shapes["moe_gate_up"] = (rows, 2 * k * spec.expert_width)
    if spec.parallel_norms:
        shapes["mlp_x"] = (rows, spec.hidden)
    if spec.output_gate:
        shapes["gate"] = (rows, spec.heads * spec.head_dim)
    if spec.conv_layers:
        shapes.update(bcx=(rows, 3 * spec.hidden), conv=(rows, spec.hidden))
    if spec.delta:
        shapes.update(dqkvz=(rows, spec.delta.conv_dim + spec.delta.value_dim), dout=(rows, spec.delta.value_dim))
    if spec.act_order:
        shapes["ordered"] = (rows, max(spec.hidden, spec.heads * spec.head_dim, spec.intermediate))
    return shapes


def step_ids(ids, position: int, max_context: int, vocab: int) -> np.ndarray:
    """The ids of a step as int64 [S], checked: at least one, room in the context, in the vocabulary."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        raise UserError("forward needs at least one token id")
    if position + ids.size > max_context:
        raise UserError(f"context full: {position} cached + {ids.size} new tokens exceeds "
                        f"max_context {max_context}; rewind or start a longer context")
    if ids.min() < 0 or ids.max() >= vocab:
        raise UserError(f"token id out of range 0..{vocab - 1}")
    return ids


# ---------------------------------------------------------------- weights in the kernels' layout

def tensor_layout(spec: DecoderSpec) -> dict[str, tuple[str, tuple]]:
    """name -> (dtype, shape) of every tensor a native engine holds for this spec."""
    g = spec.group_size
    layout = {}
    rows8 = (spec.vocab, spec.hidden), (spec.vocab, -(-spec.hidden // INT8_BLOCK))
    table, scales = embed_table(spec)
    if scales is None:
        layout[table] = ("float16", (spec.vocab, spec.hidden))
    elif table == "model.embed_tokens.q8":
        layout[table], layout[scales] = ("int8", rows8[0]), ("float16", rows8[1])
    if spec.lm_head == "int8":  # (an untied model's fp16 head is then not needed)
        layout["lm_head.q8"], layout["lm_head.q8_scales"] = ("int8", rows8[0]), ("float16", rows8[1])
    else:  # fp16, or int4's exact table for the re-scoring
        if not spec.tie_embeddings:
            layout["lm_head.weight"] = ("float16", (spec.vocab, spec.hidden))
        if spec.lm_head == "int4":
            n, k = padded_vocab(spec), spec.hidden
            layout["lm_head.q4.qweight"] = ("int32", (n, k // 8))
            layout["lm_head.q4.scales"] = ("float16", (n, -(-k // HEAD_INT4_GROUP)))
            layout["lm_head.q4.zeros"] = ("float16", (n, -(-k // HEAD_INT4_GROUP)))
    if spec.head_bias:
        layout["lm_head.bias"] = ("float32", (spec.vocab,))
    layout["model.norm.weight"] = ("float32", (spec.hidden,))
    if spec.position_offset is not None:
        layout[POSITIONS_TABLE] = ("float16", (spec.max_positions, spec.hidden))
    for j in range(len(spec.ropes)):
        for kind in ("cos", "sin"):
            layout[f"rope.{j}.{kind}"] = ("float16", (spec.max_positions, spec.head_dim // 2))
    for op in decode_ops(spec):
        a = op.args
        if op.kind == "linear":
            n, k = a["N"], a["K"]
            layout[f"{a['weight']}.qweight"] = ("int32", (n, k // 8))
            layout[f"{a['weight']}.scales"] = ("float16", (n, -(-k // g)))
            layout[f"{a['weight']}.zeros"] = ("float16", (n, -(-k // g)))
            if a["bias"]:
                layout[f"{a['weight']}.bias"] = ("float16", (n,))
            if a["norm"]:
                layout[a["norm"]] = ("float32", (k,))
        elif op.kind in ("norm", "add_norm"):
            layout[a["weight"]] = ("float32", (spec.hidden,))
            if a["bias"]:
                layout[a["bias"]] = ("float32", (spec.hidden,))
        elif op.kind == "head_norm":
            layout[a["weight"]] = ("float32", (a["size"],))
        elif op.kind == "act" and a["params"]:
            layout[a["params"]] = ("float32", (4,))
        elif op.kind == "short_conv":
            layout[a["weight"]] = ("float32", (spec.hidden, spec.conv_kernel))
            if a["bias"]:
                layout[a["bias"]] = ("float32", (spec.hidden,))
        elif op.kind == "gather":
            layout[a["order"]] = ("int32", (a["n"],))
        elif op.kind == "delta_conv":
            layout[a["weight"]] = ("float32", (spec.delta.conv_dim, spec.delta.kernel))
            if a["bias"]:
                layout[a["bias"]] = ("float32", (spec.delta.conv_dim,))
        elif op.kind in ("delta_rule", "mamba_rule"):
            d = spec.delta
            layout.update({a["a"]: ("float32", (d.v_heads, spec.hidden)), a["dt_bias"]: ("float32", (d.v_heads,)),
                           a["rate"]: ("float32", (d.v_heads,))})
            layout.update({a["b"]: ("float32", (d.v_heads, spec.hidden)), a["norm"]: ("float32", (d.v_dim,))}
                          if op.kind == "delta_rule" else {a["skip"]: ("float32", (d.v_heads,))})
        elif op.kind == "group_norm":
            layout[a["weight"]] = ("float32", (spec.delta.value_dim,))
        elif op.kind == "attention" and a["sinks"]:
            layout[a["sinks"]] = ("float32", (spec.heads,))
        elif op.kind == "head_gate":
            layout[a["weight"]] = ("float32", (spec.heads, spec.hidden))
        elif op.kind == "moe":
            layout.update(experts_layout(spec, a))
    return layout


def experts_layout(spec: DecoderSpec, a: dict) -> dict[str, tuple[str, tuple]]:
    """A moe op's tensors in a cuda engine: the router float32 [E, hidden] (its bias, the expert biases
    [E] and the shared expert's gate [hidden] where the family has them) and the experts stacked by
    rows: `{experts}.gate_up` (expert e's gate and up rows interleaved at rows e * 2W ..) and
    `{experts}.down` (at rows e * hidden ..), each a 4-bit linear in the kernels' layout (gpt-oss's,
    whose experts compute clamped SwiGLU, with fp16 biases in the same rows' order)."""
    E, W, H, g = spec.experts, spec.expert_width, spec.hidden, spec.group_size
    layout = {a["router"]: ("float32", (E, H))}
    layout.update({a[key]: ("float32", (E,)) for key in ("bias", "router_bias") if a[key]})
    if a["norm"]:  # (the MLP's input norm, which the op runs first)
        layout[a["norm"]] = ("float32", (H,))
    if a["shared_gate"]:
        layout[a["shared_gate"]] = ("float32", (H,))
    for part, (n, k) in (("gate_up", (E * 2 * W, H)), ("down", (E * H, W))):
        name = f"{a['experts']}.{part}"
        layout.update({f"{name}.qweight": ("int32", (n, k // 8)), f"{name}.scales": ("float16", (n, -(-k // g))),
                       f"{name}.zeros": ("float16", (n, -(-k // g)))})
        if a["swiglu"]:
            layout[f"{name}.bias"] = ("float16", (n,))
    return layout


def pack_weights(ckpt, spec: DecoderSpec, progress: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint's tensors in the layout tensor_layout() describes, (name, array) an op's at a
    time, each checked against it (a build writes each as it comes: it holds one linear's weights,
    never a model's); the last check that none is missing. progress: a bar over the op list."""
    layout = tensor_layout(spec)
    done = set()
    for name, array in _packed_by_op(ckpt, spec, progress):
        want = layout.get(name)
        if want is None:  # (what an op packs that this spec's engine does not hold)
            continue
        if str(array.dtype) != want[0] or tuple(array.shape) != want[1]:
            raise UserError(f"the checkpoint's {name} does not fit its config ({array.shape}, expected {want[1]}); "
                            "it is corrupt or belongs to another model")
        done.add(name)
        yield name, np.ascontiguousarray(array)
    missing = next((name for name in layout if name not in done), None)
    if missing:
        raise UserError(f"the checkpoint's {missing} does not fit its config (none, expected {layout[missing][1]}); "
                        "it is corrupt or belongs to another model")


def _packed_by_op(ckpt, spec: DecoderSpec, progress: bool) -> Iterator[tuple[str, np.ndarray]]:
    """pack_weights' tensors, unchecked: the embedding's, the head's and the tables, then each op's."""
    from tqdm import tqdm

    from .checkpoint import concat_linears
    from .packing import pack_for_plugin, quantize_rows_int8

    def tensor(name: str) -> np.ndarray:
        if name not in ckpt.tensors:
            raise UserError(f"the checkpoint lacks {name}; it does not match its config")
        return ckpt.tensors[name]

    embed = tensor("model.embed_tokens.weight").astype(np.float16, copy=False)
    head = ckpt.tensors.get("lm_head.weight", embed) if not spec.tie_embeddings else embed
    out = {}
    table, scales = embed_table(spec)
    if scales is None:
        out[table] = embed
    elif table == "model.embed_tokens.q8":
        out[table], out[scales] = quantize_rows_int8(embed)
    yield from out.items()  # (written before the head's: a 128k vocabulary's tables are GBs)
    out, head = {}, head.astype(np.float16, copy=False)
    if spec.lm_head == "int8":
        out["lm_head.q8"], out["lm_head.q8_scales"] = quantize_rows_int8(head)
    else:
        if not spec.tie_embeddings:
            out["lm_head.weight"] = head
        if spec.lm_head == "int4":
            out.update(quantize_head_int4(head, spec))
    if spec.head_bias:
        out["lm_head.bias"] = tensor("lm_head.bias").astype(np.float32)
    if spec.position_offset is not None:  # (rows from the offset on: row p is position p's)
        first = spec.position_offset
        table = tensor("model.embed_positions.weight")
        out[POSITIONS_TABLE] = table[first:first + spec.max_positions].astype(np.float16)
    out.update(rope_weights(spec))
    yield from out.items()
    del embed, head, out  # (written: not held while the layers are packed)

    def parts(prefix: str) -> list[str]:
        """The checkpoint's linears that an engine linear stacks (q/k/v, gate/up), or itself."""
        if prefix.endswith(".qkv_proj"):
            return [prefix.replace("qkv_proj", f"{n}_proj") for n in "qkv"]
        if prefix.endswith(".gate_up_proj"):
            return [prefix.replace("gate_up_proj", f"{n}_proj") for n in ("gate", "up")]
        if prefix.endswith(".in_proj_qkvz"):  # (Qwen3.5's delta nets)
            return [prefix.replace("in_proj_qkvz", n) for n in ("in_proj_qkv", "in_proj_z")]
        return [prefix]

    for op in tqdm(decode_ops(spec), desc="pack", unit="op", disable=not progress):
        a, out = op.args, {}
        if op.kind == "gather":  # (q/k/v's or gate/up's one order: concat_linears checks it at their linear)
            prefix = a["order"].removesuffix(".input_order")
            order = ckpt.linears[parts(prefix)[0]].order
            if order is None:
                raise UserError(f"{prefix} is not act-order, and others are; the cuda backend takes all linears "
                                "of a checkpoint in act-order or none")
            out[a["order"]] = order.astype(np.int32)
        elif op.kind == "linear":
            prefix, names = a["weight"], parts(a["weight"])
            try:
                lin = concat_linears([ckpt.linears[n] for n in names]) if len(names) > 1 else ckpt.linears[prefix]
            except ValueError as e:  # GPTQ act-order parts of one input in different orders
                raise UserError(f"{prefix}: its parts cannot be fused ({e}); export the checkpoint with "
                                "--target onnx and build that for --device cpu") from None
            if lin.bias is not None and not a["bias"]:  # (decoder_spec's biases come from the checkpoint)
                raise UserError(f"{prefix} has a bias its engine's spec does not expect; the checkpoint is corrupt")
            rows = interleave_halves(lin.q.shape[0]) if prefix.endswith(".gate_up_proj") else slice(None)
            for key, value in pack_for_plugin(lin.q[rows], lin.scales[rows], lin.zeros[rows], lin.group_size).items():
                out[f"{prefix}.{key}"] = value
            if a["norm"]:
                out[a["norm"]] = tensor(a["norm"]).astype(np.float32) + np.float32(spec.norm_offset)
            if a["bias"]:
                bias = lin.bias if lin.bias is not None else np.zeros(lin.q.shape[0], np.float32)
                out[f"{prefix}.bias"] = bias[rows].astype(np.float16)
        elif op.kind == "act" and a["params"]:
            from .export.spec import XIELU_PARAMS, xielu_constants

            mlp = a["params"].removesuffix(".act_fn.xielu")
            out[a["params"]] = xielu_constants(*(tensor(f"{mlp}.act_fn.{n}") for n in XIELU_PARAMS))
        elif op.kind == "short_conv":  # the depthwise convolution's [hidden, 1, kernel] as [hidden, kernel]
            out[a["weight"]] = tensor(a["weight"]).astype(np.float32).reshape(spec.hidden, -1)
            if a["bias"]:
                out[a["bias"]] = tensor(a["bias"]).astype(np.float32)
        elif op.kind == "delta_conv":  # the depthwise convolution's [Cq, 1, kernel] as [Cq, kernel]
            out[a["weight"]] = tensor(a["weight"]).astype(np.float32).reshape(spec.delta.conv_dim, -1)
            if a["bias"]:
                out[a["bias"]] = tensor(a["bias"]).astype(np.float32)
        elif op.kind in ("delta_rule", "mamba_rule"):  # (a gated one's norm a plain weight: no family offset)
            keys = ("b", "a", "dt_bias", "norm") if op.kind == "delta_rule" else ("a", "dt_bias", "skip")
            out.update({a[key]: tensor(a[key]).astype(np.float32) for key in keys})
            la = a["rate"].removesuffix(".decay_rate")
            out[a["rate"]] = -np.exp(tensor(f"{la}.A_log").astype(np.float32))
        elif op.kind == "group_norm":  # (a Mamba-2's: a plain weight)
            out[a["weight"]] = tensor(a["weight"]).astype(np.float32)
        elif op.kind == "attention" and a["sinks"]:
            out[a["sinks"]] = tensor(a["sinks"]).astype(np.float32)
        elif op.kind == "head_gate":
            out[a["weight"]] = tensor(a["weight"]).astype(np.float32)
        elif op.kind == "moe":
            out.update(pack_experts(ckpt, spec, a, tensor))
        elif op.kind in ("norm", "add_norm", "head_norm"):
            out[a["weight"]] = tensor(a["weight"]).astype(np.float32) + np.float32(spec.norm_offset)
            if a.get("bias"):  # (a LayerNorm's)
                out[a["bias"]] = tensor(a["bias"]).astype(np.float32)
        yield from out.items()


def quantize_head_int4(table: np.ndarray, spec: DecoderSpec) -> dict[str, np.ndarray]:
    """The fp16 head [V, hidden] as a 4-bit linear `lm_head.q4` at group HEAD_INT4_GROUP (round
    to nearest, asymmetric: export's quantize_blockwise), rows padded with zeros to a multiple
    of 8, in the plugin layout."""
    from .export.linear import quantize_blockwise
    from .packing import pack_for_plugin

    padded = np.zeros((padded_vocab(spec), spec.hidden), np.float16)  # zero rows: scale 0, zero 0
    padded[:spec.vocab] = table
    parts = []
    for start in range(0, padded.shape[0], 8192):  # in pieces: a whole 7B head's levels and words are GBs
        q, scales, zeros = quantize_blockwise(padded[start:start + 8192], 4, HEAD_INT4_GROUP)
        parts.append(pack_for_plugin(q, scales.astype(np.float16), zeros.astype(np.float16), HEAD_INT4_GROUP))
    return {f"lm_head.q4.{key}": np.concatenate([p[key] for p in parts]) for key in parts[0]}


def pack_experts(ckpt, spec: DecoderSpec, a: dict, tensor) -> dict[str, np.ndarray]:
    """A moe op's tensors (experts_layout) from a checkpoint's: each expert's gate/up rows interleaved,
    then every expert's stacked, in the kernels' layout; the router and biases float32."""
    from .checkpoint import concat_linears
    from .packing import pack_for_plugin

    out = {a["router"]: tensor(a["router"]).astype(np.float32)}
    if a["norm"]:
        out[a["norm"]] = tensor(a["norm"]).astype(np.float32) + np.float32(spec.norm_offset)
    out.update({a[key]: tensor(a[key]).astype(np.float32).reshape(-1) for key in ("bias", "router_bias", "shared_gate")
                if a[key]})  # (ERNIE 4.5's expert biases [1, E], Qwen2-MoE's gate [1, hidden]: flat)
    parts = {"gate_up": [], "down": []}
    for j in range(spec.experts):
        names = [f"{a['experts']}.{j}.{n}_proj" for n in ("gate", "up", "down")]
        missing = next((n for n in names if n not in ckpt.linears), None)
        if missing:
            raise UserError(f"the checkpoint lacks quantized linear {missing}; it does not match its config")
        linears = [ckpt.linears[n] for n in names]
        if any(lin.order is not None for lin in linears) or (not a["swiglu"] and any(lin.bias is not None
                                                                                      for lin in linears)):
            raise UserError(f"{names[0]}: GPTQ act-order experts, or biases on experts other than gpt-oss's, are not "
                            "on the cuda backend yet; build for the CPU (--device cpu)")
        gate_up = concat_linears(linears[:2])
        rows = interleave_halves(gate_up.q.shape[0])
        for part, lin, order in (("gate_up", gate_up, rows), ("down", linears[2], slice(None))):
            packed = pack_for_plugin(lin.q[order], lin.scales[order], lin.zeros[order], lin.group_size)
            if a["swiglu"]:  # (gpt-oss's biases; none stored: zeros)
                bias = lin.bias if lin.bias is not None else np.zeros(lin.q.shape[0], np.float32)
                packed["bias"] = bias[order].astype(np.float16)
            parts[part].append(packed)
    for part, packed in parts.items():
        for key in packed[0]:
            out[f"{a['experts']}.{part}.{key}"] = np.concatenate([p[key] for p in packed])
    return out


def interleave_halves(n: int) -> np.ndarray:
    """Row order [0, n/2, 1, n/2 + 1, ...]: the gate/up rows paired (gate j, up j) for the act epilogue."""
    return np.arange(n).reshape(2, n // 2).T.reshape(-1)


def rope_weights(spec: DecoderSpec) -> dict[str, np.ndarray]:
    """The RoPE tables `rope.{j}.cos|sin` fp16 [max_positions, D/2], one pair per frequency set."""
    from .export.spec import rope_tables

    out = {}
    for j, rope in enumerate(spec.ropes):
        cos, sin = rope_tables(rope, spec.max_positions)
        out[f"rope.{j}.cos"], out[f"rope.{j}.sin"] = cos.astype(np.float16), sin.astype(np.float16)
    return out


def checkpoint_biases(ckpt) -> tuple[bool, bool]:
    """(whether any layer's q/k/v projection carries a bias: Qwen2's always, others' may; whether any
    other linear does: o_proj, gate/up, down, as ERNIE 4.5's use_bias and Jais 2's)."""
    def any_bias(names) -> bool:
        return any(ckpt.linears.info(name).bias is not None for name in ckpt.linears if name.endswith(names))
    return any_bias(("q_proj", "k_proj", "v_proj")), any_bias(("o_proj", "gate_proj", "up_proj", "down_proj"))
