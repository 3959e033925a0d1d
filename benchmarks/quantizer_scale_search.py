"""The scale search coarse to fine against every alpha: same levels? how much faster?

    python benchmarks/quantizer_scale_search.py [--group-size 128] [--calib-protocol plain] [--model smollm2]
    python benchmarks/quantizer_scale_search.py --full CKPT [--refine CKPT]    # finished runs: no quantizing

Quantizes the model twice with the default settings, `--scale-search full` (every alpha of the
grid) then `--scale-search refine` (awq_edge.quantize.coarse_to_fine, the default), each in a
fresh `awq-edge quantize` process, so each run's time and peak RSS are its own. Reports:
- each run's quantize seconds and peak RSS (from the checkpoint's awq_edge.json);
- whether the two checkpoints' tensors are bit-identical, and in how many groups the alpha differs;
- from the full run's loss curves: how many groups have more than one local minimum in alpha, and
  what coarse_to_fine would pick around the best 1, 2, 3 points (misses of the grid's
  argmin, losses computed per group, the worst loss ratio of a miss).
Writes benchmarks/results/quantizer-scale-search-<model>-g<G>-<protocol>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from awq_edge.quantize import coarse_to_fine

RESULTS = Path(__file__).resolve().parent / "results"


def quantize(model: str, out: Path, group_size: int, protocol: str, search: str) -> float:
    cmd = [sys.executable, "-m", "awq_edge.cli", "quantize", model, "-o", str(out), "--group-size", str(group_size),
           "--calib-protocol", protocol, "--scale-search", search]
    print("$", " ".join(cmd[2:]), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - started


def curves(meta: dict) -> list[list[float]]:
    """Each group's losses over the whole grid (older checkpoints: a plain list; now (alpha, loss) pairs)."""
    out = []
    for layer in meta["layers"]:
        for group in layer["groups"].values():
            losses = group["losses"]
            out.append([x[1] if isinstance(x, list) else x for x in losses])
    return out


def simulate(full_curves: list[list[float]], keep: int) -> dict:
    misses, evals, worst = 0, 0, 1.0
    for loss in full_curves:
        best, tried = coarse_to_fine(len(loss), lambda i: loss[i], keep=keep)
        argmin = min(range(len(loss)), key=lambda i: (loss[i], i))
        evals += len(tried)
        if best != argmin:
            misses += 1
            worst = max(worst, loss[best] / loss[argmin])
    return {"keep": keep, "misses": misses, "losses_per_group": evals / len(full_curves),
            "worst_loss_ratio_of_a_miss": worst}


def local_minima(loss: list[float]) -> int:
    n = len(loss)
    return sum((i == 0 or loss[i] < loss[i - 1]) and (i == n - 1 or loss[i] < loss[i + 1]) for i in range(n))


def run_summary(checkpoint: Path, meta: dict) -> dict:
    return {"checkpoint": str(checkpoint), "quantize_s": meta["seconds"], "peak_rss_bytes": meta["peak_rss_bytes"]}


def compare(full: Path, refine: Path | None) -> dict:
    """The full run's curves simulated; with refine, the two runs side by side."""
    meta_full = json.loads((full / "awq_edge.json").read_text())
    full_curves = curves(meta_full)
    if any(len(c) != meta_full["settings"]["scale_grid"] for c in full_curves):
        sys.exit(f"{full} is not a full-search checkpoint (some group lacks losses for every alpha)")
    row = {"settings": {k: meta_full["settings"][k] for k in ("group_size", "calib_protocol", "scale_grid")},
           "full": run_summary(full, meta_full), "groups": len(full_curves),
           "groups_with_several_local_minima": sum(local_minima(c) > 1 for c in full_curves),
           "simulated": [simulate(full_curves, keep) for keep in (1, 2, 3)]}
    if refine is None:
        return row
    meta_refine = json.loads((refine / "awq_edge.json").read_text())
    a, b = load_file(str(full / "model.safetensors")), load_file(str(refine / "model.safetensors"))
    differ = sorted(k for k in a.keys() | b.keys()
                    if k not in a or k not in b or a[k].shape != b[k].shape or not np.array_equal(a[k], b[k]))
    alphas = [[(layer["layer"], name, g["alpha"]) for layer in m["layers"] for name, g in layer["groups"].items()]
              for m in (meta_full, meta_refine)]
    row.update(refine=run_summary(refine, meta_refine), refine_over_full_time=meta_refine["seconds"] / meta_full["seconds"],
               tensors=len(a), tensors_that_differ=len(differ), first_that_differ=differ[:5],
               alpha_mismatches=sum(x != y for x, y in zip(*alphas)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calib-protocol", default="plain")
    ap.add_argument("--full", type=Path, help="a finished --scale-search full checkpoint: its curves simulated, no quantizing")
    ap.add_argument("--refine", type=Path, help="with --full: a finished refine run of the same settings, compared")
    args = ap.parse_args()
    load = os.getloadavg()
    if args.full:
        row = compare(args.full, args.refine)
        row["wall_s"] = None
    else:
        with tempfile.TemporaryDirectory(prefix="scale-search-") as tmp:
            wall = {s: quantize(args.model, Path(tmp) / s, args.group_size, args.calib_protocol, s)
                    for s in ("full", "refine")}
            row = compare(Path(tmp) / "full", Path(tmp) / "refine")
            row["wall_s"] = wall
    row.update(model=args.model, command="python benchmarks/quantizer_scale_search.py " + " ".join(sys.argv[1:]),
               machine=platform.platform(), logical_cpus=os.cpu_count(), load_average_at_start=load,
               when=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    print(json.dumps(row, indent=2))
    RESULTS.mkdir(exist_ok=True)
    s = row["settings"]
    path = RESULTS / f"quantizer-scale-search-{Path(args.model).stem}-g{s['group_size']}-{s['calib_protocol']}.json"
    path.write_text(json.dumps(row, indent=2) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
