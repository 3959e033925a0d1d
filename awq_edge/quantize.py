"""AWQ: activation-aware weight quantization (Lin et al. 2023), W4 asymmetric, per group.

Reads top to bottom as the algorithm runs:
  1. cut calibration text into `calib_samples` sequences of `calib_seqlen` tokens;
  2. capture the inputs of decoder block 0 (and each block's attention kwargs);
  3. for each block, one at a time:
     a. run the float block on all sequences: its float output is the next block's input;
        on the way, record mean |x| per input channel of every linear, keep inputs for the
        losses below (`loss_samples` sequences' worth of tokens), and sum x^T x over all
        tokens for the linears in `gptq_all_tokens` (down_proj);
     b. search one scale vector per group (q/k/v <- input norm, o <- v unless GQA, gate/up <-
        MLP norm, down <- up) on a grid of alpha, loss = fp32 MSE of the module output;
     c. fold the scales into the previous op (norm weight or linear rows);
     d. search a clipping threshold per (output channel, group) for every linear but q and k;
     e. quantize to INT4 on that grid (default `rounding="gptq"`: levels chosen by gptq_round so
        rounding errors cancel on the calibration inputs; "nearest": the reference's rounding);
     f. (`block_tune_steps` > 0) tune the block's levels together on its output (SignRound),
        then drop the block's float weights (memory stays ~one block).
lm_head, embeddings and norms stay float.

Memory: the model in its own dtype + one block in fp32 + calib inputs/outputs
(2 x samples x seqlen x hidden x 4 bytes) + the loss inputs. See docs/quantizer.md.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .checkpoint import QuantizedLinear
from .errors import UserError
from .families import Family, find_family
from .model import decoder_layers
from .packing import MAX_INT
from .quantize_settings import QuantizeSettings, check_request


# ---------------------------------------------------------------- INT4 group quantization

def _group_chunks(k: int, group_size: int):
    """(column slice, group slice, group length): the full groups, then the short last one."""
    full = k // group_size
    if full:
        yield slice(0, full * group_size), slice(0, full), group_size
    if full * group_size < k:
        yield slice(full * group_size, k), slice(full, full + 1), k - full * group_size


def _quant_params(wg: torch.Tensor):
    """Per-group scale and zero for wg [..., g]; scale rounded to fp16 as stored."""
    wmax = wg.amax(-1, keepdim=True)
    wmin = wg.amin(-1, keepdim=True)
    scale = ((wmax - wmin).clamp(min=1e-5) / MAX_INT).half().float()
    zero = (-torch.round(wmin / scale)).clamp(0, MAX_INT)
    return scale, zero


def _levels(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The INT4 level (as float) nearest to w on the grid (scale, zero): nearest and GPTQ rounding share it."""
    return (torch.round(w / scale) + zero).clamp(0, MAX_INT)


def _quantize_groups(wg: torch.Tensor, clip: torch.Tensor | None = None):
    """wg [..., g], clamped to +-clip [...] first if given -> (q as float, scale, zero)."""
    if clip is not None:
        c = clip.unsqueeze(-1)
        wg = wg.clamp(-c, c)
    scale, zero = _quant_params(wg)
    return _levels(wg, scale, zero), scale, zero


def _quantized_chunks(w: torch.Tensor, group_size: int, clip: torch.Tensor | None):
    """(column slice, group slice, (q, scale, zero) of those groups) for w [out, in]."""
    out_f = w.shape[0]
    for cols, gs, g in _group_chunks(w.shape[1], group_size):
        wg = w[:, cols].float().reshape(out_f, -1, g)
        yield cols, gs, _quantize_groups(wg, None if clip is None else clip[:, gs])


