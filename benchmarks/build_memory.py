#!/usr/bin/env python3
"""Peak host memory of `awq-edge build` from a quantized checkpoint, against the layer count.

    python benchmarks/build_memory.py [--shape llama2-7b] [--layers 2 4 8] [--targets cpu cuda float]
                                      [--baseline REV]

For each layer count: a random AutoAWQ checkpoint of that shape cut to that many layers
(awq_edge/synthetic.py: the real sizes of every tensor, random values), built for each target
(`cpu`: the ONNX Runtime engine; `cuda`: the native engine for an RTX 4090, which needs nvcc;
`float`: no build, the dequantized float32 model `awq-edge eval` runs, torch) in a child process of
its own, whose peak RSS (its VmHWM: not nvcc's) is the number.
--baseline REV builds the same checkpoints with the code of that git revision too (a temporary
worktree), in the same run: the ratio is what a change did. Per target and code: the fit
peak = a + b * layers, and what it gives at the shape's own layer count (arithmetic on the fit,
not a measurement). Writes benchmarks/results/build_memory-<time>.json. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEVICE = {"cpu": "cpu", "cuda": "rtx4090", "float": None}  # float: `awq-edge eval`'s model, not a build

# Run in the child: the build, then its peak RSS and what it imported, as one JSON line. VmHWM, not
# getrusage's ru_maxrss: that counts the parent's pages the child had between fork and exec.
CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1]) if sys.argv[1] else None
import awq_edge, awq_edge.export
from awq_edge.build import build_engine
start = time.perf_counter()
if sys.argv[3] == "None":  # the dequantized float32 model awq-edge eval runs (torch)
    from awq_edge.checkpoint import load_awq_as_float
    load_awq_as_float(sys.argv[2])
    import os; os.makedirs(sys.argv[4])
else:
    build_engine(sys.argv[2], device=sys.argv[3], output=sys.argv[4], force=True, progress=False,
                 backend="cuda" if sys.argv[3] != "cpu" else "auto")
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"peak_rss_bytes": int(hwm.split()[1]) * 1024,
                  "seconds": round(time.perf_counter() - start, 1),
                  "code": [awq_edge.__file__, awq_edge.export.__file__]}))
"""


def baseline_tree(rev: str, work: Path) -> Path:
    """A worktree of rev whose awq_edge package holds export/ and devices/ as the installed one does."""
    tree = work / f"baseline-{rev}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True,
                   capture_output=True)
    for sub in ("export", "devices"):
        (tree / "awq_edge" / sub).symlink_to(tree / sub)
    return tree


def build_peak(code: Path | None, checkpoint: Path, target: str, output: Path) -> dict:
    child = subprocess.run([sys.executable, "-c", CHILD, str(code or ""), str(checkpoint), str(DEVICE[target]),
                            str(output)], capture_output=True, text=True)
    if child.returncode:
        raise SystemExit(f"build failed ({target}, {code or 'this tree'}): {child.stderr[-2000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    root = (code or ROOT).resolve()
    if not all(Path(f).resolve().is_relative_to(root) for f in result["code"]):
        raise SystemExit(f"the child imported {result['code']}, not the code under {root}")
    result["engine_bytes"] = sum(f.stat().st_size for f in output.iterdir())
    shutil.rmtree(output)
    return result


def fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least squares a + b * layers."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    b = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return my - b * mx, b


def main() -> None:
    from awq_edge.synthetic import SHAPES, byte_tokenizer, write_random_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--targets", nargs="+", default=["cpu", "cuda"], choices=sorted(DEVICE))
    ap.add_argument("--baseline", help="a git revision to build with too, in the same run")
    args = ap.parse_args()
    if "cuda" in args.targets and not shutil.which(os.environ.get("NVCC", "nvcc")):
        raise SystemExit("the cuda target needs nvcc (or NVCC=/path/to/nvcc); leave it out: --targets cpu")

    shape = SHAPES[args.shape]
    rows = []
    with tempfile.TemporaryDirectory(prefix="build_memory.") as tmp:
        work = Path(tmp)
        codes = {"this tree": None}
        if args.baseline:
            codes[args.baseline] = baseline_tree(args.baseline, work)
        try:
            tokenizer = byte_tokenizer(work / "tokenizer")
            for layers in args.layers:
                checkpoint = write_random_checkpoint(work / f"ckpt-{layers}",
                                                     dict(shape, num_hidden_layers=layers), tokenizer_dir=tokenizer)
                ckpt_bytes = sum(f.stat().st_size for f in checkpoint.iterdir())
                for target in args.targets:
                    for label, code in codes.items():
                        r = build_peak(code, checkpoint, target, work / "engine")
                        rows.append({"layers": layers, "target": target, "code": label,
                                     "checkpoint_bytes": ckpt_bytes, **{k: r[k] for k in r if k != "code"}})
                        print(f"{layers:3d} layers  {target:4s}  {label:12s}  peak RSS "
                              f"{r['peak_rss_bytes'] / 2**30:6.2f} GiB  ({r['seconds']} s; checkpoint "
                              f"{ckpt_bytes / 2**30:.2f} GiB, engine {r['engine_bytes'] / 2**30:.2f} GiB)", flush=True)
                shutil.rmtree(checkpoint)
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(codes[args.baseline])], capture_output=True)

    full = shape["num_hidden_layers"]
    fits = []
    for target in args.targets:
        for label in codes:
            a, b = fit([(r["layers"], r["peak_rss_bytes"]) for r in rows if r["target"] == target
                        and r["code"] == label])
            fits.append({"target": target, "code": label, "intercept_bytes": round(a), "bytes_per_layer": round(b),
                         f"fit_at_{full}_layers_bytes": round(a + b * full)})
            print(f"{target:4s}  {label:12s}  peak = {a / 2**30:.2f} GiB + {b / 2**20:7.1f} MiB x layers "
                  f"-> {(a + b * full) / 2**30:.2f} GiB at {full} layers (the fit's arithmetic)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"build_memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"shape": args.shape, "config": shape, "baseline": args.baseline,
                               "commit": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                                        capture_output=True, text=True).stdout.strip(),
                               "cpu_count": os.cpu_count(), "rows": rows, "fits": fits}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
