#!/usr/bin/env python3
"""What the block tuning (quantize.py step f, on by default) adds to quantizing a 7B model, measured on one block.

    python benchmarks/quantizer_7b_tuning.py [--shape llama2-7b] [--output FILE]

benchmarks/quantizer_7b_blocks.py measures whole blocks (steps a-e at about 25 min per 7B block
here), which leaves no room in a session for tuning on top. Tuning is the last step of a block and
needs only what the block holds by then, so this rebuilds that state for one random block of the
shape and times step f alone, with the default settings:
- a one-block Llama model of the shape (random weights, std 0.02), fp32, and the calibration
  inputs of its block, captured by the quantizer's own capture_block_inputs from 64 x 512 random
  token ids (the same count and length as the default calibration);
- the float block's outputs (the targets), in batches of 8 as step a computes them;
- every linear rounded to the nearest level at group 128 with the values it was rounded from
  (step e's output when tuning is on; GPTQ instead of nearest changes the levels, not the sizes),
  and the float weights of the linears released, as quantize_model does before tuning.
A thread samples the RSS every 20 ms. The JSON has the RSS before the block's state, just before
tuning and the peak during it, the seconds, and an estimate of a whole 7B run's peak: the
committed per-block measurement (results/quantizer-7b-blocks-<shape>.json) with its largest block
working set replaced by the tuning's, whichever is larger. Linux only (/proc/self/statm).
Writes benchmarks/results/quantizer-7b-tuning-<shape>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from quantizer_7b_blocks import GIB, RssSampler, live_rss_bytes  # noqa: E402  (this folder is on sys.path)
from quantizer_memory import RESULTS  # noqa: E402


def main() -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from awq_edge.quantize import (QuantizeSettings, _layer_output, _linear_names, _release, _to_quantized,
                                   capture_block_inputs, tune_block_outputs)
    from awq_edge.synthetic import SHAPES, random_checkpoint_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    shape, settings = SHAPES[args.shape], QuantizeSettings()
    torch.manual_seed(0)

    sampler = RssSampler()
    sampler.start()
    before_block = live_rss_bytes()
    config = AutoConfig.for_model(**{**random_checkpoint_config(shape), "num_hidden_layers": 1})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tokens = torch.randint(0, shape["vocab_size"], (settings.calib_samples, settings.calib_seqlen))
    t0 = time.perf_counter()
    inputs, layer_kwargs = capture_block_inputs(model, tokens, settings.batch_size)
    layer, kwargs = model.model.layers[0], layer_kwargs[0]
    model.model.embed_tokens = model.lm_head = None  # the quantizer holds no second block-sized table
    with torch.no_grad():
        targets = torch.cat([_layer_output(layer(inputs[i:i + settings.batch_size], **kwargs)).float()
                             for i in range(0, len(inputs), settings.batch_size)])
        rounded = {lin: _to_quantized(lin, settings.group_size, continuous=True)
                   for lin in _linear_names(layer).values()}
    for lin in rounded:
        _release(lin)  # as quantize_model does before tuning
    setup_s = time.perf_counter() - t0
    before_tuning = live_rss_bytes()
    sampler.mark()
    t0 = time.perf_counter()
    _tuned, report = tune_block_outputs(layer, rounded, inputs, targets, kwargs, settings)
    tune_s = time.perf_counter() - t0
    tuning_peak = sampler.mark()
    sampler.running = False

    inputs_bytes = inputs.numel() * inputs.element_size()
    # in a whole run the block's inputs are already there when the block starts (its rss_at_start)
    tuning_over_block_start = tuning_peak - before_block - inputs_bytes
    result = {
        "benchmark": "quantizer_7b_tuning", "shape": args.shape, "shape_config": shape,
        "settings": {k: getattr(settings, k) for k in ("block_tune_steps", "block_tune_batch", "block_tune_lr",
                                                        "batch_size", "calib_samples", "calib_seqlen", "group_size")},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},  # > cpus: other processes shared the cores
        "setup_seconds": round(setup_s, 1), "tune_seconds": round(tune_s, 1), "tune_report": report,
        "rss_before_block_bytes": before_block, "rss_before_tuning_bytes": before_tuning,
        "tuning_peak_rss_bytes": tuning_peak, "inputs_bytes": inputs_bytes,
        "tuning_peak_over_block_start_bytes": tuning_over_block_start,
    }
    blocks_json = RESULTS / f"quantizer-7b-blocks-{args.shape}.json"
    line = ""
    if blocks_json.is_file():
        blocks = json.loads(blocks_json.read_text())
        start = blocks["blocks"][0]["rss_at_start_bytes"]
        block_over_start = max(b["peak_rss_bytes"] - b["rss_at_start_bytes"] for b in blocks["blocks"])
        layers, kept = shape["num_hidden_layers"], blocks["kept_per_block_bytes"]
        peak = start + (layers - 1) * kept + max(block_over_start, tuning_over_block_start)
        per_block = blocks["extrapolated"]["seconds_per_block"] + tune_s
        result["extrapolated"] = {
            "from": blocks_json.name, "layers": layers, "steps_a_to_e_peak_over_block_start_bytes": block_over_start,
            "quantize_peak_rss_bytes": int(peak), "seconds_per_block": round(per_block, 1),
            "quantize_seconds": round(layers * per_block),
            "note": "the per-block JSON's peak with the largest block working set replaced by the tuning's when "
                    "larger; seconds: its steps a-e per block plus this tuning"}
        line = (f"; a whole {layers}-block run: peak about {peak / GIB:.1f} GiB, {layers * per_block / 3600:.1f} h "
                f"(from {blocks_json.name})")
    print(f"{args.shape}: tuning one block took {tune_s:.0f} s (setup {setup_s:.0f} s); RSS {before_tuning / GIB:.2f} GiB "
          f"before it, peak {tuning_peak / GIB:.2f} GiB: {tuning_over_block_start / GIB:.2f} GiB over a block's start"
          + line)
    out = args.output or RESULTS / f"quantizer-7b-tuning-{args.shape}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
