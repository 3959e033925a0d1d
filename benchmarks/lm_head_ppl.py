"""What the ORT graph's lm_head precision costs, measured on the exported graph itself.

    python benchmarks/lm_head_ppl.py CHECKPOINT [--windows 8] [--seqlen 512]

Exports CHECKPOINT with all logits once per lm_head variant (float / int8 / int4 at block 32, as
onnxruntime-genai's int4 model has it, or 128; MatMulNBits accuracy level 0 = fp32 compute or
4 = int8 compute), runs non-overlapping windows of the built-in Wikipedia evaluation split through
OrtBackend, and reports per variant, against the exact head (float, level 0) in the same run:
  - perplexity of the graph's own logits;
  - top-1 agreement: how often its argmax is the exact head's (near-ties count as misses);
  - the median relative logit error per position, ||logits - exact|| / ||exact||;
  - for the raw quantized heads at level 4, the recall of their top 64 (the candidates the
    default re-scores): the share of the float head's top 1 / 10 / 50 (same body, level 4)
    that is among them.
forward_all does not re-score, so those rows are the raw heads; the "+ exact re-scoring" rows
feed each window one token at a time through OrtBackend.forward, which puts the graph's exact
logits of the top 64 candidates in place. Writes
benchmarks/results/lm_head_ppl-<checkpoint>.json; docs/export.md's lm_head table is its output.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from awq_edge import data
from awq_edge.backend_ort import OrtBackend
from awq_edge.export import export_checkpoint
from awq_edge.tokenizer import Tokenizer

RESULTS = Path(__file__).resolve().parent / "results"
# name -> (lm_head_bits, lm_head block, MatMulNBits accuracy_level, stepwise with re-scoring);
# the first is the exact reference
VARIANTS = {
    "float, level 0 (exact)": (None, 32, 0, False),
    "float, level 4": (None, 32, 4, False),
    "int8 b32, level 0": (8, 32, 0, False),
    "int8 b32, level 4": (8, 32, 4, False),
    "int4 b32, level 4": (4, 32, 4, False),
    "int4 b128, level 4": (4, 128, 4, False),
    "int4 b32, level 4 + exact re-scoring": (4, 32, 4, True),
    "int4 b128, level 4 + exact re-scoring": (4, 128, 4, True),
}


def window_logits(backend: OrtBackend, window: list[int], stepwise: bool) -> np.ndarray:
    """Logits [len(window) - 1, vocab] predicting window[1:], from an empty cache."""
    backend.rewind(0)
    if stepwise:  # one token at a time through forward: what generation sees (re-scored logits)
        return np.stack([backend.forward([token]) for token in window[:-1]])
    return backend.forward_all(window)[:-1]  # one prefill with all logits (no re-scoring)


def nll_sum(logits: np.ndarray, targets: list[int]) -> float:
    logits = logits.astype(np.float64)
    top = logits.max(1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float((logz - logits[np.arange(len(targets)), targets]).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()

    ids = Tokenizer(args.checkpoint).encode(data.eval_text())
    windows = min(args.windows, len(ids) // args.seqlen)
    stats = {name: {"nll": 0.0, "agree": 0, "rel_err": [], "seconds": 0.0, "recall": {1: [], 10: [], 50: []}}
             for name in VARIANTS}
    count = 0
    with tempfile.TemporaryDirectory() as tmp:
        backends = {}
        for name, (bits, block, level, stepwise) in VARIANTS.items():
            out = export_checkpoint(args.checkpoint, Path(tmp) / str(len(backends)), "ort", accuracy_level=level,
                                    lm_head_bits=bits, lm_head_block=block, all_logits=not stepwise)
            backends[name] = (OrtBackend(out, max_context=args.seqlen), stepwise)
        for w in range(windows):
            window = ids[w * args.seqlen:(w + 1) * args.seqlen]
            targets, exact, float4_top = window[1:], None, None
            for name, (backend, stepwise) in backends.items():
                started = time.perf_counter()
                logits = window_logits(backend, window, stepwise)
                s = stats[name]
                s["seconds"] += time.perf_counter() - started
                if exact is None:
                    exact = logits
                bits, _, level, _ = VARIANTS[name]
                if bits is None and level == 4:
                    float4_top = np.argsort(-logits, axis=1)[:, :50]
                elif bits and level == 4 and not stepwise:
                    candidates = np.argpartition(logits, -64, axis=1)[:, -64:]
                    for k in s["recall"]:
                        s["recall"][k] += [len(set(float4_top[i, :k]) & set(candidates[i])) / k
                                           for i in range(len(candidates))]
                s["nll"] += nll_sum(logits, targets)
                s["agree"] += int((logits.argmax(1) == exact.argmax(1)).sum())
                s["rel_err"] += (np.linalg.norm(logits - exact, axis=1) / np.linalg.norm(exact, axis=1)).tolist()
            count += len(targets)
            print(f"window {w + 1}/{windows}", file=sys.stderr, flush=True)
    results = {name: {"perplexity": math.exp(s["nll"] / count), "nll_per_token": s["nll"] / count,
                      "top1_agreement": s["agree"] / count, "median_rel_logit_error": float(np.median(s["rel_err"])),
                      "top64_recall_of_float_top_k": {k: float(np.mean(v)) for k, v in s["recall"].items() if v},
                      "seconds": s["seconds"]} for name, s in stats.items()}
    print(f"{'lm_head':48} {'ppl':>8} {'NLL/token':>10} {'top-1 agree':>12} {'median rel err':>15}")
    for name, r in results.items():
        recall = " ".join(f"top{k} {v:.4f}" for k, v in r["top64_recall_of_float_top_k"].items())
        print(f"{name:48} {r['perplexity']:8.3f} {r['nll_per_token']:10.4f} {r['top1_agreement']:12.3f} "
              f"{r['median_rel_logit_error']:15.2e}  {recall}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"lm_head_ppl-{args.checkpoint.name}.json"
    path.write_text(json.dumps({"command": "python benchmarks/lm_head_ppl.py " + " ".join(sys.argv[1:]),
                                "checkpoint": str(args.checkpoint), "windows": windows, "seqlen": args.seqlen,
                                "scored_tokens": count, "variants": results, "date": time.strftime("%Y-%m-%d")},
                               indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
