"""The decoder graph shared by all targets (docs/graph.md is its I/O contract).

    h = embed[input_ids]                    (Gemma: * sqrt(hidden))
    for each layer:
        x = norm(h)                         input_layernorm (OLMo 2: x = h, no norm; Nemotron, StableLM,
                                            Cohere: LayerNorm)
        q, k, v = linear(x)                 (+ bias: Qwen2; per-head q/k norm: Qwen3, Gemma3)
        a = o_proj(attention(q, k, v))      RoPE, KV cache, causal (+ sliding window) mask
        a = norm(a)                         post-norm (Gemma's post_attention_layernorm, GLM-4's)
        h = h + a
        x = norm(h)                         post_attention_layernorm / pre_feedforward_layernorm (OLMo 2: none;
                                            Cohere: none, the MLP reads the attention's x; GPT-NeoX: the norm
                                            of h before a is added)
        m = down(act(gate(x)) * up(x))      silu, gelu_tanh or gelu (Arcee: down(relu(up(x))^2), no gate)
        m = norm(m)                         post-norm (Gemma's post_feedforward_layernorm, GLM-4's)
        h = h + m
    logits = lm_head(norm(h))               last position only unless all_logits
    top_ids, top_logits                     optional (quantized ort lm_head): the top-k of the last
                                            position's logits, re-scored exactly with the fp16 table

What differs per target is passed in as a Target: how a quantized linear, the attention, and
RMSNorm are emitted. The residual add is deferred into the next norm so the ort target can use
SkipSimplifiedLayerNormalization (add + norm in one pass); the standard targets emit Add + norm.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto
from tqdm import tqdm

from ..checkpoint import Checkpoint, QuantizedLinear, concat_linears
from ..decoder import POSITIONS_TABLE, interleave_halves
from ..packing import to_matmul_nbits
from ..errors import UserError
from . import attention, delta_net, linear
from .builder import MS_DOMAIN, GraphBuilder
from .spec import XIELU_PARAMS, ModelSpec, distinct_ropes, rope_tables, xielu_constants


@dataclass
class Target:
    name: str  # ort | trt | onnx
    opset: int
    act_dtype: np.dtype
    kv_mode: str  # shared_buffer | concat
    accuracy_level: int = 0  # MatMulNBits accuracy_level (ort) / DQ->MatMulNBits fusion hint (onnx)
    lm_head_bits: int | None = None  # None = float; 8 or 4 = MatMulNBits (ort only)
    lm_head_block: int = 32
    all_logits: bool = False
    rescore_top_k: int = 0  # > 0: also output the top-k candidates' exact logits (quantized lm_head)

    @property
    def contrib(self) -> bool:  # may use com.microsoft ops
        return self.name == "ort"


def check_target(spec: ModelSpec, target: str) -> None:
    """What a target's graph cannot hold, refused in one line (a build asks before it quantizes)."""
    if target == "trt" and spec.family.qk_norm_after_rope:
        raise UserError(f"{spec.model_type}'s q/k norms come after RoPE, and the trt target's attention plugin "
                        "rotates q and k itself; build for the cuda backend or the CPU (--device cpu)")
    if target == "trt" and spec.position_offset is not None:
        raise UserError(f"{spec.model_type}'s positions are a learned table, which the trt target's graph does not "
                        "add; build for the cuda backend or the CPU (--device cpu)")
    if target == "trt" and spec.moe_layers:
        raise UserError(f"{spec.model_type}'s mixture of experts is not in the trt target's graph (its plugins run "
                        "dense linears); build for the CPU (--device cpu)")
    if target == "trt" and spec.attention_sinks:
        raise UserError(f"{spec.model_type}'s attention sinks are not in the trt target's attention plugin; build for "
                        "the CPU (--device cpu)")
    if target == "trt" and spec.delta_layers:
        what = "gated delta nets" if spec.delta.rule == "gated" else "Mamba-2 mixers"
        raise UserError(f"{spec.model_type}'s {what} keep a recurrent state, which the trt target's engines do not; "
                        "build for the CPU (--device cpu)")
    if target == "trt" and spec.conv_layers:
        raise UserError(f"{spec.model_type}'s short convolutions keep a state per position, which the trt target's "
                        "engines do not; build for the CPU (--device cpu)")


