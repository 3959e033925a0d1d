"""Perplexity table: float / RTN / AWQ at group 32, 64 and 128, plus quantization time and peak RSS.

    python benchmarks/quantizer.py [--model smollm2] [--windows N] [--seqlen 1024] [--roundings nearest,gptq]

AWQ runs once per rounding (`--rounding`: nearest is the AWQ reference's, gptq the default).
Runs the real CLI (`awq-edge quantize`, `awq-edge eval --json`) in subprocesses with default
settings, on the built-in Wikipedia evaluation split (articles disjoint from calibration).
Prints a markdown table and writes benchmarks/results/quantizer-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "awq_edge.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"awq-edge {' '.join(args)} failed: {proc.stderr.strip().splitlines()[-1]}")
    return proc.stdout


def evaluate(model: str, args) -> dict:
    extra = ["--windows", str(args.windows)] if args.windows else []
    return json.loads(cli("eval", model, "--seqlen", str(args.seqlen), "--protocol", args.protocol, "--json",
                          *extra).strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--windows", type=int, default=None, help="default: every full window of the text")
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--groups", default="32,64,128")
    ap.add_argument("--roundings", default="nearest,gptq")
    ap.add_argument("--protocol", default="plain", help="eval's window protocol (plain: the committed table's)")
    args = ap.parse_args()

    rows, runs = [], {}
    roundings = args.roundings.split(",")
    fp = evaluate(args.model, args)
    print(f"float: ppl {fp['perplexity']:.3f} ({fp['windows']} windows x {fp['seqlen']})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for g in [int(x) for x in args.groups.split(",")]:
            row = {"group_size": g, "float": fp["perplexity"]}
            for method, rounding in [("rtn", None)] + [("awq", r) for r in roundings]:
                key = method if rounding is None else f"awq_{rounding}"
                out = Path(tmp) / f"{key}-g{g}"
                extra = [] if rounding is None else ["--rounding", rounding]
                started = time.time()
                cli("quantize", args.model, "--method", method, "--group-size", str(g), "--output", str(out), *extra)
                wall = time.time() - started
                meta = json.loads((out / "awq_edge.json").read_text())
                result = evaluate(str(out), args)
                row[key] = result["perplexity"]
                runs[f"{key}-g{g}"] = {"quantize_wall_s": round(wall, 1), "quantize_s": meta["seconds"],
                                       "peak_rss_bytes": meta["peak_rss_bytes"], "settings": meta["settings"],
                                       "eval": result}
                print(f"g{g} {key}: ppl {result['perplexity']:.3f}, quantize {wall:.0f} s wall, "
                      f"peak RSS {meta['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
            for r in roundings:
                row[f"gap_closed_ratio_{r}"] = (row[f"awq_{r}"] - fp["perplexity"]) / (row["rtn"] - fp["perplexity"])
            rows.append(row)

    head = "".join(f" AWQ {r} | ratio |" for r in roundings)
    print(f"\n| group | float | RTN |{head}\n|---|---|---|" + "---|---|" * len(roundings))
    for r in rows:
        cells = "".join(f" {r[f'awq_{x}']:.2f} | {r[f'gap_closed_ratio_{x}']:.3f} |" for x in roundings)
        print(f"| {r['group_size']} | {r['float']:.2f} | {r['rtn']:.2f} |{cells}")
    RESULTS.mkdir(exist_ok=True)
    name = Path(args.model).name.replace(".gguf", "")
    out = RESULTS / f"quantizer-{name}.json"
    out.write_text(json.dumps({
        "command": "python benchmarks/quantizer.py " + " ".join(sys.argv[1:]),
        "model": args.model, "text": fp["text"], "seqlen": args.seqlen, "windows": fp["windows"],
        "protocol": args.protocol,
        "tokens": fp["tokens"], "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d"), "rows": rows, "runs": runs}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