def quantize_tensor(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None):
    """w [out, in] -> (q uint8 [out, in], scales fp16 [out, groups], zeros uint8 [out, groups]).

    clip [out, groups], if given, clamps each group to [-clip, clip] first.
    """
    out_f, k = w.shape
    groups = -(-k // group_size)
    q = torch.empty(out_f, k, dtype=torch.uint8)
    scales = torch.empty(out_f, groups, dtype=torch.float16)
    zeros = torch.empty(out_f, groups, dtype=torch.uint8)
    for cols, gs, (qg, scale, zero) in _quantized_chunks(w, group_size, clip):
        q[:, cols] = qg.reshape(out_f, -1).to(torch.uint8).cpu()
        scales[:, gs] = scale.squeeze(-1).half().cpu()
        zeros[:, gs] = zero.squeeze(-1).to(torch.uint8).cpu()
    return q, scales, zeros


def fake_quantize(w: torch.Tensor, group_size: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize (same numbers as quantize_tensor), on w's device, in fp32."""
    result = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    for cols, _, (qg, scale, zero) in _quantized_chunks(w, group_size, clip):
        result[:, cols] = ((qg - zero) * scale).reshape(w.shape[0], -1)
    return result


def gram(x: torch.Tensor) -> torch.Tensor:
    """H = x^T x / n of tokens x [n, K], in fp32: what gptq_round needs to know of them."""
    x = x.float()
    return x.T @ x / len(x)


@torch.no_grad()
def gptq_round(w: torch.Tensor, h: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               damp: float, clip: torch.Tensor | None = None, block: int = 128, continuous: bool = False):
    """q uint8 [out, in] on the grid of scales/zeros [out, groups] (and clip [out, groups]) that
    quantize_tensor chose, rounded one input column at a time, each column's rounding error pushed
    onto the columns not yet rounded (GPTQ, Frantar et al. 2022): the error of x @ W^T stays small,
    not each weight's. The grid (AWQ's scales and clipping) is kept: only which of its 16 levels
    each weight takes changes.

    h is gram(x) of the calibration inputs x; gptq_round uses H = h + damp * mean(diag h) * I.
    The damping is heavy (1.0 by default) on purpose: with
    GPTQ's usual 0.01 the rounding fits the calibration text and Wikipedia calibration made
    Shakespeare worse (docs/quantizer.md, session 11).

    continuous=True also returns the values that were rounded ([out, in] fp32, in levels: round
    and clamp them to get q), where block tuning starts from.
    """
    w = w.float().clone()
    out_f, k = w.shape
    step, zero = scales.float(), zeros.float()  # [out, groups]: looked up per column, never expanded
    limit = clip.float() if clip is not None else torch.full_like(step, math.inf)
    h = h.float().clone()
    h.diagonal().add_(damp * h.diagonal().mean() + (h.diagonal() == 0).float())  # unused channels: any value
    h = torch.linalg.cholesky(h)  # one K x K matrix alive at a time (+ its successor): 7B's down is 0.5 GB
    h = torch.cholesky_inverse(h)
    u = torch.linalg.cholesky(h, upper=True)
    del h
    q = torch.empty(out_f, k, dtype=torch.uint8, device=w.device)
    values = torch.empty(out_f, k, device=w.device) if continuous else None
    for b0 in range(0, k, block):  # columns in blocks: the rest of w gets one matmul per block
        b1 = min(k, b0 + block)
        wb = w[:, b0:b1]
        err = torch.empty_like(wb)
        for j in range(b1 - b0):
            c, g = b0 + j, (b0 + j) // group_size
            wc = wb[:, j].clamp(-limit[:, g], limit[:, g])
            qc = _levels(wc, step[:, g], zero[:, g])
            q[:, c] = qc.to(torch.uint8)
            if continuous:
                values[:, c] = wc / step[:, g] + zero[:, g]
            err[:, j] = (wb[:, j] - (qc - zero[:, g]) * step[:, g]) / u[c, c]
            wb[:, j + 1:] -= err[:, j:j + 1] * u[c, c + 1:b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return (q.cpu(), values) if continuous else q.cpu()


def per_column(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """A per-group tensor [out, groups] repeated to one value per input column [out, k], in fp32
    (the last group may be short)."""
    return torch.as_tensor(t).float().repeat_interleave(group_size, 1)[:, :k]


def nearest_values(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                   clip: torch.Tensor | None = None) -> torch.Tensor:
    """What round-to-nearest rounds: w (clamped to +-clip) / scale + zero, [out, in] fp32 in levels."""
    k = w.shape[1]
    w = w.float()
    if clip is not None:
        c = per_column(clip, group_size, k)
        w = w.clamp(-c, c)
    return w / per_column(scales, group_size, k) + per_column(zeros, group_size, k)


@torch.no_grad()
def refit_scales(w: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, h: torch.Tensor,
                 group_size: int, damp: float, diagonal: bool = False) -> torch.Tensor:
    """New scales [out, groups] for levels q and zeros kept: per output row, the least-squares
    fit of w by sum_g scale_g * (q - zero)_g under the output error (w - w_hat)^T H (w - w_hat),
    H = h + damp * mean(diag h) * I (with diagonal=True, only H's diagonal: llama.cpp's weighted
    fit). Rows whose system is singular keep their scales."""
    out_f, k = w.shape
    w = w.float()
    d = q.float() - per_column(zeros, group_size, k)  # [out, K]
    h = h.float().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    if diagonal:
        h = torch.diag(h.diagonal())
    chunks = [(a, min(k, a + group_size)) for a in range(0, k, group_size)]  # the last one may be short
    n = len(chunks)
    wh = w @ h  # [out, K]
    b = torch.stack([(d[:, a:e] * wh[:, a:e]).sum(1) for a, e in chunks], 1)  # [out, groups]
    a_mat = torch.empty(out_f, n, n, device=w.device)
    for j, (a1, e1) in enumerate(chunks):
        p = d[:, a1:e1] @ h[a1:e1]  # [out, K]: (d restricted to group j) H
        for i, (a0, e0) in enumerate(chunks):
            a_mat[:, i, j] = (d[:, a0:e0] * p[:, a0:e0]).sum(1)
    a_mat.diagonal(dim1=1, dim2=2).add_(1e-9)
    new, info = torch.linalg.solve_ex(a_mat, b)
    ok = (info == 0) & torch.isfinite(new).all(1) & (new > 0).all(1)
    return torch.where(ok.view(-1, 1), new.to(scales.dtype).clamp_min(1e-5), scales)


# ---------------------------------------------------------------- calibration data

def calibration_tokens(tokenizer, texts: list[str], n_samples: int, seqlen: int, seed: int = 0,
                       prefix: list[int] = ()) -> torch.Tensor:
    """Shuffle the texts, join them (EOS between), and cut [n, seqlen] token blocks, each
    `prefix` (a deployed prompt's start, evaluate.deployed_prefix) + seqlen - len(prefix) text tokens."""
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    needed = n_samples * (seqlen - len(prefix))
    ids: list[int] = []
    for i in order:
        ids.extend(tokenizer(texts[i], add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if len(ids) >= needed:
            break
    body = seqlen - len(prefix)
    n = min(n_samples, len(ids) // body)
    if n == 0:
        raise UserError(f"the calibration text has {len(ids)} tokens, fewer than one sequence of {seqlen}; "
                        "give more text or a smaller --calib-seqlen")
    text = torch.tensor(ids[: n * body], dtype=torch.long).reshape(n, body)
    return torch.cat([torch.tensor(list(prefix), dtype=torch.long).expand(n, len(prefix)), text], dim=1)


# ---------------------------------------------------------------- capturing block inputs

def capture_block_inputs(model, tokens: torch.Tensor, batch_size: int):
    """Layer 0's input hidden states for every sequence, and each layer's kwargs.

    Every decoder layer is swapped for a pass-through that records what it is called
    with, so one pass over the embeddings costs almost nothing. Kwargs come from a
    batch-1 call so their masks/rotary tables broadcast over any batch size.
    """
    layers = decoder_layers(model)
    family = find_family(model.config.model_type, model.config)
    # (GPT-Neo's, Bamba's: (hidden, attention weights), unpacked or indexed)
    as_returned = (lambda h: (h, None)) if family and family.block_returns_tuple else (lambda h: h)
    recorded_kwargs: list[dict] = [{} for _ in layers]
    first_inputs: list[torch.Tensor] = []

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if not recorded_kwargs[i]:
                kwargs.pop("past_key_values", None)
                kwargs["use_cache"] = False
                recorded_kwargs[i] = kwargs
            if i == 0:
                first_inputs.append(hidden_states.detach().float().cpu())
            return as_returned(hidden_states)
        return forward

    for i, layer in enumerate(layers):
        layer.forward = recorder(i)
    try:
        with torch.no_grad():
            model.base_model(input_ids=tokens[:1], use_cache=False)
            first_inputs.clear()
            for start in range(0, len(tokens), batch_size):
                model.base_model(input_ids=tokens[start:start + batch_size], use_cache=False)
    finally:
        for layer in layers:
            del layer.forward  # back to the class's forward
    return torch.cat(first_inputs), recorded_kwargs


def _layer_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------- the groups of one block

@dataclass
class ScaleGroup:
    name: str
    prev: nn.Module  # the op the scales fold into (a norm or a linear)
    linears: list[nn.Linear]  # the linears that read the scaled tensor
    # "self_attn" | "mlp" | "parallel" (attention + MLP on one input: Cohere's block) | a linear's name:
    # the module whose output the loss compares
    inspect: str
    input_of: str  # the linear whose captured input feeds `inspect`
    # prev's output is divided by s ** (1 / prev_root): 2 across relu(x)^2, which turns x / sqrt(s)
    # into relu(x)^2 / s (Arcee's up_proj before down_proj)
    prev_root: int = 1
    # the rows of a linear prev that the scales divide, (first, end); None: all (LFM2's out group: C's
    # rows of in_proj, since out_proj reads C * conv(B * x))
    prev_rows: tuple | None = None
    # linears that read the scaled tensor too but stay float (a mixture of experts' router): their
    # weights take the scales when the group is applied, and the search leaves them as they are
    floats: tuple = ()


# their loss runs attention, or (LFM2's in_proj) a convolution over the tokens: whole sequences
SEQUENCE_INPUTS = ("q_proj", "k_proj", "v_proj", "in_proj", "in_proj_qkv")
# act(x / c) = act(x) / c^root for every c > 0, of the MLP activations that have one
ACTIVATION_ROOTS = {"relu2": 2, "relu": 1}


def block_groups(layer, family: Family, config) -> list[ScaleGroup]:
    """The scale groups of one block. Under GQA (fewer KV heads than query heads) there is no o
    group: a v channel feeds several query heads, so o's inputs can only take scales shared
    across those heads, and every shared rule we measured (x_mean averaged, max, RMS over the
    heads; losses plain, relative to the residual, down-weighting outliers) did worse than
    leaving o unscaled, on two texts and four paired calibration runs (docs/quantizer.md).

    A block without pre-norms (OLMo 2), or whose norms have no weight (OLMo 1), has no qkv or
    gate_up group: their input is the residual stream itself, or a norm's output that no weight of
    the block could divide by the scales; those linears are clipped and rounded only. An MLP
    without a gate (Arcee) has an up group in gate_up's place, and a down group only across an
    activation that scales through (relu^2: ACTIVATION_ROOTS). A parallel block (Cohere: attention
    and MLP on one norm) has one qkv_gate_up group, scored on the sum of the attention's and the
    MLP's outputs, as AutoAWQ's GPT-J. An LFM2 short convolution has an in group (in_proj, scored
    on the convolution's output) in qkv's place, and an out group in o's: out_proj reads
    C * conv(B * x), so its scales fold into C's rows of in_proj (C / s gives that product / s).
    A Qwen3.5 gated delta net has an in group (in_proj_qkv and in_proj_z, b and a in float, scored on
    the delta net's output over whole sequences) and no out group: out_proj reads a norm per value head
    times silu(z), which no scale folds across. A Granite 4.0-H Mamba-2 mixer's in group is all of its
    in_proj (z, x B C and dt, read back with dt float), its out_proj likewise without a group.

    A mixture of experts (model.SparseMoe) has one gate_up group of every expert's gate and up (their
    input is the norm's, all tokens; AutoAWQ's Mixtral), scored on the whole mixture, whose router
    takes the scales in float; and a down group per expert, on the tokens routed to it (none, if
    the calibration routed none there; none across gpt-oss's clamped SwiGLU). Qwen2-MoE's shared
    expert joins the gate_up group (its sigmoid gate in float, as the router) and has a down group."""
    mlp, conv, moe = layer.mlp, layer.conv if is_conv_layer(layer) else None, is_moe_layer(layer)
    delta = getattr(layer, "linear_attn", None)
    attn = None if conv or delta is not None else layer.self_attn
    groups = []
    qkv = [attn.q_proj, attn.k_proj, attn.v_proj, *output_gate(attn)] if attn is not None else []
    shared = getattr(mlp, "shared_expert", None) if moe else None  # (Qwen2-MoE's, on every token)
    if moe:  # every expert's gate and up (gated, never in a parallel block: the family table's test)
        experts = [*mlp.experts, *([shared] if shared is not None else [])]
        mlp_in, mlp_group = [lin for expert in experts for lin in (expert.gate_proj, expert.up_proj)], "gate_up"
    else:
        mlp_in, mlp_group = ([mlp.gate_proj, mlp.up_proj], "gate_up") if family.gated_mlp else ([mlp.up_proj], "up")
    foldable = family.pre_norms and family.norm_weight  # a norm with a weight to divide by the scales
    if conv is not None:
        hidden = conv.out_proj.in_features
        if foldable:
            groups.append(ScaleGroup("in", layer.input_layernorm, [conv.in_proj], "conv", "in_proj"))
        groups.append(ScaleGroup("out", conv.in_proj, [conv.out_proj], "out_proj", "out_proj",
                                 prev_rows=(hidden, 2 * hidden)))
    elif delta is not None and foldable:  # (Qwen3.5's b and a, one row a value head, stay float, as a router; a
        # Mamba-2's dt, in in_proj with z and x B C, is quantized with them and read back float)
        gated = hasattr(delta, "in_proj_b")
        linears = [delta.in_proj_qkv, delta.in_proj_z, *([] if gated else [delta.in_proj_a])]
        groups.append(ScaleGroup("in", layer.input_layernorm, linears, "linear_attn", "in_proj_qkv",
                                 floats=(delta.in_proj_b, delta.in_proj_a) if gated else ()))
    elif family.parallel_block:  # q/k/v and gate/up read one norm: one group, its loss on attention + MLP
        groups.append(ScaleGroup(f"qkv_{mlp_group}", layer.input_layernorm, qkv + mlp_in, "parallel", "q_proj"))
    elif foldable:
        # (LFM3's head gate g_proj reads that norm too, and stays float: as a router, it takes the scales)
        groups.append(ScaleGroup("qkv", layer.input_layernorm, qkv, "self_attn", "q_proj",
                                 floats=tuple(attention_gate(attn))))
    # (OLMo 1's clip_qkv clamps v: clamp(v / s) is not clamp(v) / s, so o's scales would not fold exactly)
    # (multi-head attention: v as wide as o's input; what the config calls KV heads may be a key its model ignores)
    multi_head = attn is not None and attn.v_proj.out_features == attn.o_proj.in_features
    if multi_head and not getattr(config, "clip_qkv", None):
        groups.append(ScaleGroup("o", attn.v_proj, [attn.o_proj], "o_proj", "o_proj"))
    if foldable and not family.parallel_block:  # (a mixture's router reads the norm's output too, every token)
        groups.append(ScaleGroup(mlp_group, getattr(layer, family.mlp_norm), mlp_in, "mlp",
                                 "router" if moe else "gate_proj" if family.gated_mlp else "up_proj",
                                 floats=(mlp.gate, *([mlp.shared_expert_gate] if family.shared_expert_gate and shared
                                                     else [])) if moe else ()))
    if moe:  # (across gpt-oss's clamped SwiGLU, (up + 1) * ..., no scale folds)
        groups += [ScaleGroup(f"experts.{j}.down", e.up_proj, [e.down_proj], f"experts.{j}.down_proj",
                              f"experts.{j}.down_proj") for j, e in enumerate(mlp.experts)
                   if family.expert_act == "silu"]
        if shared is not None:
            groups.append(ScaleGroup("shared_expert.down", shared.up_proj, [shared.down_proj],
                                     "shared_expert.down_proj", "shared_expert.down_proj"))
    elif family.gated_mlp or family.activation in ACTIVATION_ROOTS:  # down's input: act(gate) * up, or act(up)
        root = 1 if family.gated_mlp else ACTIVATION_ROOTS[family.activation]
        groups.append(ScaleGroup("down", mlp.up_proj, [mlp.down_proj], "down_proj", "down_proj", root))
    return groups


def is_moe_layer(layer) -> bool:
    """A block whose MLP is a mixture of experts, as model.experts_as_linears leaves it."""
    return isinstance(getattr(layer.mlp, "experts", None), nn.ModuleList)


def output_gate(attn) -> list[nn.Linear]:
    """AFMoE's gate on the attention's output (self_attn.out_gate_proj, quantized; it reads q/k/v's input), or none."""
    gate = getattr(attn, "out_gate_proj", None)
    return [gate] if isinstance(gate, nn.Linear) else []


def attention_gate(attn) -> list[nn.Linear]:
    """LFM3's gate on each head's output (self_attn.g_proj), or none."""
    gate = getattr(attn, "g_proj", None)
    return [gate] if isinstance(gate, nn.Linear) else []


def is_conv_layer(layer) -> bool:
    """An LFM2 block whose mixer is a short convolution (layer.conv), not attention."""
    return not hasattr(layer, "self_attn") and hasattr(layer, "conv")


def _linear_names(layer) -> dict[str, nn.Linear]:
    """A block's quantized linears by name (no gate_proj in an MLP without a gate; LFM2's short
    convolutions have in_proj and out_proj in q/k/v/o's place; a mixture of experts' are
    experts.{j}.gate_proj, ...: _path puts mlp. before them)."""
    m = layer.mlp
    if is_conv_layer(layer):
        mixer = {"in_proj": layer.conv.in_proj, "out_proj": layer.conv.out_proj}
    elif hasattr(layer, "linear_attn"):  # (Qwen3.5's gated delta nets: in_proj_b and in_proj_a stay float; a
        d = layer.linear_attn             # Mamba-2's in_proj_a, quantized within its in_proj)
        mixer = {"in_proj_qkv": d.in_proj_qkv, "in_proj_z": d.in_proj_z, "out_proj": d.out_proj,
                 **({} if hasattr(d, "in_proj_b") else {"in_proj_a": d.in_proj_a})}
    else:
        a = layer.self_attn
        mixer = {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj, "o_proj": a.o_proj,
                 **{"out_gate_proj": gate for gate in output_gate(a)}}
    if is_moe_layer(layer):  # (Qwen2-MoE's shared expert too: shared_expert.gate_proj, ...)
        shared = m.shared_expert if hasattr(m, "shared_expert") else None
        return {**mixer, **{f"experts.{j}.{n}": getattr(e, n) for j, e in enumerate(m.experts)
                            for n in ("gate_proj", "up_proj", "down_proj")},
                **({f"shared_expert.{n}": getattr(shared, n) for n in ("gate_proj", "up_proj", "down_proj")}
                   if shared is not None else {})}
    return {**mixer, **({"gate_proj": m.gate_proj} if hasattr(m, "gate_proj") else {}), "up_proj": m.up_proj,
            "down_proj": m.down_proj}


# ---------------------------------------------------------------- scale search

def _weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """Mean over output rows of |w| / max|w| of its group, per input channel (duo scaling)."""
    w = torch.cat(weights, 0).abs()
    normed = torch.empty_like(w)
    for cols, _, g in _group_chunks(w.shape[1], group_size):
        wg = w[:, cols].reshape(w.shape[0], -1, g)
        normed[:, cols] = (wg / (wg.amax(-1, keepdim=True) + 1e-6)).reshape(w.shape[0], -1)
    return normed.mean(0)


def coarse_to_fine(n: int, loss_at, keep: int = 3, first_step: int | None = None) -> tuple[int, dict[int, float]]:
    """The i in 0 .. n-1 with the lowest loss_at(i), lowest i on ties: every `step`-th i first
    (first_step; by default the largest power of two with 4 * step <= n; 1 tries every i), then
    the step halved around each of the `keep` best points so far, down to 1: ~13 losses for n = 20,
    not 20. If the loss is unimodal in i, its minimum lies within one step of the best point of
    each pass, so this returns the argmin of all n. Measured alpha-loss curves are jagged (51 of SmolLM2's 90 groups have several
    local minima): of 180 groups (two runs), around the best point alone the search missed the
    grid's argmin in 15, around the best two in 2, around the best three in none
    (docs/quantizer.md, session 20).
    -> (best i, {i: loss} of the i tried)."""
    tried: dict[int, float] = {}
    step = first_step
    if step is None:
        step = 1
        while 8 * step <= n:
            step *= 2

    def ranked() -> list[int]:
        return sorted(tried, key=lambda i: (tried[i], i))

    def try_all(candidates) -> None:
        for i in candidates:
            if 0 <= i < n and i not in tried:
                tried[i] = loss_at(i)

    try_all(range(0, n, step))
    while step > 1:
        step //= 2
        try_all([b + d for b in ranked()[:keep] for d in (-step, step)])
    return ranked()[0], tried


def search_scales(g: ScaleGroup, x_mean: torch.Tensor, run_module, settings: QuantizeSettings):
    """Grid search of alpha for one group (coarse_to_fine, or every alpha with scale_search full).
    Returns (scales on the prev-op side, best alpha, [(alpha, loss)] of the alphas tried)."""
    originals = [lin.weight.data.clone() for lin in g.linears]
    reference = run_module()
    w_mean = _weight_mean(originals, settings.group_size) if settings.duo_scaling else None

    def scales(alpha: float) -> torch.Tensor:
        s = x_mean.pow(alpha)
        if w_mean is not None:
            s = s / (w_mean.pow(1 - alpha) + 1e-4)
        s = s.clamp(min=1e-4)
        return s / (s.max() * s.min()).sqrt()

    def loss_at(i: int) -> float:
        s = scales(i / settings.scale_grid)
        for lin, w in zip(g.linears, originals):
            lin.weight.data = fake_quantize(w * s, settings.group_size) / s
        loss = sum(float((out - ref).float().pow(2).sum()) for out, ref in zip(run_module(), reference))
        return loss / sum(r.numel() for r in reference)

    try:
        best, tried = coarse_to_fine(settings.scale_grid, loss_at,
                                     first_step=1 if settings.scale_search == "full" else None)
    finally:
        for lin, w in zip(g.linears, originals):
            lin.weight.data = w
    alpha = best / settings.scale_grid
    return scales(alpha), alpha, [(i / settings.scale_grid, tried[i]) for i in sorted(tried)]


# ---------------------------------------------------------------- clipping search

def clip_ratios(settings: QuantizeSettings) -> list[float]:
    """The clip candidates, as fractions of max |w|: clip_grid steps from 1.0 down to 1 - clip_max_shrink."""
    return torch.linspace(1.0, 1.0 - settings.clip_max_shrink, settings.clip_grid).tolist()


def subsample_tokens(x: torch.Tensor, n: int) -> torch.Tensor:
    """n tokens of x [tokens, K], evenly spaced over all of them (x itself if it has no more)."""
    return x[torch.linspace(0, len(x) - 1, n).long()] if len(x) > n else x


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, settings: QuantizeSettings, oc_batch: int = 256,
                error=None) -> torch.Tensor:
    """Best max |w| per (output channel, group): minimises each group's partial-output MSE.

    error(d, o0), if given, scores the partial-output change d [groups, tokens, oc] of output
    channels o0.. in place of d^2 (benchmarks/quantizer_lab.py tries other scorings with it)."""
    out_f, k = w.shape
    x = subsample_tokens(x, settings.clip_tokens)
    gs_total = -(-k // settings.group_size)
    best_clip = torch.empty(out_f, gs_total, device=w.device)
    ratios = clip_ratios(settings)
    for cols, gsl, g in _group_chunks(k, settings.group_size):
        xg = x[:, cols].reshape(len(x), -1, g).permute(1, 0, 2)  # [groups, tokens, g]
        for o0 in range(0, out_f, oc_batch):
            wg = w[o0:o0 + oc_batch, cols].reshape(-1, xg.shape[0], g)  # [oc, groups, g]
            max_abs = wg.abs().amax(-1)  # [oc, groups]
            ref = torch.bmm(xg, wg.permute(1, 2, 0))  # [groups, tokens, oc]
            best_err = torch.full_like(max_abs, math.inf)
            best = max_abs.clone()
            for r in ratios:
                c = max_abs * r
                wq = fake_quantize_groups(wg, c)
                d = torch.bmm(xg, wq.permute(1, 2, 0)) - ref
                err = (d.pow(2) if error is None else error(d, o0)).mean(1).T  # [oc, groups]
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better, c, best)
            best_clip[o0:o0 + oc_batch, gsl] = best
    return best_clip


def fake_quantize_groups(wg: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """wg [oc, groups, g] clamped to +-clip [oc, groups], quantized and dequantized."""
    qg, scale, zero = _quantize_groups(wg, clip)
    return (qg - zero) * scale


# ---------------------------------------------------------------- the driver

@dataclass
class QuantizeResult:
    linears: dict[str, QuantizedLinear]
    layer_report: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict = field(default_factory=dict)
    calib_tokens: int = 0


def _batched(t: torch.Tensor, batch: int):
    for start in range(0, len(t), batch):
        yield t[start:start + batch]


def _to_quantized(lin: nn.Linear, group_size: int, clip=None, gptq_h=None, damp: float | None = None,
                  refit: str = "none", refit_damp: float = 1.0, continuous: bool = False):
    """The linear's INT4 form; with gptq_h (gram of its calibration inputs) and damp, rounded by
    gptq_round, then (refit full|diag) its scales refit to those levels under gptq_h.
    continuous=True: (that, the values the levels were rounded from), for tune_block_outputs."""
    q, scales, zeros = quantize_tensor(lin.weight.data, group_size, clip)
    values = None
    if gptq_h is not None:
        dev = gptq_h.device
        scales_dev, zeros_dev = scales.to(dev), zeros.to(dev)
        q = gptq_round(lin.weight.data, gptq_h, scales_dev, zeros_dev, group_size, damp, clip,
                       continuous=continuous)
        if continuous:
            q, values = q
        if refit != "none":
            scales = refit_scales(lin.weight.data, q.to(dev), scales_dev, zeros_dev, gptq_h, group_size,
                                  refit_damp, diagonal=refit == "diag").cpu()
    elif continuous:
        values = nearest_values(lin.weight.data, scales.to(lin.weight.device), zeros.to(lin.weight.device),
                                group_size, clip)
    bias = lin.bias.data.float().cpu().numpy() if lin.bias is not None else None
    quantized = QuantizedLinear(q.numpy(), scales.numpy(), zeros.numpy(), group_size, bias)
    return (quantized, values) if continuous else quantized


class TunedWeight(torch.autograd.Function):
    """W = (clamp(round(values + v), 0, 15) - zero) * scale, scale and zero per group; round passes
    the gradient straight through, clamp stops it outside [0, 15] (as autograd would for these ops).
    Written out so that backward keeps only its inputs: autograd's graph of the same ops holds
    weight-sized tensors per linear (per-column scale and zero, clamp's input), ~12 bytes per
    weight more, 2.4 GB for a 7B block. v None: the levels as rounded."""

    @staticmethod
    def forward(ctx, values, v, zero, scale, group_size):
        ctx.save_for_backward(values, v, scale)
        ctx.group_size = group_size
        k = values.shape[1]
        levels = torch.round(values if v is None else values + v).clamp_(0, MAX_INT)
        return (levels - per_column(zero, group_size, k)) * per_column(scale, group_size, k)

    @staticmethod
    def backward(ctx, grad):
        values, v, scale = ctx.saved_tensors
        levels = torch.round(values + v)
        inside = (levels >= 0) & (levels <= MAX_INT)
        return None, torch.where(inside, grad * per_column(scale, ctx.group_size, values.shape[1]), 0.0), None, None, None


def _autograd_ready(t):
    """t (or a tuple's tensors), cloned if made under torch.inference_mode(): autograd cannot save those."""
    if isinstance(t, tuple):
        return tuple(map(_autograd_ready, t))
    return t.clone() if isinstance(t, torch.Tensor) and t.is_inference() else t


# The caller may run under torch.no_grad() or torch.inference_mode() (quantize_model's own steps
# are fine under either); the tuning steps need autograd: inference mode off here, grad on around them.
@torch.inference_mode(False)
def tune_block_outputs(layer, rounded: dict, inputs: torch.Tensor, targets: torch.Tensor, kwargs: dict,
                       settings: QuantizeSettings) -> tuple[dict, dict]:
    """SignRound (Cheng et al. 2023, AutoRound) on one block, started from the levels it has.

    rounded: linear module -> (QuantizedLinear, the values its levels were rounded from). Each
    linear's weight becomes (clamp(round(values + v), 0, 15) - zero) * scale with v in [-0.5, 0.5]
    per weight, 0 at the start (the levels as rounded); round passes the gradient straight through.
    v follows the sign of the gradient of the block output's MSE against the float block's, on
    `block_tune_batch` random calibration sequences per step, the step size falling linearly from
    block_tune_lr / steps (AutoRound's schedule with lr 1; on SmolLM2 0.25 measured best: only
    values near a rounding boundary should flip). The first `batch_size` sequences (a quarter at
    most) are held out of the steps; the result is kept only if it lowers their MSE.
    -> ({module: new QuantizedLinear}, report)."""
    steps = settings.block_tune_steps
    dev = torch.device(settings.device)  # (the linears' own weights may be released already)
    paths = {id(m): n for n, m in layer.named_modules()}
    for p in layer.parameters():
        p.requires_grad_(False)
    # tensors made under the caller's inference mode (its inputs and kwargs; the block's weights if
    # the model was built in it) join the autograd as normal copies (inputs[seqs] is one already)
    kwargs = {k: _autograd_ready(v) for k, v in kwargs.items()}
    fixed = {n: t.clone() for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_inference()}
    state = {}
    for lin, (ql, values) in rounded.items():
        state[lin] = dict(values=_autograd_ready(values.to(dev)), zero=torch.as_tensor(ql.zeros).float().to(dev),
                          scale=torch.as_tensor(ql.scales).float().to(dev), group_size=ql.group_size,
                          v=torch.zeros_like(values, device=dev, requires_grad=True))

    def weights(tuned: bool = True):
        return fixed | {paths[id(lin)] + ".weight": TunedWeight.apply(st["values"], st["v"] if tuned else None,
                                                                      st["zero"], st["scale"], st["group_size"])
                        for lin, st in state.items()}

    def block_mse(w, seqs):
        y = _layer_output(torch.func.functional_call(layer, w, (inputs[seqs].to(dev),), kwargs))
        return (y - targets[seqs].to(dev)).pow(2).mean()

    # the first batch_size sequences judge the result, the others train (all, if too few)
    n_check = min(settings.batch_size, len(inputs) // 4)
    check = torch.arange(max(n_check, 1))
    with torch.no_grad():
        before = block_mse(weights(tuned=False), check).item()
    gen = torch.Generator().manual_seed(settings.calib_seed)
    params = [st["v"] for st in state.values()]
    for step in range(steps):
        seqs = n_check + torch.randperm(len(inputs) - n_check, generator=gen)[:settings.block_tune_batch]
        with torch.enable_grad():  # the steps need their gradient, even under the caller's torch.no_grad()
            # (an expert none of these sequences reached has no gradient: it stays as it is)
            grads = torch.autograd.grad(block_mse(weights(), seqs), params, allow_unused=True)
        lr = settings.block_tune_lr * (1 - step / steps) / steps
        with torch.no_grad():
            for v, g in zip(params, grads):
                if g is not None:
                    v.sub_(lr * torch.sign(g)).clamp_(-0.5, 0.5)
    with torch.no_grad():
        after = block_mse(weights(), check).item()
    report = {"mse_before": before, "mse_after": after, "kept": after < before}
    if not after < before:
        return {lin: ql for lin, (ql, _) in rounded.items()}, report
    new = {}
    with torch.no_grad():
        for lin, st in state.items():
            ql = rounded[lin][0]
            q = torch.round(st["values"] + st["v"]).clamp(0, MAX_INT).to(torch.uint8).cpu().numpy()
            new[lin] = QuantizedLinear(q, ql.scales, ql.zeros, ql.group_size, ql.bias)
    return new, report


def _release(lin: nn.Linear) -> None:
    """Drop a quantized linear's float weight: peak memory stays at about one block."""
    lin.weight = nn.Parameter(torch.empty(0), requires_grad=False)


def quantize_model(model, family: Family, tokens: torch.Tensor | None, settings: QuantizeSettings,
                   progress: bool = True, materialize=lambda i: None) -> QuantizeResult:
    """Quantize every decoder block of `model` in place (its norms take the folded scales).

    materialize(i) loads block i's weights just before it is needed (see model.load_for_quantization).
    """
    settings.validate()
    started = time.time()
    dev = torch.device(settings.device)
    layers = decoder_layers(model)
    result = QuantizeResult({}, settings=asdict(settings))
    prefix = "model.layers"

    if settings.method == "rtn":
        for i, layer in enumerate(tqdm(layers, desc="rtn", unit="block", disable=not progress)):
            materialize(i)
            for name, lin in _linear_names(layer).items():
                result.linears[f"{prefix}.{i}.{_path(name, layer)}"] = _to_quantized(lin, settings.group_size)
                _release(lin)
        result.seconds = time.time() - started
        return result

    inputs, layer_kwargs = capture_block_inputs(model, tokens, settings.batch_size)
    result.calib_tokens = int(tokens.numel())
    n_loss = min(settings.loss_samples, len(inputs))
    # Attention needs whole sequences: q/k/v keep the first n_loss of them. The other linears'
    # losses are per token, so they take the same number of tokens strided over ALL sequences:
    # same cost, more diverse text.
    token_stride = max(1, len(inputs) // n_loss)
    bar = tqdm(list(enumerate(layers)), desc="awq", unit="block", disable=not progress)
    for i, layer in bar:
        materialize(i)
        orig_dtype = next(layer.parameters()).dtype
        layer.to(dev, torch.float32)
        kwargs = {k: (v.to(dev) if isinstance(v, torch.Tensor) else
                      tuple(t.to(dev) for t in v) if isinstance(v, tuple) else v)
                  for k, v in layer_kwargs[i].items()}
        linears = _linear_names(layer)
        # the modules whose inputs are captured: the quantized linears, and a mixture of experts' router
        # (its input is the mixture's, every token; an expert's linears see the tokens routed to it)
        readers = {**linears, **({"router": layer.mlp.gate} if is_moe_layer(layer) else {})}

        # a. float outputs for the next block; |x| statistics; loss inputs
        abs_sum: dict[str, torch.Tensor] = {}
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in readers}
        grams = {n: 0 for n in linears if settings.rounding == "gptq"
                 and (n in settings.gptq_all_tokens or n in settings.gptq_strided)}
        counted = {"tokens": 0, "seqs": 0}

        def hook(name):
            def fn(_module, args, _out):
                x = args[0].detach().float()
                flat = x.reshape(-1, x.shape[-1])
                abs_sum[name] = abs_sum.get(name, 0) + flat.abs().sum(0)
                if name in grams:
                    if name in settings.gptq_strided:
                        sample = flat[(-counted["tokens"]) % token_stride::token_stride]
                        grams[name] += sample.T @ sample
                    else:
                        grams[name] += flat.T @ flat  # in place after the first batch: one K x K sum alive
                if name in SEQUENCE_INPUTS:
                    if counted["seqs"] < n_loss:
                        captured[name].append(x[: n_loss - counted["seqs"]].clone())
                else:
                    start = (-counted["tokens"]) % token_stride  # global stride across batches
                    captured[name].append(flat[start::token_stride].clone())
            return fn

        handles = [lin.register_forward_hook(hook(n)) for n, lin in readers.items()]
        outputs = []
        with torch.no_grad():
            for xb in _batched(inputs, settings.batch_size):
                outputs.append(_layer_output(layer(xb.to(dev), **kwargs)).float().cpu())
                counted["seqs"] += len(xb)
                counted["tokens"] += xb.shape[0] * xb.shape[1]
        for h in handles:
            h.remove()
        outputs = torch.cat(outputs)
        x_mean = {n: v / counted["tokens"] for n, v in abs_sum.items()}
        grams = {n: v / counted["tokens"] for n, v in grams.items()}
        loss_inputs = {n: torch.cat(captured.pop(n)) if captured[n] else torch.zeros(0, lin.in_features, device=dev)
                       for n, lin in readers.items()}  # pop: no second copy; (an expert no token reached: none)

        # b + c. scales, group by group
        report = {"layer": i, "groups": {}}
        groups = block_groups(layer, family, model.config)
        # the bar shows the loss of the group that scales the MLP's input (gate_up, up, qkv_gate_up), else down's
        shown = next((g.name for g in groups if g.inspect in ("mlp", "parallel") or g.name == "down"), None)
        with torch.no_grad():
            for g in groups:
                x = loss_inputs[g.input_of]
                if not len(x):  # (an expert the calibration routed no token to: its down takes no scales)
                    continue
                run = _module_runner(layer, g, x, kwargs, settings.batch_size)
                s, alpha, losses = search_scales(g, x_mean[g.input_of], run, settings)
                report["groups"][g.name] = {"alpha": alpha, "loss": min(loss for _, loss in losses),
                                            "loss_alpha0": losses[0][1], "losses": losses}
                _apply_group(g, s, family, loss_inputs, readers, grams)

            # d + e. clip (not q/k: their errors are amplified by the softmax) and quantize
            # (--rounding gptq: not q/k either; their output MSE measured a poor guide there too)
            tuning = settings.block_tune_steps > 0
            rounded = {}
            for name, lin in linears.items():
                clip, gptq_h = None, None
                if name not in ("q_proj", "k_proj") and len(loss_inputs[name]):  # (an expert no token reached)
                    x = loss_inputs[name].reshape(-1, loss_inputs[name].shape[-1])
                    clip = search_clip(lin.weight.data, x, settings) if settings.clip_grid > 0 else None
                    if settings.rounding == "gptq":
                        gptq_h = grams.pop(name) if name in grams else gram(x)
                rounded[name] = _to_quantized(
                    lin, settings.group_size, clip, gptq_h, settings.gptq_damp,
                    settings.scale_refit if name in settings.refit_linears else "none", settings.refit_damp,
                    continuous=tuning)
                _release(lin)  # tuning works from the levels, scales and zeros alone
        loss_inputs = None  # freed before the tuning
        if tuning:  # f. the whole block's levels, tuned on its output
            tuned, report["tune"] = tune_block_outputs(layer, {linears[n]: r for n, r in rounded.items()},
                                                       inputs, outputs, kwargs, settings)
            rounded = {n: tuned[linears[n]] for n in rounded}
        for name, quantized in rounded.items():
            result.linears[f"{prefix}.{i}.{_path(name, layer)}"] = quantized
        layer.to(orig_dtype)
        result.layer_report.append(report)
        inputs, outputs = outputs, None
        if shown:
            bar.set_postfix(mlp_loss=f"{report['groups'][shown]['loss']:.2e}")
    result.seconds = time.time() - started
    return result


def _path(name: str, layer) -> str:
    """A block's linear (_linear_names) -> its name in the block."""
    return ("self_attn." if name in ("q_proj", "k_proj", "v_proj", "o_proj", "out_gate_proj") else
            "linear_attn." if hasattr(layer, "linear_attn") and name in ("in_proj_qkv", "in_proj_z", "in_proj_a",
                                                                         "out_proj") else
            "conv." if name in ("in_proj", "out_proj") else "mlp.") + name


def _module_runner(layer, g: ScaleGroup, x: torch.Tensor, kwargs: dict, batch: int):
    """A function returning the list of `g.inspect` outputs on x, batch by batch.

    x is [sequences, tokens, K] for attention and [tokens, K] for the per-token modules."""
    if g.inspect == "self_attn":
        return lambda: [layer.self_attn(hidden_states=xb, **kwargs)[0] for xb in _batched(x, batch)]
    if g.inspect == "parallel":
        return lambda: [layer.self_attn(hidden_states=xb, **kwargs)[0] + layer.mlp(xb) for xb in _batched(x, batch)]
    if g.inspect == "conv":  # (LFM2's short convolution: whole sequences, no cache)
        return lambda: [layer.conv(xb) for xb in _batched(x, batch)]
    if g.inspect == "linear_attn":  # (Qwen3.5's gated delta net: whole sequences, no cache)
        return lambda: [layer.linear_attn(xb) for xb in _batched(x, batch)]
    rows = 4096
    if g.inspect == "mlp":  # (gpt-oss's mixture returns a tuple, its output first)
        return lambda: [_layer_output(layer.mlp(xb)) for xb in _batched(x, rows)]
    lin = _linear_names(layer)[g.inspect]
    return lambda: [lin(xb) for xb in _batched(x, rows)]


def _apply_group(g: ScaleGroup, s: torch.Tensor, family: Family, loss_inputs: dict, linears: dict,
                 grams: dict) -> None:
    prev = g.prev
    if isinstance(prev, nn.Linear):
        root = s if g.prev_root == 1 else s ** (1 / g.prev_root)
        rows = slice(*g.prev_rows) if g.prev_rows else slice(None)
        prev.weight[rows].div_(root.view(-1, 1))
        if prev.bias is not None:
            prev.bias[rows].div_(root)
    else:  # a norm: y = normalized(x) * (offset + w) (+ b: LayerNorm's); Gemma's and Nemotron's offset is 1
        prev.weight.copy_((prev.weight.float() + family.norm_offset) / s - family.norm_offset)
        if getattr(prev, "bias", None) is not None:
            prev.bias.div_(s)
    for lin in (*g.linears, *g.floats):
        lin.weight.mul_(s.view(1, -1))
    # The captured inputs of the scaled linears are now x / s (q/k/v share one input), and
    # their grams (x/s)^T (x/s) / n. Each linear has its own copies, so each is divided once.
    for name, lin in linears.items():
        if any(lin is scaled for scaled in (*g.linears, *g.floats)):
            loss_inputs[name].div_(s)
            if name in grams:
                grams[name].div_(s.view(-1, 1)).div_(s.view(1, -1))


# ---------------------------------------------------------------- model dir -> checkpoint dir

def float_tensors(model, family: Family, quantized: dict[str, QuantizedLinear]) -> dict[str, np.ndarray]:
    """Every tensor of the model that is not a quantized linear (embeddings, norms, lm_head), under
    our names, as `quantized` is (GPT-NeoX's gpt_neox.layers are our model.layers)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    out = {}
    for name, t in model.state_dict().items():
        name = family.our_name(name)
        owner = name.rsplit(".", 1)[0]
        if owner in quantized or (tied and name == "lm_head.weight"):
            continue
        out[name] = t.detach().float().cpu().numpy()
    return out


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but torch sees no CUDA GPU; use --device cpu")
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device {device} is unknown; use cpu, cuda or auto")
    return device


def quantize_checkpoint(source: str, output, settings: QuantizeSettings, calib: str | None = None,
                        force: bool = False, progress: bool = True, checkpoint_format: str = "awq") -> dict:
    """`awq-edge quantize`: load, calibrate, quantize, and write a checkpoint atomically.

    checkpoint_format: "awq" (AutoAWQ GEMM) or "compressed-tensors" (llm-compressor's pack-quantized)."""
    import shutil
    from pathlib import Path

    from . import __version__, data
    from .checkpoint import commit_staging, output_staging, write_checkpoint
    from .memory import peak_rss_bytes
    from .model import load_for_quantization

    model_dir, config, family = check_request(source, output, settings, checkpoint_format, force)
    settings.device = resolve_device(settings.device)
    output = Path(output)
    texts, calib_source = [], "none (rtn)"
    if settings.method == "awq":
        if calib:
            texts, calib_source = data.read_texts(calib), str(calib)
        else:
            texts = data.read_texts(data.fetch_wikipedia()[0])
            calib_source = f"builtin: Wikipedia calibration split ({data.GENSIM_WHEEL} test dump)"
    model, tokenizer, materialize = load_for_quantization(model_dir)
    tokens, prefix = None, []
    if settings.method == "awq":
        from .evaluate import window_prefix

        prefix = window_prefix(tokenizer, settings.calib_protocol)  # the evaluation protocols' names
        tokens = calibration_tokens(tokenizer, texts, settings.calib_samples, settings.calib_seqlen,
                                    settings.calib_seed, prefix)
    result = quantize_model(model, family, tokens, settings, progress=progress, materialize=materialize)
    metadata = {
        "awq_edge_version": __version__,
        "source_model": str(source),
        "checkpoint_format": checkpoint_format,
        "family": family.name,
        "settings": result.settings,
        "calibration": {"source": calib_source, "tokens": result.calib_tokens,
                        "sequences": 0 if tokens is None else int(tokens.shape[0]), "prefix": prefix},
        "seconds": round(result.seconds, 1),
        "peak_rss_bytes": peak_rss_bytes(),
        "layers": result.layer_report,
    }
    staging = output_staging(output, force)
    try:
        write_checkpoint(staging, config, result.linears, float_tensors(model, family, result.linears), metadata,
                         model_dir, checkpoint_format)
        commit_staging(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metadata


def fake_quantize_model(model, settings: QuantizeSettings) -> None:
    """RTN in place on a float model (for `eval --method rtn`): same numbers as an RTN checkpoint."""
    settings.validate()
    with torch.no_grad():
        for layer in decoder_layers(model):
            for lin in _linear_names(layer).values():
                lin.weight.data = fake_quantize(lin.weight.data, settings.group_size).to(lin.weight.dtype)
