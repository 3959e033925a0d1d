"""One quantizer variant: quantize SmolLM2 with the default settings plus overrides, then evaluate.

    python benchmarks/quantizer_variant.py NAME '{"group_size": 128, "clip_tokens": 2048}' [--windows 24] [--shakespeare]

Quantizes with awq_edge.quantize.QuantizeSettings(**overrides) into a temp dir, runs
`awq-edge eval --seqlen 1024 --windows N --json` on it, prints one JSON line and writes
benchmarks/results/quantizer-variant-NAME.json. --shakespeare also scores the same checkpoint on
the first N windows of the Shakespeare text (another domain than the Wikipedia calibration).
This is how the variants in docs/quantizer.md were measured. Experimental settings named in the docs exist only in the commit the docs give
next to each: run this script from a checkout of that commit (or with PYTHONPATH set to a
worktree of it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from awq_edge import data
from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"


def evaluate(checkpoint: Path, windows: int, text: Path | None = None, protocol: str = "plain") -> dict:
    """`awq-edge eval --seqlen 1024 --windows N --json` (on the Wikipedia evaluation split unless text)."""
    cmd = [sys.executable, "-m", "awq_edge.cli", "eval", str(checkpoint), "--seqlen", "1024",
           "--windows", str(windows), "--protocol", protocol, "--json"] + (["--text", str(text)] if text else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"eval failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("overrides", help="JSON object of QuantizeSettings fields")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--shakespeare", action="store_true")
    ap.add_argument("--protocol", default="plain", help="eval's window protocol (plain: the committed rows')")
    args = ap.parse_args()
    overrides = json.loads(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / args.name
        started = time.time()
        meta = quantize_checkpoint(args.model, out, QuantizeSettings(**overrides), progress=False)
        wall = time.time() - started
        result = evaluate(out, args.windows, protocol=args.protocol)
        shakespeare = evaluate(out, args.windows, data.fetch_shakespeare(), args.protocol) if args.shakespeare else None
    row = {"name": args.name, "settings": overrides, "perplexity": result["perplexity"],
           "windows": result["windows"], "protocol": args.protocol, "quantize_wall_s": round(wall, 1), "peak_rss_bytes": meta["peak_rss_bytes"],
           "command": "python benchmarks/quantizer_variant.py " + " ".join(sys.argv[1:])}
    if shakespeare:
        row["shakespeare_perplexity"] = shakespeare["perplexity"]
    print(json.dumps(row))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"quantizer-variant-{args.name}.json").write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
