"""Per-block sensitivity: perplexity with ONE block quantized (AWQ or RTN), the rest float.

    python benchmarks/quantizer_sensitivity.py CHECKPOINT [--model smollm2] [--windows 8] [--blocks 0,11,29]

CHECKPOINT is an AWQ checkpoint of MODEL written by `awq-edge quantize`. Its blocks are swapped
whole (norms included: AWQ folds its scales into them) into the float model one at a time, and
the same is done with RTN at the checkpoint's group size. Each row says how much that block
alone costs under each method; where AWQ's cost stays close to RTN's, AWQ did little for that
block. Prints a table and writes benchmarks/results/quantizer-sensitivity-NAME.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from awq_edge.checkpoint import load_awq_as_float
from awq_edge.data import eval_text
from awq_edge.evaluate import perplexity
from awq_edge.model import decoder_layers, load_float_model, read_config, resolve_source
from awq_edge.quantize import QuantizeSettings, fake_quantize_model

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--blocks", default=None, help="comma-separated block indices (default: all)")
    ap.add_argument("--name", default=None, help="results file suffix (default: the checkpoint's dir name)")
    args = ap.parse_args()

    group_size = read_config(args.checkpoint)["quantization_config"]["group_size"]  # config only: weights load once, below
    model, tokenizer = load_float_model(resolve_source(args.model), dtype=torch.float32)
    awq = load_awq_as_float(args.checkpoint).eval()
    rtn = copy.deepcopy(model)
    fake_quantize_model(rtn, QuantizeSettings(method="rtn", group_size=group_size))
    text = eval_text()
    layers = decoder_layers(model)
    blocks = range(len(layers)) if args.blocks is None else [int(b) for b in args.blocks.split(",")]

    def ppl(lm) -> float:
        return perplexity(lm, tokenizer, text, seqlen=1024, windows=args.windows, progress=False,
                          protocol="plain")["perplexity"]  # the committed numbers' protocol

    started = time.time()
    whole = {"float": ppl(model), "awq": ppl(awq), "rtn": ppl(rtn)}
    print(f"float {whole['float']:.3f}  all AWQ {whole['awq']:.3f}  all RTN {whole['rtn']:.3f}", flush=True)
    rows = []
    print("block  +AWQ    +RTN    AWQ/RTN", flush=True)
    for i in blocks:
        original = copy.deepcopy(layers[i].state_dict())
        row = {"block": i}
        for method, source in (("awq", awq), ("rtn", rtn)):
            layers[i].load_state_dict(decoder_layers(source)[i].state_dict())
            row[method] = ppl(model) - whole["float"]
            layers[i].load_state_dict(original)
        row["ratio"] = row["awq"] / row["rtn"] if row["rtn"] > 0 else None
        rows.append(row)
        ratio = f"{row['ratio']:.2f}" if row["ratio"] is not None else "-"
        print(f"{i:5d}  {row['awq']:+.3f}  {row['rtn']:+.3f}  {ratio}", flush=True)
    out = {"checkpoint": str(args.checkpoint), "model": args.model, "group_size": group_size,
           "windows": args.windows, "whole": whole, "blocks": rows,
           "sum_awq": sum(r["awq"] for r in rows), "sum_rtn": sum(r["rtn"] for r in rows),
           "wall_s": round(time.time() - started, 1),
           "command": "python benchmarks/quantizer_sensitivity.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    name = args.name or args.checkpoint.name
    (RESULTS / f"quantizer-sensitivity-{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"sum of single-block costs: AWQ {out['sum_awq']:.3f}, RTN {out['sum_rtn']:.3f}")


if __name__ == "__main__":
    main()
