"""What-ifs for one linear type at a time, without re-running the quantizer (~15 s each).

    python benchmarks/quantizer_lab.py [--settings '{"group_size": 128}'] [--windows 8] [--text wiki|shakespeare] EXPERIMENT...

A full variant run (benchmarks/quantizer_variant.py) takes ~5.5 min and its result moves by up
to 0.34 perplexity with the calibration sample alone, so effects of ~0.1 cannot be seen that way.
Here the quantizer runs ONCE (cached under /tmp/awq-lab), recording every group's scales and every
linear's float weight as it was quantized (scales folded in). With the scales folded, the float
weights give the float model back, and one linear type (say gate_proj, in all 30 blocks) can be
re-quantized another way and measured alone: perplexity minus float, on the same windows, so
differences between experiments are paired and deterministic.

Scale changes stay inside one type: a scale folded into a norm (qkv, gate_up) costs nothing to
the norm, and v's and up's rows, which take o's and down's scales, quantize the same scaled or not
(row scaling commutes with per-row group quantization), so W -> Q(W r) / r with r = s_new / s_awq
is exactly what the quantizer would produce for that type with scales s_new.

EXPERIMENTs: see EXPERIMENTS below (TYPE:WHAT, e.g. gate_proj:awq gate_proj:noclip down_proj:alpha0).
Writes benchmarks/results/quantizer-lab-NAME.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

import awq_edge.quantize as Q
from awq_edge import data, packing
from awq_edge.checkpoint import load_awq_as_float
from awq_edge.evaluate import perplexity

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path("/tmp/awq-lab")
GROUP_OF = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o",
            "gate_proj": "gate_up", "up_proj": "gate_up", "down_proj": "down"}
INPUT_OF = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
            "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}


def record(model: str, settings: Q.QuantizeSettings, key: str) -> dict:
    """Quantize once; return {scaled float weights, AWQ dequantized weights, scales, base state}."""
    path = CACHE / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    scaled, scales = [], []
    to_quantized, apply_group = Q._to_quantized, Q._apply_group

    def rec_quantized(lin, *args):
        scaled.append(lin.weight.data.detach().float().cpu().clone())
        return to_quantized(lin, *args)

    def rec_group(g, s, *args):
        scales.append((g.name, s.detach().cpu().clone()))
        return apply_group(g, s, *args)

    Q._to_quantized, Q._apply_group = rec_quantized, rec_group
    try:
        with tempfile.TemporaryDirectory() as tmp:
            Q.quantize_checkpoint(model, Path(tmp) / "ck", settings, progress=True)
            awq = load_awq_as_float(Path(tmp) / "ck")
    finally:
        Q._to_quantized, Q._apply_group = to_quantized, apply_group
    names = list(Q._linear_names(awq.model.layers[0]))
    n_groups = len(scales) // len(awq.model.layers)
    out = {"scaled": {}, "awq": {}, "s": {}}
    for k, w in enumerate(scaled):
        i, n = divmod(k, len(names))
        out["scaled"][f"{i}.{names[n]}"] = w
        out["awq"][f"{i}.{names[n]}"] = Q._linear_names(awq.model.layers[i])[names[n]].weight.data.clone()
    for k, (g, s) in enumerate(scales):
        out["s"][f"{k // n_groups}.{g}"] = s
    for i, layer in enumerate(awq.model.layers):  # the base model: AWQ's folded norms + scaled float linears
        for n, lin in Q._linear_names(layer).items():
            lin.weight.data = out["scaled"][f"{i}.{n}"].clone()
    out["state"] = awq.state_dict()
    out["config"] = awq.config.to_dict()
    CACHE.mkdir(exist_ok=True)
    torch.save(out, path)
    return out


def load_base(rec: dict):
    """The model `record` left: AWQ's folded norms with the scaled float linears (= the float model)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**{k: v for k, v in rec["config"].items() if k != "quantization_config"})
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base.load_state_dict(rec["state"])
    return base


