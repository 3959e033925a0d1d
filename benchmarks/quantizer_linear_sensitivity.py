"""Per-linear-type sensitivity: perplexity with ONE kind of linear (q, k, ..., down) quantized
in every block, the others kept float.

    python benchmarks/quantizer_linear_sensitivity.py [--model smollm2] [--windows 8] [--settings '{"group_size": 128}']

Quantizes MODEL with AWQ (QuantizeSettings(**settings)) through quantizer_lab.record, which keeps
each linear's float weight as it was just before quantization (scales already folded in, so float
and quantized weights of the same checkpoint can be mixed). Then, for each linear type, three models: that type AWQ-quantized
(scales + clipping, as written to the checkpoint), AWQ scales without clipping, and RTN on the
float model. Where AWQ's cost stays near RTN's, AWQ did little for that type; "scaled, no clip"
against "awq" is what clipping adds. Writes benchmarks/results/quantizer-linear-sensitivity-NAME.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

import awq_edge.quantize as quantize
from awq_edge.data import eval_text
from awq_edge.evaluate import perplexity
from awq_edge.model import load_float_model, resolve_source
from quantizer_lab import load_base, record, settings_key  # the same recording, cached in /tmp/awq-lab

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--settings", default='{"group_size": 128}', help="JSON object of QuantizeSettings fields")
    ap.add_argument("--name", default=None, help="results file suffix (default: MODEL-gGROUP)")
    args = ap.parse_args()
    overrides = json.loads(args.settings)
    settings = quantize.QuantizeSettings(**overrides)
    started = time.time()
    # each linear's float weight as it was quantized (AWQ scales folded in) and its AWQ weight
    rec = record(args.model, settings, settings_key(overrides))
    awq = load_base(rec)
    scaled_float, quantized = rec["scaled"], rec["awq"]

    model, tokenizer = load_float_model(resolve_source(args.model), dtype=torch.float32)
    text = eval_text()

    def ppl(lm) -> float:
        return perplexity(lm, tokenizer, text, seqlen=1024, windows=args.windows, progress=False,
                          protocol="plain")["perplexity"]  # the committed numbers' protocol

    def linears(lm):
        for i, layer in enumerate(lm.model.layers):
            for n, lin in quantize._linear_names(layer).items():
                yield f"{i}.{n}", n, lin

    def put(lm, t, weight):
        """Every linear of type t (all types if None) takes weight(key, lin)."""
        for key, n, lin in linears(lm):
            if t is None or n == t:
                lin.weight.data = weight(key, lin)

    whole = {"float": ppl(model), "awq_scaled_float": ppl(awq)}  # ~float: the folded scales alone change nothing
    put(awq, None, lambda key, lin: quantized[key])
    whole["awq"] = ppl(awq)
    put(awq, None, lambda key, lin: scaled_float[key].clone())  # every linear back to its scaled float weight
    print(json.dumps(whole), flush=True)

    rows = []
    print("type       +AWQ    +scaled,no clip  +RTN    AWQ/RTN", flush=True)
    for t in TYPES:
        row = {"type": t}
        put(awq, t, lambda key, lin: quantized[key])
        row["awq"] = ppl(awq) - whole["float"]
        put(awq, t, lambda key, lin: quantize.fake_quantize(scaled_float[key], settings.group_size))
        row["scaled_no_clip"] = ppl(awq) - whole["float"]
        put(awq, t, lambda key, lin: scaled_float[key].clone())
        rtn = copy.deepcopy(model)
        put(rtn, t, lambda key, lin: quantize.fake_quantize(lin.weight.data, settings.group_size))
        row["rtn"] = ppl(rtn) - whole["float"]
        del rtn
        rows.append(row)
        print(f"{t:9s}  {row['awq']:+.3f}  {row['scaled_no_clip']:+.3f}           {row['rtn']:+.3f}  "
              f"{row['awq'] / row['rtn']:.2f}", flush=True)
    out = {"model": args.model, "settings": overrides, "windows": args.windows, "whole": whole,
           "types": rows, "wall_s": round(time.time() - started, 1),
           "command": "python benchmarks/quantizer_linear_sensitivity.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    name = args.name or f"{args.model}-g{settings.group_size}"
    (RESULTS / f"quantizer-linear-sensitivity-{name}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
