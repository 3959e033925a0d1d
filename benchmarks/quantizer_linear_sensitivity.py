"""Per-linear-type sensitivity: perplexity with ONE kind of linear (q, k, ..., down) quantized
in every block, the others kept float.

    python benchmarks/quantizer_linear_sensitivity.py [--model smollm2] [--windows 8] [--settings '{"group_size": 128}']

Quantizes MODEL with AWQ (QuantizeSettings(**settings)), keeping each linear's float weight as
it was just before quantization (scales already folded in, so float and quantized weights of the
same checkpoint can be mixed). Then, for each linear type, three models: that type AWQ-quantized
(scales + clipping, as written to the checkpoint), AWQ scales without clipping, and RTN on the
float model. Where AWQ's cost stays near RTN's, AWQ did little for that type; "scaled, no clip"
against "awq" is what clipping adds. Writes benchmarks/results/quantizer-linear-sensitivity-NAME.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import awq_edge.quantize as quantize
from awq_edge.checkpoint import load_awq_as_float
from awq_edge.data import eval_text
from awq_edge.evaluate import perplexity
from awq_edge.model import load_float_model, resolve_source

RESULTS = Path(__file__).resolve().parent / "results"
TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--settings", default='{"group_size": 128}', help="JSON object of QuantizeSettings fields")
    ap.add_argument("--name", default=None, help="results file suffix (default: MODEL-gGROUP)")
    args = ap.parse_args()
    settings = quantize.QuantizeSettings(**json.loads(args.settings))
    started = time.time()

    # the float weight each linear had when it was quantized (AWQ scales folded in)
    scaled_float: dict[str, torch.Tensor] = {}
    to_quantized = quantize._to_quantized

    def recording(lin, group_size, clip=None):
        scaled_float[len(scaled_float)] = lin.weight.data.detach().float().cpu().clone()
        return to_quantized(lin, group_size, clip)

    quantize._to_quantized = recording
    with tempfile.TemporaryDirectory() as tmp:
        meta = quantize.quantize_checkpoint(args.model, Path(tmp) / "ck", settings, progress=True)
        awq = load_awq_as_float(Path(tmp) / "ck").eval()
    quantize._to_quantized = to_quantized
    # recording order is quantize_model's: block by block, _linear_names order within a block
    names = [f"{i}.{n}" for i in range(len(awq.model.layers)) for n in quantize._linear_names(awq.model.layers[0])]
    scaled_float = {names[k]: w for k, w in scaled_float.items()}

    model, tokenizer = load_float_model(resolve_source(args.model), dtype=torch.float32)
    text = eval_text()

    def ppl(lm) -> float:
        return perplexity(lm, tokenizer, text, seqlen=1024, windows=args.windows, progress=False)["perplexity"]

    def linears(lm):
        for i, layer in enumerate(lm.model.layers):
            for n, lin in quantize._linear_names(layer).items():
                yield f"{i}.{n}", n, lin

    quantized = {key: lin.weight.data.clone() for key, _, lin in linears(awq)}
    whole = {"float": ppl(model), "awq": ppl(awq)}
    for key, _, lin in linears(awq):  # every linear back to its scaled float weight
        lin.weight.data = scaled_float[key].clone()
    whole["awq_scaled_float"] = ppl(awq)  # ~float: the folded scales alone change nothing
    print(json.dumps(whole), flush=True)

    rows = []
    print("type       +AWQ    +scaled,no clip  +RTN    AWQ/RTN", flush=True)
    for t in TYPES:
        row = {"type": t}
        for key, n, lin in linears(awq):
            if n == t:
                lin.weight.data = quantized[key]
        row["awq"] = ppl(awq) - whole["float"]
        for key, n, lin in linears(awq):
            if n == t:
                lin.weight.data = quantize.fake_quantize(scaled_float[key], settings.group_size)
        row["scaled_no_clip"] = ppl(awq) - whole["float"]
        for key, n, lin in linears(awq):
            if n == t:
                lin.weight.data = scaled_float[key].clone()
        rtn = copy.deepcopy(model)
        for key, n, lin in linears(rtn):
            if n == t:
                lin.weight.data = quantize.fake_quantize(lin.weight.data, settings.group_size)
        row["rtn"] = ppl(rtn) - whole["float"]
        del rtn
        rows.append(row)
        print(f"{t:9s}  {row['awq']:+.3f}  {row['scaled_no_clip']:+.3f}           {row['rtn']:+.3f}  "
              f"{row['awq'] / row['rtn']:.2f}", flush=True)
    out = {"model": args.model, "settings": json.loads(args.settings), "windows": args.windows, "whole": whole,
           "types": rows, "quantize_s": meta["seconds"], "wall_s": round(time.time() - started, 1),
           "command": "python benchmarks/quantizer_linear_sensitivity.py " + " ".join(sys.argv[1:])}
    RESULTS.mkdir(exist_ok=True)
    name = args.name or f"{args.model}-g{settings.group_size}"
    (RESULTS / f"quantizer-linear-sensitivity-{name}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