class Decoder:
    def __init__(self, ckpt: Checkpoint, spec: ModelSpec, target: Target, data_path: Path | None = None,
                 progress: bool = False):
        self.ckpt, self.spec, self.t, self.progress = ckpt, spec, target, progress
        self.b = GraphBuilder(target.act_dtype, target.opset, data_path)  # (data_path: GraphBuilder's)

    # ------------------------------------------------------------ weights
    def tensor(self, name: str) -> np.ndarray:
        try:
            return self.ckpt.tensors[name]
        except KeyError:
            raise UserError(f"checkpoint lacks tensor {name}; it does not match its "
                            f"{self.spec.model_type} config") from None

    def linear_weights(self, prefix: str):
        try:
            return self.ckpt.linears[prefix]
        except KeyError:
            raise UserError(f"checkpoint lacks quantized linear {prefix}; it is not a complete "
                            "AWQ checkpoint of this model") from None

    def fused_weights(self, prefix: str, names) -> QuantizedLinear:
        """The linears `prefix.{name}_proj` stacked (concat_linears), for one MatMulNBits."""
        try:
            return concat_linears([self.linear_weights(f"{prefix}.{n}_proj") for n in names])
        except ValueError as e:  # GPTQ act-order linears of one input in different orders
            raise UserError(f"{prefix}: {'/'.join(names)} cannot be fused ({e}); export with --target onnx") from None

    def norm_weight(self, name: str) -> str:
        w = self.tensor(name).astype(np.float32) + self.spec.family.norm_offset  # Gemma: (1 + w)
        if self.gemma_fp32_weight:
            return self.b.const(name, w)
        return self.b.act_const(name, w)

    @property
    def gemma_fp32_weight(self) -> bool:
        """Gemma multiplies by (1 + w) in fp32 before casting back (HF Gemma3RMSNorm); Llama-style
        norms cast first, then multiply by the weight in the activation dtype."""
        family = self.spec.family
        return (bool(family.norm_offset) and family.norm == "rms" and not self.t.contrib
                and self.b.act_type != TensorProto.FLOAT)

    def lm_head_weight(self) -> np.ndarray:
        """The checkpoint's lm_head [V, H]: the embedding table when tied (or when no head is stored)."""
        embed_w = self.tensor("model.embed_tokens.weight")
        return embed_w if self.spec.tie_embeddings else self.ckpt.tensors.get("lm_head.weight", embed_w)

    # ------------------------------------------------------------ building blocks
    def linear(self, x: str, prefix: str, lin=None) -> str:
        lin = lin or self.linear_weights(prefix)
        if self.t.name == "ort":
            return linear.matmul_nbits(self.b, x, lin, prefix, self.t.accuracy_level)
        if self.t.name == "trt":
            return linear.awq_plugin(self.b, x, lin, prefix)
        return linear.dequantize_matmul(self.b, x, lin, prefix)

    def rms_norm(self, x: str, weight: str) -> str:
        b = self.b
        if self.t.contrib:
            # ONNX's own RMSNormalization (opset 23); ORT's SimplifiedLayerNormalization is the same
            # kernel but sits in the onnx domain without a schema, which onnx.checker rejects.
            return b.op("RMSNormalization", x, weight, axis=-1, epsilon=self.spec.eps, name="norm")
        x32 = x if b.act_type == TensorProto.FLOAT else b.cast(x, TensorProto.FLOAT)
        mean_sq = b.reduce_mean_last(b.op("Mul", x32, x32))
        inv_rms = b.op("Reciprocal", b.op("Sqrt", b.op("Add", mean_sq, b.const("const/f32/eps", np.float32(self.spec.eps)))))
        y = b.op("Mul", x32, inv_rms)
        if self.gemma_fp32_weight:
            return b.cast(b.op("Mul", y, weight), b.act_type)
        if b.act_type != TensorProto.FLOAT:
            y = b.cast(y, b.act_type)
        return b.op("Mul", y, weight, name="norm")

    def add_rms_norm(self, x: str, residual: str, weight: str) -> tuple[str, str]:
        """(norm(residual + x), residual + x)."""
        if self.t.contrib:
            normed, _, _, total = self.b.op(
                "SkipSimplifiedLayerNormalization", x, residual, weight, domain=MS_DOMAIN,
                outputs=[self.b.name("norm"), "", "", self.b.name("residual")], epsilon=self.spec.eps)
            return normed, total
        total = self.b.op("Add", residual, x, name="residual")
        return self.rms_norm(total, weight), total

    def block_input(self, pending: str | None, h: str, weight: str) -> tuple[str, str]:
        """(the input of attention or the MLP, the residual stream): pending (the previous block's
        output) added into h, then normed with weight; OLMo 2's post-norm block reads h itself."""
        if not self.spec.family.pre_norms:
            h = h if pending is None else self.b.op("Add", h, pending, name="residual")
            return h, h
        return self.pre_norm(pending, h, weight)

    def pre_norm(self, pending: str | None, h: str, weight: str) -> tuple[str, str]:
        """(norm(h + pending), h + pending), pending None: nothing added; the norm of the tensor
        named `weight`: RMSNorm, or a LayerNorm with the bias named beside it (Family.norm "layer":
        LayerNormalization, SkipLayerNormalization with its add on the ort target)."""
        b, w = self.b, self.norm_weight(weight)
        if self.spec.family.norm != "layer":
            return (self.rms_norm(h, w), h) if pending is None else self.add_rms_norm(pending, h, w)
        bias = weight.removesuffix(".weight") + ".bias"
        bias = b.act_const(bias, self.tensor(bias).astype(np.float32))
        if pending is not None and self.t.contrib:
            normed, _, _, total = b.op("SkipLayerNormalization", pending, h, w, bias, domain=MS_DOMAIN,
                                       outputs=[b.name("norm"), "", "", b.name("residual")], epsilon=self.spec.eps)
            return normed, total
        if pending is not None:
            h = b.op("Add", h, pending, name="residual")
        return b.op("LayerNormalization", h, w, bias, axis=-1, epsilon=self.spec.eps, name="norm"), h

    def activation(self, x: str, mlp: str) -> str:
        """The MLP's activation of x; mlp: the layer's MLP prefix (Apertus's xIELU has parameters in each)."""
        b = self.b
        if self.spec.family.activation == "xielu":
            return self.xielu(x, mlp)
        if self.spec.family.activation == "silu":
            return b.op("Mul", x, b.op("Sigmoid", x), name="silu")
        if self.spec.family.activation == "relu":
            return b.op("Relu", x, name="relu")
        if self.spec.family.activation == "relu2":
            r = b.op("Relu", x)
            return b.op("Mul", r, r, name="relu2")
        if self.spec.family.activation == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt(2)))
            if self.t.contrib:
                return b.op("Gelu", x, domain=MS_DOMAIN, name="gelu")
            if b.opset >= 20:
                return b.op("Gelu", x, name="gelu")
            erf = b.op("Erf", b.op("Mul", x, b.act_const("const/gelu_sqrt_half", np.sqrt(0.5))))
            half_x = b.op("Mul", x, b.act_const("const/half", 0.5))
            return b.op("Mul", half_x, b.op("Add", b.act_const("const/one", 1.0), erf), name="gelu")
        if self.t.contrib:
            return b.op("FastGelu", x, domain=MS_DOMAIN, name="gelu_tanh")  # the tanh approximation
        if b.opset >= 20:
            return b.op("Gelu", x, approximate="tanh", name="gelu_tanh")
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = b.act_const("const/gelu_c", np.sqrt(2 / np.pi))
        inner = b.op("Mul", c, b.op("Add", x, b.op("Mul", b.act_const("const/gelu_a", 0.044715),
                                                    b.op("Mul", x, b.op("Mul", x, x)))))
        half_x = b.op("Mul", x, b.act_const("const/half", 0.5))
        return b.op("Mul", half_x, b.op("Add", b.act_const("const/one", 1.0), b.op("Tanh", inner)), name="gelu_tanh")

    def xielu(self, x: str, mlp: str) -> str:
        """Apertus's xIELU: x > 0: a_p x^2 + beta x; else (e^min(x, eps) - 1 - x) a_n + beta x, with the
        layer's a_p = softplus(alpha_p), a_n = beta + softplus(alpha_n) (`{mlp}.act_fn.xielu.*`: what
        cpu_native reads too)."""
        b = self.b
        values = xielu_constants(*(self.tensor(f"{mlp}.act_fn.{n}") for n in XIELU_PARAMS))
        a_p, a_n, beta, eps = (b.act_const(f"{mlp}.act_fn.xielu.{n}", v) for n, v in zip(XIELU_PARAMS, values))
        beta_x = b.op("Mul", x, beta)
        positive = b.op("Add", b.op("Mul", b.op("Mul", x, x), a_p), beta_x)
        expm1 = b.op("Sub", b.op("Exp", b.op("Min", x, eps)), b.act_const("const/one", 1.0))
        negative = b.op("Add", b.op("Mul", b.op("Sub", expm1, x), a_n), beta_x)
        return b.op("Where", b.op("Greater", x, b.act_const("const/zero", 0.0)), positive, negative, name="xielu")

    # ------------------------------------------------------------ the graph
    def build(self):
        b, spec, t = self.b, self.spec, self.t
        act = b.act_type
        seq = "sequence"
        cache_dim = "past_sequence"
        present_dim = "past_sequence" if t.kv_mode == "shared_buffer" else "total_sequence"
        presents = t.name != "trt"  # the trt plugin writes the past inputs in place
        input_ids = b.add_input("input_ids", TensorProto.INT64, [1, seq])
        past_length = b.add_input("past_length", TensorProto.INT64, [1])
        kv_shape = [1, spec.kv_heads, cache_dim, spec.head_dim]
        for i in range(spec.layers):
            if i in spec.conv_layers:  # (LFM2's) B * x of the conv_kernel - 1 tokens before this step
                b.add_input(f"conv_state.{i}", act, [1, spec.conv_kernel - 1, spec.hidden])
            elif i in spec.delta_layers:  # (Qwen3.5's) the convolution's inputs before this step, and S
                d, (conv, state, _, _) = spec.delta, delta_net.state_names(i)
                b.add_input(conv, TensorProto.FLOAT, [1, d.kernel - 1, d.conv_dim])
                b.add_input(state, TensorProto.FLOAT, [d.v_heads, d.k_dim, d.v_dim])
            else:
                b.add_input(f"past_key.{i}", act, kv_shape)
                b.add_input(f"past_value.{i}", act, kv_shape)
        check_target(spec, t.name)
        after_rope = spec.family.qk_norm_after_rope  # (Hunyuan) q and k rotated in the graph, then normed
        learned = spec.position_offset is not None  # (GPT-2's) a learned table's rows added to the embeddings
        info = self.info = attention.step_info(b, input_ids, past_length, t.name, positions=after_rope or learned)

        # RoPE tables: one per distinct RoPE (Gemma3: local and global).
        ropes, which = distinct_ropes(spec.layer_rope)
        tables = []
        for n, rope in enumerate(ropes):
            cos, sin = rope_tables(rope, spec.max_positions)
            cos_name, sin_name = b.act_const(f"rope.{n}.cos", cos), b.act_const(f"rope.{n}.sin", sin)
            if t.kv_mode == "concat" or after_rope:  # gather the rows of this step's positions once
                with b.scope(f"rope.{n}"):
                    cos_name = attention.rope_rows(b, cos_name, info.positions)
                    sin_name = attention.rope_rows(b, sin_name, info.positions)
            tables.append((cos_name, sin_name))
        layer_rope = [tables[j] for j in which]
        if spec.delta and spec.delta.rule == "mamba2":  # (the same for every Mamba-2 layer's chunk)
            with b.scope("chunk_masks"):
                self.chunk_masks = delta_net.chunk_masks(b, input_ids)
        masks = {}
        if t.kv_mode == "concat":
            for w in sorted(set(spec.layer_windows), key=lambda w: w or 0):
                with b.scope(f"mask.{w or 'full'}"):
                    masks[w] = attention.causal_mask(b, info, w)

        # Embeddings, gathered from the fp16 table (exact: the checkpoint stores fp16).
        embed_w = self.tensor("model.embed_tokens.weight")
        lm_head_w = self.lm_head_weight()
        float_head_fp32 = (t.lm_head_bits is None and act == TensorProto.FLOAT)
        with b.scope("embed"):
            if float_head_fp32 and spec.tie_embeddings:  # one fp32 table for Gather and lm_head
                embed = b.const("model.embed_tokens.weight", embed_w.astype(np.float32))
                h = b.op("Gather", embed, input_ids, axis=0)
            else:
                embed = b.const("model.embed_tokens.weight", embed_w.astype(np.float16, copy=False))
                h = b.op("Gather", embed, input_ids, axis=0)
                if act != TensorProto.FLOAT16:
                    h = b.cast(h, act)
            if spec.embed_multiplier is not None:
                h = b.op("Mul", h, b.act_const("const/embed_scale", np.float32(spec.embed_multiplier)))
            if learned:  # rows from the offset on (OPT's 2): row p is position p's, as the native engines hold it
                first = spec.position_offset
                table = self.tensor("model.embed_positions.weight")[first:first + spec.max_positions]
                h = b.op("Add", h, b.op("Gather", b.act_const(POSITIONS_TABLE, table), info.positions, axis=0),
                         name="positions")
            if spec.family.embed_norm:  # (nanochat's) the final norm's copy (checkpoint.read_for_engine)
                h, _ = self.pre_norm(None, h, "model.embed_norm.weight")

        pending = None  # output of the previous block, not yet added to the residual h
        for i in tqdm(range(spec.layers), desc="export", unit="layer", disable=not self.progress):
            p = f"model.layers.{i}"
            with b.scope(f"layers.{i}"):
                with b.scope("input_norm"):
                    x, h = self.block_input(pending, h, f"{p}.input_layernorm.weight")
                with b.scope("attn"):
                    a = (self.conv_block(x, i) if i in spec.conv_layers else
                         delta_net.delta_block(self, x, i) if i in spec.delta_layers else
                         self.attention_block(x, i, layer_rope[i], masks.get(spec.layer_windows[i])))
                    if spec.family.post_norms:
                        a = self.rms_norm(a, self.norm_weight(f"{p}.{spec.family.post_norms[0]}.weight"))
                if spec.family.parallel_block:  # (Cohere) the MLP reads x too: h + attention + MLP, in that order
                    h = b.op("Add", h, a, name="residual")
                elif spec.parallel_norms:  # (GPT-NeoX) the MLP's own norm of h, as it was before attention
                    with b.scope("mlp_norm"):
                        x, _ = self.pre_norm(None, h, f"{p}.{spec.family.mlp_norm}.weight")
                    h = b.op("Add", h, a, name="residual")
                else:
                    with b.scope("mlp_norm"):
                        x, h = self.block_input(a, h, f"{p}.{spec.family.mlp_norm}.weight")
                with b.scope("mlp"):
                    if i in spec.moe_layers:
                        pending = self.experts(x, f"{p}.mlp")
                    elif spec.family.gated_mlp:
                        gate, up = self.gate_up(x, f"{p}.mlp")
                        m = b.op("Mul", self.activation(gate, f"{p}.mlp"), up)
                    else:
                        m = self.activation(self.linear(x, f"{p}.mlp.up_proj"), f"{p}.mlp")
                    if i not in spec.moe_layers:
                        pending = self.linear(m, f"{p}.mlp.down_proj")
                    if spec.family.post_norms:
                        pending = self.rms_norm(pending, self.norm_weight(f"{p}.{spec.family.post_norms[1]}.weight"))

        with b.scope("final"):
            if not t.all_logits:  # only the last position reaches the (large) lm_head
                pending = b.op("Slice", pending, b.int64s(-1), b.int64s(2**62), b.int64s(1), name="last")
                h = b.op("Slice", h, b.int64s(-1), b.int64s(2**62), b.int64s(1), name="last_residual")
            x, _ = self.pre_norm(pending, h, "model.norm.weight")
            logits = self.lm_head(x, lm_head_w, embed if float_head_fp32 and spec.tie_embeddings else None)
            if act != TensorProto.FLOAT:
                logits = b.cast(logits, TensorProto.FLOAT)
            if spec.family.head_bias:  # (Phi's) before the soft-cap, as the head's own
                logits = b.op("Add", logits, self.head_bias(), name="head_bias")
            logits = self.final_softcap(logits)
            shape = b.int64s(1, -1, spec.vocab) if t.all_logits else b.int64s(1, spec.vocab)
            b.op("Reshape", logits, shape, outputs=["logits"])
            if t.rescore_top_k:
                self.rescored_top_k(x, embed if spec.tie_embeddings else None)
        b.add_output("logits", TensorProto.FLOAT, [1, seq, spec.vocab] if t.all_logits else [1, spec.vocab])
        if t.rescore_top_k:
            b.add_output("top_ids", TensorProto.INT64, [1, t.rescore_top_k])
            b.add_output("top_logits", TensorProto.FLOAT, [1, t.rescore_top_k])
        for i in spec.attention_layers if presents else ():
            for kind in ("key", "value"):
                b.add_output(f"present_{kind}.{i}", act, [1, spec.kv_heads, present_dim, spec.head_dim])
        for i in spec.conv_layers:
            b.add_output(f"conv_new.{i}", act, [1, seq, spec.hidden])
        for i in spec.delta_layers:
            d, (_, _, conv, state) = spec.delta, delta_net.state_names(i)
            b.add_output(conv, TensorProto.FLOAT, [1, d.kernel - 1, d.conv_dim])
            b.add_output(state, TensorProto.FLOAT, [d.v_heads, d.k_dim, d.v_dim])
        return b.model(f"awq_edge_{spec.model_type}_{t.name}")

    def final_softcap(self, logits: str) -> str:
        """cap * tanh(logits / cap) for models with a final logit soft-cap (Gemma), else logits."""
        if not self.spec.final_softcap:
            return logits
        b = self.b
        cap = b.const("const/f32/final_softcap", np.float32(self.spec.final_softcap))
        return b.op("Mul", b.op("Tanh", b.op("Div", logits, cap)), cap)

    def rescored_top_k(self, x: str, fp16_table: str | None) -> None:
        """`top_ids` / `top_logits`: the k largest quantized logits of the last position and their
        exact values, table[ids] @ x with the checkpoint's fp16 lm_head (the embedding table when
        tied, already in the graph for Gather). Decoding picks from these, so greedy and top-k /
        top-p see exact logits for every candidate that can win (docs/export.md)."""
        b, spec, k = self.b, self.spec, self.t.rescore_top_k
        with b.scope("rescore"):
            if fp16_table is None:  # an untied head: its exact table beside the quantized one
                fp16_table = b.const("lm_head.exact", self.lm_head_weight().astype(np.float16, copy=False))
            last = b.op("Reshape", x, b.int64s(-1, spec.hidden))
            logits = b.op("Reshape", "logits", b.int64s(-1, spec.vocab))
            if self.t.all_logits:  # the last position of [S, H] and [S, V]
                last = b.op("Slice", last, b.int64s(-1), b.int64s(2**62), b.int64s(0))
                logits = b.op("Slice", logits, b.int64s(-1), b.int64s(2**62), b.int64s(0))
            if b.act_type != TensorProto.FLOAT:
                last = b.cast(last, TensorProto.FLOAT)
            _, ids = b.op("TopK", logits, b.int64s(k), axis=-1, largest=1, sorted=0,
                          outputs=[b.name("top_values"), "top_ids"])
            flat_ids = b.op("Reshape", ids, b.int64s(-1))
            rows = b.cast(b.op("Gather", fp16_table, flat_ids, axis=0), TensorProto.FLOAT)
            biases = [b.op("Gather", self.head_bias(), flat_ids, axis=0)] if spec.family.head_bias else []
            exact = self.final_softcap(b.op("Gemm", last, rows, *biases, transB=1))  # [1, k]
            b.op("Identity", exact, outputs=["top_logits"])

    def head_bias(self) -> str:
        """The head's bias [V], float32 (the logits' type): one initializer for the logits and the re-scoring."""
        if "lm_head.bias" not in self.b.initializers:
            self.b.const("lm_head.bias", self.tensor("lm_head.bias").astype(np.float32))
        return "lm_head.bias"

    def lm_head(self, x: str, weight: np.ndarray, shared_table: str | None) -> str:
        b, t = self.b, self.t
        if t.lm_head_bits:
            return linear.lm_head_quantized(b, x, weight, t.lm_head_bits, t.lm_head_block, t.accuracy_level)
        if shared_table is None:  # act fp16 or an untied head: its own table in the act dtype
            shared_table = b.const("lm_head.weight", weight.astype(b.act_dtype))
        x2d = b.op("Reshape", x, b.int64s(-1, self.spec.hidden))
        return linear.lm_head_float(b, x2d, shared_table)

    def gate_up(self, x: str, p: str) -> tuple[str, str]:
        """The MLP's gate and up projections of x. ort: one MatMulNBits for both (x is read and
        quantized to int8 once, one kernel instead of two), split after."""
        if self.t.name != "ort":
            return self.linear(x, f"{p}.gate_proj"), self.linear(x, f"{p}.up_proj")
        lin = self.fused_weights(p, ("gate", "up"))
        width = lin.q.shape[0] // 2
        gate, up = self.b.op("Split", self.linear(x, f"{p}.gate_up_proj", lin), self.b.int64s(width, width),
                             axis=-1, outputs=2)
        return gate, up

    def experts(self, x: str, p: str) -> str:
        """A mixture of experts' output for x [1, S, hidden]: the experts_per_token of the router's softmax
        (p.gate, float; gpt-oss's logits biased) with the highest probabilities run on each token, their
        outputs summed weighted by those (renormalized over the chosen with norm_top_k); LFM2-MoE's sigmoid
        router: the logits' sigmoids are the weights, the sum times routed_scale; the chosen those highest with
        p.expert_bias added where it has one (ERNIE 4.5's softmax too). Qwen2-MoE's shared expert is added,
        times sigmoid(its gate . x); ERNIE 4.5's ungated. ort: one
        QMoE node (experts_qmoe); the onnx target, or experts QMoE cannot hold (a ragged K, GPTQ act-order):
        every expert on every token (experts_everywhere)."""
        b, spec = self.b, self.spec
        x2d = b.op("Reshape", x, b.int64s(-1, spec.hidden))
        router = b.act_const(f"{p}.gate.weight", self.tensor(f"{p}.gate.weight").astype(np.float32).T)
        logits = b.op("MatMul", x2d, router, name="router")  # [S, E]
        if spec.family.router_bias:  # (gpt-oss's)
            bias = self.tensor(f"{p}.gate.bias").astype(np.float32)
            logits = b.op("Add", logits, b.act_const(f"{p}.gate.bias", bias))
        weights = b.op("Sigmoid", logits) if spec.family.router == "sigmoid" else b.op("Softmax", logits, axis=-1)
        scores = weights
        if spec.expert_bias:  # (LFM2-MoE's, ERNIE 4.5's: on the scores it chooses by, [E] or [1, E] stored)
            bias = self.tensor(f"{p}.expert_bias").astype(np.float32).reshape(-1)
            scores = b.op("Add", weights, b.act_const(f"{p}.expert_bias", bias))
        gate_up = [self.fused_weights(f"{p}.experts.{j}", ("gate", "up")) for j in range(spec.experts)]
        down = [self.linear_weights(f"{p}.experts.{j}.down_proj") for j in range(spec.experts)]
        group = gate_up[0].group_size
        if (self.t.name == "ort" and spec.hidden % group == 0 and spec.expert_width % group == 0
                and all(lin.order is None for lin in gate_up + down)):
            y = self.experts_qmoe(x2d, scores, weights, gate_up, down, p)
        else:
            y = self.experts_everywhere(x2d, scores, weights, p)
        if spec.routed_scale != 1.0:
            y = b.op("Mul", y, b.act_const("const/routed_scale", spec.routed_scale))
        if spec.shared_width:  # (Qwen2-MoE's shared expert, on every token: one more gated MLP, times its gate)
            with b.scope("shared_expert"):
                gate, up = self.gate_up(x2d, f"{p}.shared_expert")
                shared = self.linear(self.swiglu(gate, up, p), f"{p}.shared_expert.down_proj")
                if spec.shared_gate:
                    weight = self.tensor(f"{p}.shared_expert_gate.weight").astype(np.float32).T  # [hidden, 1]
                    gate = b.op("MatMul", x2d, b.act_const(f"{p}.shared_expert_gate.weight", weight))
                    shared = b.op("Mul", shared, b.op("Sigmoid", gate))
                y = b.op("Add", y, shared)
        return b.op("Reshape", y, b.int64s(1, -1, spec.hidden))

    def experts_qmoe(self, x2d: str, scores: str, weights: str, gate_up: list, down: list, p: str) -> str:
        """One QMoE node: its CPU kernel takes int4 blocks with zero points, each expert's gate and up rows
        interleaved, the scores it chooses by as router_probs, the weights as router_weights, SwiGLU
        gate * sigmoid(alpha gate) * (up + beta) (gpt-oss's: both clamped first, beta 1), the experts'
        biases (gpt-oss's) and int8 activations at the engine's accuracy_level (4), as MatMulNBits."""
        b, spec = self.b, self.spec
        width, group = spec.expert_width, gate_up[0].group_size
        rows = interleave_halves(2 * width)
        fc1 = [to_matmul_nbits(t.q, t.scales, t.zeros, group) for t in (lin.rows(rows) for lin in gate_up)]
        fc2 = [to_matmul_nbits(lin.q, lin.scales, lin.zeros, group) for lin in down]

        def stacked(name, tensors, key, shape):
            values = np.stack([t[key].reshape(shape) for t in tensors])
            return b.act_const(name, values) if key == "scales" else b.const(name, values)

        def biases(name, linears, order):  # (gate/up's rows in fc1's order)
            if all(lin.bias is None for lin in linears):
                return ""
            return b.act_const(name, np.stack([np.zeros(lin.q.shape[0], np.float32) if lin.bias is None else
                                               lin.bias.astype(np.float32)[order] for lin in linears]))

        blocks = (spec.hidden // group, width // group)
        inputs = [x2d, scores,
                  stacked(f"{p}.experts.fc1.B", fc1, "B", (2 * width, spec.hidden // 2)),
                  stacked(f"{p}.experts.fc1.scales", fc1, "scales", (2 * width, blocks[0])),
                  biases(f"{p}.experts.fc1.bias", gate_up, rows),
                  stacked(f"{p}.experts.fc2.B", fc2, "B", (spec.hidden, width // 2)),
                  stacked(f"{p}.experts.fc2.scales", fc2, "scales", (spec.hidden, blocks[1])),
                  biases(f"{p}.experts.fc2.bias", down, slice(None)), "", "", "",
                  stacked(f"{p}.experts.fc1.zero_points", fc1, "zero_points", (2 * width, -1)),
                  stacked(f"{p}.experts.fc2.zero_points", fc2, "zero_points", (spec.hidden, -1)), "", weights]
        clamped = {"activation_alpha": 1.0, "activation_beta": 0.0} if spec.swiglu_limit is None else {
            "activation_alpha": spec.swiglu_alpha, "activation_beta": 1.0, "swiglu_limit": spec.swiglu_limit}
        return b.op("QMoE", *inputs, domain=MS_DOMAIN, name="experts", k=spec.experts_per_token,
                    activation_type="swiglu", swiglu_fusion=1, normalize_routing_weights=int(spec.norm_top_k),
                    expert_weight_bits=4, block_size=group, accuracy_level=self.t.accuracy_level, **clamped)

    def experts_everywhere(self, x2d: str, scores: str, weights: str, p: str) -> str:
        """Every expert on every token, its output times its weight where among the chosen (renormalized),
        else 0 (TopK, GatherElements, ScatterElements): the same sum as QMoE's, at experts /
        experts_per_token times the work."""
        b, spec = self.b, self.spec
        _, chosen = b.op("TopK", scores, b.int64s(spec.experts_per_token), axis=-1,
                         outputs=[b.name("top"), b.name("chosen")])
        top = b.op("GatherElements", weights, chosen, axis=-1)
        if spec.norm_top_k:
            top = b.op("Div", top, b.op("ReduceSum", top, b.int64s(-1), keepdims=1))
        weights = b.op("ScatterElements", b.op("Mul", weights, b.act_const("const/zero", 0.0)), chosen, top, axis=-1)
        y = None
        for j in range(spec.experts):
            with b.scope(f"experts.{j}"):
                gate, up = (self.linear(x2d, f"{p}.experts.{j}.{n}_proj") for n in ("gate", "up"))
                out = self.linear(self.swiglu(gate, up, p), f"{p}.experts.{j}.down_proj")
                weight = b.op("Slice", weights, b.int64s(j), b.int64s(j + 1), b.int64s(1))  # [S, 1]
                y = b.op("Mul", out, weight) if y is None else b.op("Add", y, b.op("Mul", out, weight))
        return y

    def swiglu(self, gate: str, up: str, mlp: str) -> str:
        """act(gate) * up; gpt-oss's clamped SwiGLU: g * sigmoid(alpha g) * (clamp(up, +-limit) + 1), g = min(gate,
        limit)."""
        b, limit = self.b, self.spec.swiglu_limit
        if limit is None:
            return b.op("Mul", self.activation(gate, mlp), up)
        gate = b.op("Min", gate, b.act_const("const/swiglu_limit", limit))
        up = b.op("Clip", up, b.act_const("const/swiglu_min", -limit), b.act_const("const/swiglu_limit", limit))
        glu = b.op("Mul", gate, b.op("Sigmoid", b.op("Mul", gate, b.act_const("const/swiglu_alpha",
                                                                                self.spec.swiglu_alpha))))
        return b.op("Mul", glu, b.op("Add", up, b.act_const("const/one", 1.0)), name="swiglu")

    def clipped(self, x: str) -> str:
        """x clamped to +-clip_qkv (OLMo 1's q, k and v, where its config sets it), else x."""
        limit = self.spec.clip_qkv
        if limit is None:
            return x
        b = self.b  # (one pair of constants for every layer's q, k and v: the builder shares them)
        return b.op("Clip", x, b.act_const("const/clip_qkv_min", -limit), b.act_const("const/clip_qkv_max", limit),
                    name="clip_qkv")

    def conv_block(self, x: str, i: int) -> str:
        """LFM2's gated short convolution: B, C and x from in_proj; out_proj(C * conv(B * x)), the
        convolution depthwise over each token and the conv_kernel - 1 before it (its weight [hidden,
        1, kernel]: kernel tap j reads the token kernel - 1 - j back). Those before this step are the
        input conv_state.{i}; this step's B * x is the output conv_new.{i}, which the runtime keeps per
        position (backend_ort.py) as it keeps K and V."""
        b, spec = self.b, self.spec
        p, hidden, kernel = f"model.layers.{i}.conv", spec.hidden, spec.conv_kernel
        gate_b, gate_c, xs = b.op("Split", self.linear(x, f"{p}.in_proj"), b.int64s(hidden, hidden, hidden), axis=-1,
                                  outputs=3)
        bx = b.op("Mul", gate_b, xs)
        b.op("Identity", bx, outputs=[f"conv_new.{i}"])
        rows = b.op("Concat", f"conv_state.{i}", bx, axis=1)  # [1, kernel - 1 + S, hidden]
        weight = self.tensor(f"{p}.conv.weight").astype(np.float32).reshape(hidden, kernel)
        y = None
        for j in range(kernel):  # tap j: rows j .. j + S - 1 of `rows`
            end = j - (kernel - 1)
            tap = b.op("Slice", rows, b.int64s(j), b.int64s(end if end < 0 else 2**62), b.int64s(1))
            tap = b.op("Mul", tap, b.act_const(f"{p}.conv.weight.{j}", weight[:, j]))
            y = tap if y is None else b.op("Add", y, tap)
        if spec.conv_bias:
            y = b.op("Add", y, b.act_const(f"{p}.conv.bias", self.tensor(f"{p}.conv.bias").astype(np.float32)))
        return self.linear(b.op("Mul", gate_c, y), f"{p}.out_proj")

    def attention_block(self, x: str, i: int, rope: tuple[str, str], mask: str | None) -> str:
        b, spec, t = self.b, self.spec, self.t
        p = f"model.layers.{i}.self_attn"
        names = (f"present_key.{i}", f"present_value.{i}")
        past = (f"past_key.{i}", f"past_value.{i}")
        family = spec.family
        qk_norm, after_rope = family.qk_norm, family.qk_norm_after_rope
        sinks = None  # (gpt-oss's: a logit per head)
        if spec.attention_sinks:
            sinks = b.act_const(f"{p}.sinks", self.tensor(f"{p}.sinks").astype(np.float32))
        if t.name == "ort":
            # One MatMulNBits for q, k and v (one read of x, one kernel launch).
            lin = self.fused_weights(p, "qkv")
            qkv = self.clipped(self.linear(x, f"{p}.qkv_proj", lin))
            if not qk_norm:
                ctx = attention.gqa_attention(b, spec, i, qkv, None, None, *past, self.info, *rope, names, sinks)
                return self.linear(self.gated(ctx, x, p), f"{p}.o_proj")
            q_size, kv_size = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
            q, k, v = b.op("Split", qkv, b.int64s(q_size, kv_size, kv_size), axis=-1, outputs=3)
        else:
            q, k, v = (self.clipped(self.linear(x, f"{p}.{n}_proj")) for n in "qkv")
        if after_rope:  # this step's cos/sin rows (the tables gathered by position)
            q = attention.rotate_heads(b, q, spec.heads, spec.head_dim, *rope)
            k = attention.rotate_heads(b, k, spec.kv_heads, spec.head_dim, *rope)
            rope = (None, None)
        if qk_norm:
            q_norm, k_norm = (self.norm_weight(f"model.layers.{i}.{name}.weight") for name in family.qk_norms)
            if family.qk_norm_whole:  # OLMo 2: over all heads at once
                q, k = self.rms_norm(q, q_norm), self.rms_norm(k, k_norm)
            else:
                q = attention.head_norm(b, q, spec.heads, spec.head_dim, q_norm, self.rms_norm)
                k = attention.head_norm(b, k, spec.kv_heads, spec.head_dim, k_norm, self.rms_norm)
        if t.name == "ort":
            ctx = attention.gqa_attention(b, spec, i, q, k, v, *past, self.info, *rope, names, sinks)
        elif t.name == "trt":
            ctx = attention.plugin_attention(b, spec, i, q, k, v, *past, self.info.past_length, *rope)
        else:
            ctx = attention.standard_attention(b, spec, q, k, v, *past, *rope, mask, names, sinks)
        return self.linear(self.gated(ctx, x, p), f"{p}.o_proj")

    def gated(self, ctx: str, x: str, p: str) -> str:
        """LFM3's gate: each head's output [1, S, heads x head_dim] times sigmoid(g_proj(x)) for that head;
        AFMoE's: each value times sigmoid(out_gate_proj(x)) for it; x the attention's input. Without, ctx."""
        b, spec = self.b, self.spec
        if spec.output_gate:
            return b.op("Mul", ctx, b.op("Sigmoid", self.linear(x, f"{p}.out_gate_proj")))
        if not spec.attention_gate:
            return ctx
        weight = self.tensor(f"{p}.g_proj.weight").astype(np.float32).T  # [hidden, heads]
        gate = b.op("MatMul", x, b.act_const(f"{p}.g_proj.weight", weight))
        gate = b.op("Unsqueeze", b.op("Sigmoid", gate), b.int64s(-1))  # [1, S, heads, 1]
        heads = b.op("Reshape", ctx, b.int64s(1, -1, spec.heads, spec.head_dim))
        return b.op("Reshape", b.op("Mul", heads, gate), b.int64s(1, -1, spec.heads * spec.head_dim))
