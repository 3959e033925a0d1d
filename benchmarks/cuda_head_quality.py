#!/usr/bin/env python3
"""What a cuda engine's lm_head costs in quality: fp16, int8 rows, int4 (+ re-scoring its top 64).

    python benchmarks/cuda_head_quality.py CHECKPOINT [--windows 4] [--seqlen 512]

Builds a cuda engine of CHECKPOINT with the int4 head (nvcc, no GPU), and runs it on the
reference executor (reference_backend: the numpy twins of the kernels) one token at a time over
windows of two texts, the built-in Wikipedia evaluation split and Shakespeare (text the
quantizer never calibrates on). The body is the same for every head, so each position's final
normed row x is computed once and given to each head's twin: the fp16 table (exact), int8 rows
(packing.quantize_rows_int8), the 4-bit head alone, and the 4-bit head with its top 64
re-scored from the fp16 table (what --lm-head int4 runs). Per head and text: perplexity, how
often its argmax is the exact head's, the mean total variation distance between the token
distributions the default sampler (temperature 0.7, top-k 50, top-p 0.95) draws from with its
logits and with the exact ones, and for the 4-bit head how often the exact head's top 1 and
top 10 are among its 64 candidates. Writes benchmarks/results/cuda_head_quality-<ckpt>.json.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

HEADS = ("fp16 (exact)", "int8 rows", "int4", "int4 + re-scoring top 64")


def final_rows(backend, window: list[int]) -> np.ndarray:
    """x [len(window), hidden] fp16: the normed last row before the head, fed one token at a time."""
    from awq_edge.decoder import buffer_shapes, step_ids

    backend.rewind(0)
    rows = []
    for token in window:
        ids = step_ids([token], backend.position, backend.max_context, backend.vocab_size)
        buf = {name: np.zeros(shape, np.float32 if name == "logits" else np.float16)
               for name, shape in buffer_shapes(backend.spec, 1).items()}
        for op in backend.ops[:-1]:  # all but the lm_head
            backend.run(op, buf, ids)
        backend.position += 1
        rows.append(buf["x"][0].copy())
    return np.stack(rows)


def nll(logits: np.ndarray, target: int) -> float:
    logits = logits.astype(np.float64)
    top = logits.max()
    return float(np.log(np.exp(logits - top).sum()) + top - logits[target])


def sampled_distance(logits: np.ndarray, exact: np.ndarray, settings) -> float:
    """Total variation distance between the default sampler's distributions over two logits."""
    from awq_edge.sampling import candidates

    p, q = (dict(zip(*(a.tolist() for a in candidates(values, settings)))) for values in (logits, exact))
    return 0.5 * sum(abs(p.get(i, 0.0) - q.get(i, 0.0)) for i in set(p) | set(q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    from awq_edge import data
    from awq_edge.build import build_engine
    from awq_edge.packing import dequantize_rows_int8, quantize_rows_int8
    from awq_edge.reference_backend import ReferenceBackend, twin_head_top_k, twin_lm_head
    from awq_edge.sampling import SamplingSettings
    from awq_edge.tokenizer import Tokenizer

    tokenizer = Tokenizer(args.checkpoint)
    texts = {"wikipedia": data.eval_text(), "shakespeare": data.shakespeare_path().read_text()}
    results = {}
    with tempfile.TemporaryDirectory(prefix="awq-edge-head-quality-") as tmp:
        engine = Path(tmp) / "engine"
        build_engine(str(args.checkpoint), "orin", engine, backend="cuda", progress=False, lm_head_bits=4)
        backend = ReferenceBackend(engine, max_context=args.seqlen)
        head = backend.ops[-1].args
        exact_table = backend.tensors[head["exact"]]
        int8_table = dequantize_rows_int8(*quantize_rows_int8(exact_table))
        int4_table = backend.weight(head["weight"], head["group_size"])[:backend.spec.vocab]
        softcap, top_k = head["softcap"], head["top_k"]
        for text_name, text in texts.items():
            ids = tokenizer.encode(text)
            windows = min(args.windows, len(ids) // args.seqlen)
            s = {name: {"nll": 0.0, "agree": 0, "tv": 0.0} for name in HEADS}
            recall, count = {1: 0, 10: 0}, 0
            for w in range(windows):
                window = ids[w * args.seqlen:(w + 1) * args.seqlen]
                xs = final_rows(backend, window[:-1])
                for x, target in zip(xs, window[1:]):
                    exact = twin_lm_head(x, exact_table, softcap)
                    raw4 = twin_lm_head(x, int4_table, softcap)
                    candidates = twin_head_top_k(raw4, top_k)
                    rescored = raw4.copy()
                    rescored[candidates] = exact[candidates]  # (twin_rescored_head, without recomputing exact)
                    logits = {HEADS[0]: exact, HEADS[1]: twin_lm_head(x, int8_table, softcap), HEADS[2]: raw4,
                              HEADS[3]: rescored}
                    for name, values in logits.items():
                        s[name]["nll"] += nll(values, target)
                        s[name]["agree"] += int(values.argmax() == exact.argmax())
                        s[name]["tv"] += sampled_distance(values, exact, SamplingSettings())
                    best = np.argsort(-exact)[:10]
                    recall[1] += int(best[0] in candidates)
                    recall[10] += len(set(best.tolist()) & set(candidates.tolist())) / 10
                    count += 1
                print(f"{text_name}: window {w + 1}/{windows}", file=sys.stderr, flush=True)
            results[text_name] = {
                "tokens": count,
                "heads": {name: {"perplexity": math.exp(v["nll"] / count), "nll_per_token": v["nll"] / count,
                                 "top1_agreement": v["agree"] / count,
                                 "default_sampler_tv_distance": v["tv"] / count} for name, v in s.items()},
                "int4_top64_recall_of_exact_top1": recall[1] / count,
                "int4_top64_recall_of_exact_top10": recall[10] / count}
    for text_name, r in results.items():
        print(f"{text_name} ({r['tokens']} tokens): int4's 64 candidates hold the exact top 1 "
              f"{100 * r['int4_top64_recall_of_exact_top1']:.2f}% / top 10 {100 * r['int4_top64_recall_of_exact_top10']:.2f}%")
        for name, h in r["heads"].items():
            print(f"  {name:28} ppl {h['perplexity']:8.3f}  NLL {h['nll_per_token']:.4f}  "
                  f"argmax = exact's {100 * h['top1_agreement']:.2f}%  "
                  f"sampler TV distance {h['default_sampler_tv_distance']:.4f}")
    out = ROOT / "benchmarks" / "results" / f"cuda_head_quality-{args.checkpoint.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/cuda_head_quality.py " + " ".join(sys.argv[1:]),
                               "checkpoint": str(args.checkpoint), "seqlen": args.seqlen, "texts": results},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
