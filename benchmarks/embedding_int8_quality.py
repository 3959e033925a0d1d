#!/usr/bin/env python3
"""What int8 token embeddings cost in quality: the embedding table as the cuda engine's int8 rows
(packing.quantize_rows_int8: blocks of 32, fp16 scales) against the same table in fp16.

    python benchmarks/embedding_int8_quality.py [MODEL] [--windows 24] [--seqlen 1024]

MODEL (default smollm2): a float model or a checkpoint, in float32. Only the embedding changes:
the lm_head keeps the original table (untied first where it was tied), so the numbers are the
embedding's own. Perplexity over windows of the built-in Wikipedia evaluation split and of
Shakespeare (text the quantizer never calibrates on), the plain protocol (windows from
mid-text). Writes benchmarks/results/embedding_int8_quality-<model>-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))


def main() -> None:
    import numpy as np
    import torch

    from awq_edge import data
    from awq_edge.evaluate import perplexity
    from awq_edge.model import load_float_model, resolve_source
    from awq_edge.packing import dequantize_rows_int8, quantize_rows_int8

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="smollm2")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--seqlen", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, tokenizer = load_float_model(resolve_source(args.model), dtype=torch.float32)
    embed = model.get_input_embeddings()
    exact = embed.weight.detach().clone()
    if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed.weight:
        model.get_output_embeddings().weight = torch.nn.Parameter(exact.clone())  # the head stays exact
    table16 = exact.numpy().astype(np.float16)
    rows = {"fp16": torch.from_numpy(table16.astype(np.float32)),
            "int8 rows": torch.from_numpy(dequantize_rows_int8(*quantize_rows_int8(table16)))}
    texts = {"wikipedia": data.eval_text(), "shakespeare": data.fetch_shakespeare().read_text(encoding="utf-8")}
    results = {}
    for kind, table in rows.items():
        embed.weight = torch.nn.Parameter(table)
        for name, text in texts.items():
            r = perplexity(model, tokenizer, text, args.seqlen, args.windows, progress=False, protocol="plain")
            results[f"{kind} / {name}"] = r["perplexity"]
            print(f"{kind:10s} {name:12s} perplexity {r['perplexity']:.4f} ({r['windows']} windows)", flush=True)
    for name in texts:
        a, b = results[f"fp16 / {name}"], results[f"int8 rows / {name}"]
        print(f"{name}: int8 rows change perplexity by {100 * (b - a) / a:+.3f}%")
    out = ROOT / "benchmarks" / "results" / (f"embedding_int8_quality-{Path(args.model).name}-"
                                            f"{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "model": args.model, "windows": args.windows,
                               "seqlen": args.seqlen, "protocol": "plain", "perplexity": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
