"""Block tuning (SignRound, `block_tune_steps`) on the first blocks of SmolLM2: each setting's
held-out block error, without a full quantization.

    python benchmarks/quantizer_tune_lab.py [--blocks 3] '{"block_tune_steps": 0}' '{"block_tune_steps": 20}' ...

Each JSON argument is a set of QuantizeSettings overrides on top of a smaller calibration than the
default's (32 x 512 tokens, loss on 8 sequences, so a setting takes about a minute); the quantizer
runs on the first --blocks decoder blocks only, and each block reports the MSE of its output
against the float block's on the held-out sequences before and after tuning (awq_edge.json's
"tune" entry). Deterministic: the same settings give the same numbers. Prints a line per setting
and writes benchmarks/results/quantizer-tune-lab-<timestamp>.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from awq_edge import data
from awq_edge.model import check_causal_lm, load_for_quantization, read_config, resolve_source
from awq_edge.quantize import QuantizeSettings, calibration_tokens, quantize_model

RESULTS = Path(__file__).resolve().parent / "results"
LAB = dict(calib_samples=32, loss_samples=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("settings", nargs="+", help="JSON objects of QuantizeSettings overrides")
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    model_dir = resolve_source(args.model)
    family = check_causal_lm(read_config(model_dir), str(model_dir))
    texts = data.read_texts(data.fetch_wikipedia()[0])
    rows = []
    for overrides in map(json.loads, args.settings):
        model, tokenizer, materialize = load_for_quantization(model_dir)  # fresh: quantizing changes it
        model.model.layers = model.model.layers[:args.blocks]
        settings = QuantizeSettings(**{**LAB, **overrides})
        tokens = calibration_tokens(tokenizer, texts, settings.calib_samples, settings.calib_seqlen,
                                    settings.calib_seed)
        started = time.time()
        result = quantize_model(model, family, tokens, settings, progress=False, materialize=materialize)
        tune = [layer.get("tune") for layer in result.layer_report]
        row = {"overrides": overrides, "seconds": round(time.time() - started, 1), "blocks": tune}
        rows.append(row)
        print(json.dumps(overrides), f"{row['seconds']} s", " ".join(
            f"{t['mse_before']:.5f}->{t['mse_after']:.5f}{'' if t['kept'] else ' (not kept)'}" if t else "no tuning"
            for t in tune), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"quantizer-tune-lab-{time.strftime('%Y%m%d-%H%M%S')}.json"
    command = " ".join(["python benchmarks/quantizer_tune_lab.py", f"--blocks {args.blocks}"]
                       + [f"'{s}'" for s in args.settings])
    out.write_text(json.dumps({"command": command, "blocks": args.blocks,
        "lab_settings": LAB, "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print("wrote", out)


if __name__ == "__main__":
    main()
