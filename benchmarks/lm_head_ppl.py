"""What the ORT graph's lm_head precision costs: perplexity of the exported graph itself.

    python benchmarks/lm_head_ppl.py CHECKPOINT [--windows 8] [--seqlen 512]

Exports CHECKPOINT with all logits and the lm_head as float / int8 / int4 (block 32, as
onnxruntime-genai's int4 model has it), each at the default MatMulNBits accuracy level, runs
non-overlapping windows of the built-in Wikipedia evaluation split through OrtBackend, and
prints perplexity per variant. forward_all does not re-score, so those rows are the raw
heads; the row "int4+rescore" (the default export) feeds each window one token at a time
through OrtBackend.forward, which re-scores the top 64 candidates of every step exactly. Writes benchmarks/results/lm_head_ppl-<checkpoint>.json.
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


def window_logits(backend: OrtBackend, window: list[int], stepwise: bool) -> np.ndarray:
    """Logits [len(window) - 1, vocab] predicting window[1:], from an empty cache."""
    backend.rewind(0)
    if stepwise:  # one token at a time through forward: what generation sees (re-scored logits)
        return np.stack([backend.forward([token]) for token in window[:-1]])
    return backend.forward_all(window)[:-1]  # one prefill with all logits (no re-scoring)


def graph_perplexity(export_dir: Path, ids: list[int], seqlen: int, windows: int, stepwise: bool = False) -> float:
    backend = OrtBackend(export_dir, max_context=seqlen)
    nll, count = 0.0, 0
    for w in range(windows):
        window = ids[w * seqlen:(w + 1) * seqlen]
        logits = window_logits(backend, window, stepwise).astype(np.float64)
        logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
        nll += float((logz - logits[np.arange(len(window) - 1), window[1:]]).sum())
        count += len(window) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()

    tokenizer = Tokenizer(args.checkpoint)
    text = data.eval_text()
    ids = tokenizer.encode(text)
    windows = min(args.windows, len(ids) // args.seqlen)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bits in (("float", None), ("int8", 8), ("int4-b32", 4)):
            out = Path(tmp) / name
            export_checkpoint(args.checkpoint, out, "ort", all_logits=True, lm_head_bits=bits)
            started = time.time()
            results[name] = graph_perplexity(out, ids, args.seqlen, windows)
            print(f"lm_head {name:9} ppl {results[name]:.3f}  ({time.time() - started:.0f} s)", flush=True)
        name = "int4+rescore"
        out = export_checkpoint(args.checkpoint, Path(tmp) / "default", "ort")  # the default: int4 + re-scoring
        started = time.time()
        results[name] = graph_perplexity(out, ids, args.seqlen, windows, stepwise=True)
        print(f"lm_head {name:9} ppl {results[name]:.3f}  ({time.time() - started:.0f} s)", flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"lm_head_ppl-{args.checkpoint.name}.json"
    out.write_text(json.dumps({"command": "python benchmarks/lm_head_ppl.py " + " ".join(sys.argv[1:]),
                               "checkpoint": str(args.checkpoint), "windows": windows, "seqlen": args.seqlen,
                               "perplexity": results, "date": time.strftime("%Y-%m-%d")}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
