"""Where a quantizer block's time goes: seconds per step on the first blocks of SmolLM2.

    python benchmarks/quantizer_profile.py [--blocks 3] [--model smollm2]

Runs the default quantizer (64 x 512 calibration tokens of the built-in Wikipedia split) on the
first --blocks decoder blocks, once with `scale_search` full and once with the default
(coarse to fine), with a timer around each step's function in awq_edge.quantize: the scale search,
the clip search, the GPTQ rounding, the grams and the block tuning. The rest of a block (the float
pass with its statistics hooks, folding the scales) is the block's time minus those. Prints a
table and writes benchmarks/results/quantizer-profile-<model>.json.
"""
from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import time
from pathlib import Path

import torch

from awq_edge import data
from awq_edge import quantize as q
from awq_edge.model import check_causal_lm, load_for_quantization, read_config, resolve_source

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("search_scales", "search_clip", "gptq_round", "gram", "tune_block_outputs")


def timed_steps() -> dict[str, float]:
    """Wraps each of STEPS in awq_edge.quantize (quantize_model calls them by module name) with a
    timer; returns the running totals, in seconds."""
    totals: dict[str, float] = collections.defaultdict(float)
    for name in STEPS:
        fn = getattr(q, name)

        @functools.wraps(fn)
        def wrapper(*args, _fn=fn, _name=name, **kwargs):
            started = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_name] += time.perf_counter() - started

        setattr(q, name, wrapper)
    return totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=3)
    ap.add_argument("--model", default="smollm2")
    args = ap.parse_args()
    model_dir = resolve_source(args.model)
    family = check_causal_lm(read_config(model_dir), str(model_dir))
    texts = data.read_texts(data.fetch_wikipedia()[0])
    totals = timed_steps()
    load = os.getloadavg()
    rows = []
    for search in ("full", "refine"):
        model, tokenizer, materialize = load_for_quantization(model_dir)
        model.model.layers = model.model.layers[:args.blocks]
        settings = q.QuantizeSettings(scale_search=search)
        tokens = q.calibration_tokens(tokenizer, texts, settings.calib_samples, settings.calib_seqlen,
                                      settings.calib_seed)
        totals.clear()
        started = time.perf_counter()
        q.quantize_model(model, family, tokens, settings, progress=False, materialize=materialize)
        seconds = time.perf_counter() - started
        steps = {name: totals[name] / args.blocks for name in STEPS}
        steps["rest (float pass, hooks, folding)"] = seconds / args.blocks - sum(steps.values())
        rows.append({"scale_search": search, "seconds_per_block": seconds / args.blocks,
                     "steps_seconds_per_block": steps,
                     "steps_share": {k: v / (seconds / args.blocks) for k, v in steps.items()}})
        print(f"scale_search {search}: {seconds / args.blocks:.1f} s per block")
        for name, s in steps.items():
            print(f"  {name:36s} {s:6.2f} s  {s / (seconds / args.blocks) * 100:5.1f} %")
    out = {"command": f"python benchmarks/quantizer_profile.py --blocks {args.blocks} --model {args.model}",
           "blocks": args.blocks, "threads": torch.get_num_threads(), "load_average_at_start": load,
           "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"quantizer-profile-{Path(args.model).stem}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
