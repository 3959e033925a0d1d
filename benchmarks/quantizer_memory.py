"""Where the quantizer's memory goes: RSS per phase of one default `quantize` run.

    python benchmarks/quantizer_memory.py [--model smollm2] [--overrides '{"group_size": 128}']

A thread samples the process RSS (/proc/self/statm) every 20 ms; the phase it is tagged with
is set by wrapping the quantizer's steps (load, capture of block 0's inputs, each block's
float pass, scale search, clip search, checkpoint write). Prints the peak RSS per phase and
writes benchmarks/results/quantizer-memory-<model>.json. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from awq_edge import checkpoint, model as model_mod, quantize

RESULTS = Path(__file__).resolve().parent / "results"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * PAGE


def tag(module, name: str, label: str, phase: list) -> None:
    """Wrap module.name so the sampler files RSS under `label` while it runs."""
    inner = getattr(module, name)

    def wrapped(*args, **kwargs):
        before, phase[0] = phase[0], label
        try:
            return inner(*args, **kwargs)
        finally:
            phase[0] = before
    setattr(module, name, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--overrides", default="{}", help="JSON object of QuantizeSettings fields")
    args = ap.parse_args()

    phase, peaks = ["start"], {}

    def sample():
        while True:
            peaks[phase[0]] = max(peaks.get(phase[0], 0), rss_bytes())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    tag(quantize, "capture_block_inputs", "capture block 0 inputs", phase)
    tag(quantize, "search_scales", "scale search", phase)
    tag(quantize, "search_clip", "clip search", phase)
    tag(checkpoint, "write_checkpoint", "write checkpoint", phase)
    load = model_mod.load_for_quantization

    def tagged_load(model_dir):
        phase[0] = "load model"
        model, tokenizer, materialize = load(model_dir)

        def tagged_materialize(i):
            phase[0] = "block: float pass, quantize"  # the searches tag themselves
            return materialize(i)
        return model, tokenizer, tagged_materialize
    model_mod.load_for_quantization = tagged_load

    settings = quantize.QuantizeSettings(**json.loads(args.overrides))
    with tempfile.TemporaryDirectory() as tmp:
        meta = quantize.quantize_checkpoint(args.model, Path(tmp) / "out", settings, progress=True)
    time.sleep(0.05)
    mib = {k: round(v / 2**20) for k, v in peaks.items()}
    for k, v in mib.items():
        print(f"{k:26s} {v:6d} MiB")
    row = {"model": args.model, "settings": meta["settings"], "peak_rss_mib_by_phase": mib,
           "peak_rss_mib": round(meta["peak_rss_bytes"] / 2**20), "seconds": meta["seconds"],
           "command": "python benchmarks/quantizer_memory.py --model " + args.model + " --overrides '" + args.overrides + "'"}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantizer-memory-{args.model}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