def settings_key(overrides: dict) -> str:
    """The cache key of a settings override (also the default results name)."""
    return "-".join(f"{k}{v}" for k, v in sorted(overrides.items())) or "default"


def capture(base, tokens: torch.Tensor, stride: int, gram_group: int = 0, gram_full: bool = False) -> dict:
    """Per block and linear input: mean |x| over all tokens, every `stride`-th token, and, if
    gram_group, the per-group Gram matrix E[x_g x_g^T] over all tokens (for cliphess_all); if
    gram_full, the whole E[x x^T] over all tokens (for gptq_all*)."""
    acts: dict = {}
    hooks = []
    for i, layer in enumerate(base.model.layers):
        lins = Q._linear_names(layer)
        mods = dict(lins, res=layer.input_layernorm, res_mid=layer.post_attention_layernorm)
        for where, name in (("attn", "q_proj"), ("o", "o_proj"), ("mlp", "gate_proj"), ("down", "down_proj"),
                            ("res", "res"), ("res_mid", "res_mid")):
            def fn(_m, args, _o, key=(i, where)):
                x = args[0].detach().float().reshape(-1, args[0].shape[-1])
                entry = acts.setdefault(key, {"abs": 0, "n": 0, "x": [], "h": 0, "H": 0})
                start = (-entry["n"]) % stride
                entry["abs"] = entry["abs"] + x.abs().sum(0)
                if gram_group:
                    entry["h"] = entry["h"] + group_gram(x, gram_group)
                if gram_full:
                    entry["H"] = entry["H"] + x.T @ x
                entry["x"].append(x[start::stride].clone())
                entry["n"] += len(x)
            hooks.append(mods[name].register_forward_hook(fn))
    with torch.no_grad():
        for start in range(0, len(tokens), 8):
            base(input_ids=tokens[start:start + 8], use_cache=False)
    for h in hooks:
        h.remove()
    return {k: {"x_mean": v["abs"] / v["n"], "x": torch.cat(v["x"]), "h": v["h"] / v["n"], "H": v["H"] / v["n"]}
            for k, v in acts.items()}


def group_gram(x, g):
    """Per input group: x_g^T x_g summed over tokens, [groups, g, g] (last group zero-padded)."""
    k = x.shape[1]
    n_g = -(-k // g)
    xp = torch.nn.functional.pad(x, (0, n_g * g - k)).reshape(len(x), n_g, g).permute(1, 0, 2)
    return torch.bmm(xp.transpose(1, 2), xp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiments", nargs="+")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--settings", default='{"group_size": 128}')
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--text", default="wiki", choices=["wiki", "shakespeare"])
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    overrides = json.loads(args.settings)
    settings = Q.QuantizeSettings(**overrides)
    key = settings_key(overrides)
    started = time.time()
    rec = record(args.model, settings, key)

    from transformers import AutoTokenizer

    from awq_edge.model import resolve_source
    base = load_base(rec)
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_source(args.model)))
    texts = data.read_texts(data.fetch_wikipedia()[0])
    tokens = Q.calibration_tokens(tokenizer, texts, settings.calib_samples, settings.calib_seqlen, settings.calib_seed)
    stride = max(1, settings.calib_samples // settings.loss_samples)
    needs_gram = any(e.endswith(":cliphess_all") for e in args.experiments)
    acts = capture(base, tokens, stride, settings.group_size if needs_gram else 0,
                   any(":gptq_all" in e for e in args.experiments))
    text = data.eval_text() if args.text == "wiki" else data.eval_text(data.fetch_shakespeare())
    layers = base.model.layers

    def ppl() -> float:
        return perplexity(base, tokenizer, text, seqlen=1024, windows=args.windows, progress=False,
                          protocol="plain")["perplexity"]  # the committed numbers' protocol

    float_ppl = ppl()
    rows = []
    for exp in args.experiments:
        t, what = exp.split(":", 1)
        for i, layer in enumerate(layers):
            Q._linear_names(layer)[t].weight.data = EXPERIMENTS[what](rec, acts, layer, i, t, settings)
        row = {"experiment": exp, "cost": ppl() - float_ppl}
        for i, layer in enumerate(layers):
            Q._linear_names(layer)[t].weight.data = rec["scaled"][f"{i}.{t}"].clone()
        rows.append(row)
        print(f"{exp:32s} {row['cost']:+.3f}", flush=True)
    out = {"settings": overrides, "windows": args.windows, "text": args.text, "float": float_ppl, "rows": rows,
           "wall_s": round(time.time() - started, 1),
           "command": "python benchmarks/quantizer_lab.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantizer-lab-{args.name or key}.json").write_text(json.dumps(out, indent=2) + "\n")


# ---------------------------------------------------------------- experiments

def _x(acts, i, t):
    return acts[(i, INPUT_OF[t])]


def _requantize(w, x, r, settings, clip=True, errors=None):
    """Q(w r) / r with the clip searched on x / r (r: per input channel, relative to AWQ's scales).

    errors, if given, replaces the clip search's squared partial-output error (see clip_search)."""
    ws = w * r
    c = clip_search(ws, x / r, settings, errors) if clip else None
    return Q.fake_quantize(ws, settings.group_size, c) / r


def clip_search(w, x, settings, errors=None):
    """awq_edge's search_clip, or the same search scored by errors(xs) -> fn(d, o0): the error of
    each (group, clip token, output channel) from the partial-output change d [groups, tokens, oc]
    of output channels o0.. (xs: the clip tokens, subsampled as search_clip does)."""
    xs = Q.subsample_tokens(x, settings.clip_tokens)
    return Q.search_clip(w, xs, settings, error=None if errors is None else errors(xs))


def joint_clip_search(w, x, settings, sweeps=2):
    """Clip ratios chosen for the whole linear's output MSE instead of each group's partial
    output: start from search_clip's per-group choice, then sweep the groups, each re-chosen with
    the other groups' errors held (coordinate descent; the cross terms between groups count)."""
    xs = Q.subsample_tokens(x, settings.clip_tokens)
    out_f, k = w.shape
    best_clip = Q.search_clip(w, x, settings)
    ratios = Q.clip_ratios(settings)
    gsz = settings.group_size
    n_g = -(-k // gsz)
    cols = [slice(j * gsz, min(k, (j + 1) * gsz)) for j in range(n_g)]
    for o0 in range(0, out_f, 256):
        wb = w[o0:o0 + 256]
        max_abs = torch.stack([wb[:, c].abs().amax(1) for c in cols], 1)  # [oc, groups]

        def partial_err(j, clip):
            wq = Q.fake_quantize_groups(wb[:, cols[j]][:, None], clip[:, None])[:, 0]
            return xs[:, cols[j]] @ (wq - wb[:, cols[j]]).T  # [tokens, oc]
        d = [partial_err(j, best_clip[o0:o0 + 256, j]) for j in range(n_g)]
        total = sum(d)
        for _ in range(sweeps):
            for j in range(n_g):
                rest = total - d[j]
                best_err = (total.pow(2)).mean(0)
                best_c, best_d = best_clip[o0:o0 + 256, j].clone(), d[j]
                for r in ratios:
                    c = max_abs[:, j] * r
                    dn = partial_err(j, c)
                    err = (rest + dn).pow(2).mean(0)
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_c = torch.where(better, c, best_c)
                    best_d = torch.where(better[None], dn, best_d)
                best_clip[o0:o0 + 256, j] = best_c
                d[j] = best_d
                total = rest + best_d
    return best_clip


def exp_jointclip(tokens=None):
    """joint_clip_search on settings.clip_tokens tokens, or on `tokens`."""
    def run(rec, acts, layer, i, t, settings):
        more = replace(settings, clip_tokens=tokens or settings.clip_tokens)
        w = rec["scaled"][f"{i}.{t}"]
        return Q.fake_quantize(w, settings.group_size, joint_clip_search(w, _x(acts, i, t)["x"], more))
    return run


def gram_clip_search(w, h, settings):
    """search_clip scored by the exact mean squared partial output dw^T H dw, H = E[x_g x_g^T]
    ([groups, G, G], the short last group zero-padded)."""
    out_f, k = w.shape
    best_clip = torch.empty(out_f, h.shape[0])
    ratios = Q.clip_ratios(settings)
    for cols, gsl, g in Q._group_chunks(k, settings.group_size):
        wg, hg = w[:, cols].reshape(out_f, -1, g), h[gsl, :g, :g]
        max_abs = wg.abs().amax(-1)
        best_err, best = torch.full_like(max_abs, math.inf), max_abs.clone()
        for r in ratios:
            c = max_abs * r
            dw = (Q.fake_quantize_groups(wg, c) - wg).permute(1, 0, 2)  # [groups, oc, g]
            err = (torch.bmm(dw, hg) * dw).sum(-1).T
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, c, best)
        best_clip[:, gsl] = best
    return best_clip


def exp_cliphess(all_tokens):
    """Clip scored through the Gram matrix of ALL calibration tokens, or of the strided loss
    tokens (the same choices as clip8192: a check of gram_clip_search)."""
    def run(rec, acts, layer, i, t, settings):
        a = _x(acts, i, t)
        h = a["h"] if all_tokens else group_gram(a["x"], settings.group_size) / len(a["x"])
        w = rec["scaled"][f"{i}.{t}"]
        return Q.fake_quantize(w, settings.group_size, gram_clip_search(w, h, settings))
    return run


def _not_first_tokens(n, settings):
    """Mask over the captured (strided) tokens: False at every calibration sequence's first token."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[::settings.calib_seqlen // max(1, settings.calib_samples // settings.loss_samples)] = False
    return keep


def ones(rec, i, t):
    return torch.ones(rec["scaled"][f"{i}.{t}"].shape[1])


def exp_awq(rec, acts, layer, i, t, settings):  # the checkpoint's weights
    return rec["awq"][f"{i}.{t}"].clone()


def exp_redo(rec, acts, layer, i, t, settings):  # recomputed here: must match exp_awq
    return _requantize(rec["scaled"][f"{i}.{t}"], _x(acts, i, t)["x"], ones(rec, i, t), settings,
                       clip=t not in ("q_proj", "k_proj"))


def exp_noclip(rec, acts, layer, i, t, settings):
    return _requantize(rec["scaled"][f"{i}.{t}"], _x(acts, i, t)["x"], ones(rec, i, t), settings, clip=False)


def exp_clip_on(tokens):
    """The clip search on `tokens` tokens instead of settings.clip_tokens."""
    def run(rec, acts, layer, i, t, settings):
        more = replace(settings, clip_tokens=tokens)
        return _requantize(rec["scaled"][f"{i}.{t}"], _x(acts, i, t)["x"], ones(rec, i, t), more)
    return run


def exp_clip_mlp(exact):
    """gate/up: clip errors measured on h = act(gate) * up (other groups unquantized), to first
    order (gate: (act'(g) u dg)^2, up: (act(g) du)^2) or, for gate, exactly."""
    def run(rec, acts, layer, i, t, settings):
        act = layer.mlp.act_fn

        def errors(xs):
            with torch.no_grad():
                g, u = layer.mlp.gate_proj(xs)[None], layer.mlp.up_proj(xs)[None]
            if t == "up_proj":
                return lambda d, o0: (act(g[..., o0:o0 + 256]) * d).pow(2)
            if exact:
                return lambda d, o0: ((act(g[..., o0:o0 + 256] + d) - act(g[..., o0:o0 + 256])) * u[..., o0:o0 + 256]).pow(2)
            slope = (act(g + 1e-3) - act(g - 1e-3)) / 2e-3
            return lambda d, o0: (slope[..., o0:o0 + 256] * u[..., o0:o0 + 256] * d).pow(2)
        return _requantize(rec["scaled"][f"{i}.{t}"], _x(acts, i, t)["x"], ones(rec, i, t), settings, errors=errors)
    return run


def exp_alpha0(rec, acts, layer, i, t, settings):
    """The group's scales undone (alpha = 0: RTN + clip), for o and down (their scales touch only them)."""
    return _requantize(rec["scaled"][f"{i}.{t}"], _x(acts, i, t)["x"], 1 / awq_scale(rec, layer, i, t), settings,
                       clip=t not in ("q_proj", "k_proj"))


def awq_scale(rec, layer, i, t):
    """The scale AWQ folded into t's input channels (ones where its group was not searched, e.g.
    o under GQA since 4578bee; before that, one scale per v channel, repeated over query heads)."""
    n_in = rec["scaled"][f"{i}.{t}"].shape[1]
    s = rec["s"].get(f"{i}.{GROUP_OF[t]}", torch.ones(n_in))
    return _expanded(s, layer, n_in)


def _expanded(s, layer, n_in):
    """Per v channel -> per o-input channel (the same value for every query head of a KV head)."""
    if len(s) == n_in:
        return s
    head_dim = layer.self_attn.head_dim
    return s.view(-1, 1, head_dim).expand(-1, n_in // len(s), head_dim).reshape(-1)


def search_alpha(rec, acts, layer, i, t, settings, collapse="mean", drop_first=False, weighting=None):
    """AWQ's alpha grid for a group of one linear (o or down), loss on its output; returns W_eff."""
    w = rec["scaled"][f"{i}.{t}"]
    a = _x(acts, i, t)
    s_awq = awq_scale(rec, layer, i, t)
    x_mean = a["x_mean"] * s_awq  # original basis
    x = a["x"][_not_first_tokens(len(a["x"]), settings)] if drop_first else a["x"]
    n_in = w.shape[1]
    kv_ch = layer.self_attn.v_proj.out_features if t == "o_proj" else n_in
    if kv_ch != n_in:
        v = x_mean.view(kv_ch // layer.self_attn.head_dim, -1, layer.self_attn.head_dim)
        x_mean = {"mean": v.mean(1), "max": v.amax(1), "rms": v.pow(2).mean(1).sqrt()}[collapse].reshape(-1)
    ref = x @ w.T
    tw = torch.ones(len(x), 1)
    if weighting is not None:  # per-token weights from the residual the output is added into
        ms = acts[(i, "res" if t == "o_proj" else "res_mid")]["x"].pow(2).mean(1, keepdim=True)
        tw = 1 / ms if weighting == "relative" else (ms.median() / ms).clamp(max=1)
    best = (math.inf, None)
    for k in range(settings.scale_grid):
        s = x_mean.pow(k / settings.scale_grid).clamp(min=1e-4)
        s = _expanded(s / (s.max() * s.min()).sqrt(), layer, n_in)
        r = s / s_awq
        weff = Q.fake_quantize(w * r, settings.group_size) / r
        loss = float(((x @ weff.T - ref).pow(2) * tw).mean())
        if loss < best[0]:
            best = (loss, r)
    return _requantize(w, a["x"], best[1], settings)


def exp_clip_nosink(rec, acts, layer, i, t, settings):
    """Clip searched without each sequence's first token (the attention sink) among the tokens."""
    x = _x(acts, i, t)["x"]
    return _requantize(rec["scaled"][f"{i}.{t}"], x[_not_first_tokens(len(x), settings)], ones(rec, i, t), settings)


def exp_redo_with(name, replacement):
    """The default recomputed with awq_edge.quantize's function `name` replaced."""
    def run(*args):
        original = getattr(Q, name)
        setattr(Q, name, replacement)
        try:
            return exp_redo(*args)
        finally:
            setattr(Q, name, original)
    return run


# The reference code's clip grid: 1 - k/20 for k < 0.5 * 20 (10 ratios, 1.00 .. 0.55).
exp_refgrid = exp_redo_with(
    "clip_ratios", lambda st: [1 - k / st.clip_grid for k in range(int(st.clip_max_shrink * st.clip_grid))])
# The reference's clip tokens, x[::len(x) // 512]: that stride divides the sequence length, so
# every sequence's first token (the attention sink) is among them.
exp_refstride = exp_redo_with("subsample_tokens", lambda x, n: x[::max(1, len(x) // n)])


def exp_gptq(damp, all_tokens=False, refit_damp=None, diagonal=False):
    """awq_edge's --rounding gptq with this damping, H from the strided tokens or from all tokens
    (session 11 also tried act order and leaving the sink token out of H, in commit f03deb1: both
    worse); with refit_damp, the scales then refit to the levels by least squares under H
    (awq_edge.quantize.refit_scales, session 15; diagonal: H's diagonal only)."""
    def run(rec, acts, layer, i, t, settings):
        w = rec["scaled"][f"{i}.{t}"]
        x = _x(acts, i, t)["x"]
        clip = None if t in ("q_proj", "k_proj") else clip_search(w, x, settings)
        _, scales, zeros = Q.quantize_tensor(w, settings.group_size, clip)
        h = _x(acts, i, t)["H"] if all_tokens else Q.gram(x)
        q = Q.gptq_round(w, h, scales, zeros, settings.group_size, damp, clip)
        if refit_damp is not None:
            scales = Q.refit_scales(w, q, scales, zeros, h, settings.group_size, refit_damp, diagonal)
        return torch.from_numpy(packing.dequantize(q.numpy(), scales.numpy(), zeros.numpy(), settings.group_size))
    return run


def exp_refit(refit_damp, diagonal=False, all_tokens=False):
    """exp_gptq(1.0) (the default rounding), then the scales refit."""
    return exp_gptq(1.0, all_tokens, refit_damp, diagonal)


EXPERIMENTS = {"awq": exp_awq, "redo": exp_redo, "noclip": exp_noclip, "clip8192": exp_clip_on(8192),
               "clip2048": exp_clip_on(2048), "clip4096": exp_clip_on(4096),
               "refgrid": exp_refgrid, "refstride": exp_refstride,
               "cliphess_strided": exp_cliphess(False), "cliphess_all": exp_cliphess(True),
               "jointclip": exp_jointclip(), "jointclip4096": exp_jointclip(4096),
               "firstorder": exp_clip_mlp(exact=False), "exactmlp": exp_clip_mlp(exact=True),
               "alpha0": exp_alpha0, "clip_nosink": exp_clip_nosink,
               "gptq": exp_gptq(0.01), "gptq_d1": exp_gptq(0.1), "gptq_d03": exp_gptq(0.3), "gptq_d10": exp_gptq(1.0),
               "gptq_all_d03": exp_gptq(0.3, True), "gptq_all_d10": exp_gptq(1.0, True), "gptq_all_d01": exp_gptq(0.1, True),
               "refit_d10": exp_refit(1.0), "refit_d01": exp_refit(0.1), "refit_d0": exp_refit(0.0),
               "refit_diag": exp_refit(1.0, True), "refit_diag0": exp_refit(0.0, True),
               "gptq_all_refit_d10": exp_refit(1.0, all_tokens=True), "gptq_all_refit_d01": exp_refit(0.1, all_tokens=True),
               "gptq_all_refit_diag": exp_refit(1.0, True, all_tokens=True),
               "alpha": lambda *a: search_alpha(*a),
               "alpha_max": lambda *a: search_alpha(*a, collapse="max"),
               "alpha_rms": lambda *a: search_alpha(*a, collapse="rms"),
               "alpha_nofirst": lambda *a: search_alpha(*a, drop_first=True),
               "alpha_relative": lambda *a: search_alpha(*a, weighting="relative"),
               "alpha_outliers": lambda *a: search_alpha(*a, weighting="outliers"),
               "alpha_rms_relative": lambda *a: search_alpha(*a, collapse="rms", weighting="relative")}


if __name__ == "__main__":
    main()
