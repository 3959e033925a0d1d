"""What the CPU runtime costs besides the model: the measurement behind memory.CPU_RUNTIME_OVERHEAD.

    python benchmarks/runtime_overhead.py ENGINE [--context 512] [--new-tokens 200] [--runs 3]

Each run is a fresh process (its peak RSS, VmHWM, is its own) that
  1. imports the runtime (numpy, onnxruntime, tokenizers, jinja2) and loads the engine's
     tokenizer: the peak RSS of the bare runtime;
  2. loads the engine with --max-context CONTEXT and generates NEW_TOKENS tokens (greedy, EOS
     ignored): the peak RSS of real use.
The overhead is peak 2 minus the plan's weights (model.onnx.data + the exact lm_head table):
KV cache, workspace, Python, ONNX Runtime's arena and the tokenizer; minus the plan's KV cache
and workspace too, it is what CPU_RUNTIME_OVERHEAD must cover. It prints the numbers and
writes benchmarks/results/runtime_overhead-<time>.json; the medians are the figures
docs/runtime.md quotes.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, sys
from pathlib import Path
import jinja2, numpy, onnxruntime, tokenizers  # the runtime's libraries, loaded before the first reading
from awq_edge.memory import peak_rss_bytes
from awq_edge.tokenizer import Tokenizer
engine_dir, context, new_tokens = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
Tokenizer(engine_dir)
bare = peak_rss_bytes()
from awq_edge.engine import Engine
from awq_edge.sampling import Sampler, SamplingSettings
engine = Engine.load(engine_dir, max_context=context)
ids = engine.prompt_ids("Tell me a long story about a robot arm.")
for _ in engine.stream_ids(ids, Sampler(SamplingSettings(temperature=0)), new_tokens, ignore_eos=True):
    pass
print(json.dumps({"bare_runtime_peak": bare, "after_generation_peak": peak_rss_bytes(),
                  "plan": engine.plan.to_dict(), "new_tokens": engine.last_stats.new_tokens}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=200)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    runs = []
    for i in range(args.runs):
        out = subprocess.run([sys.executable, "-c", CHILD, str(args.engine), str(args.context), str(args.new_tokens)],
                             capture_output=True, text=True, check=True).stdout
        run = json.loads(out.strip().splitlines()[-1])
        plan = run["plan"]
        run["overhead"] = run["after_generation_peak"] - plan["weights"]
        # what CPU_RUNTIME_OVERHEAD must cover: all but the plan's weights, KV cache and workspace
        run["beyond_weights_kv_workspace"] = run["overhead"] - plan["kv_bytes"] - plan["workspace"]
        runs.append(run)
        print(f"run {i + 1}: bare runtime {run['bare_runtime_peak'] / 2**20:.0f} MiB, after {run['new_tokens']} "
              f"tokens {run['after_generation_peak'] / 2**20:.0f} MiB = weights "
              f"{run['plan']['weights'] / 2**20:.0f} MiB + {run['overhead'] / 2**20:.0f} MiB", flush=True)
    median = {k: statistics.median(r[k] for r in runs) for k in ("bare_runtime_peak", "after_generation_peak",
                                                                 "overhead", "beyond_weights_kv_workspace")}
    from awq_edge.memory import CPU_RUNTIME_OVERHEAD

    result = {"command": "python benchmarks/runtime_overhead.py " + " ".join(sys.argv[1:]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
              "machine": platform.platform(), "engine": str(args.engine), "context": args.context,
              "new_tokens": args.new_tokens, "runs": runs, "median": median,
              "cpu_runtime_overhead_constant": CPU_RUNTIME_OVERHEAD}
    path = HERE / "results" / f"runtime_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"median: bare runtime {median['bare_runtime_peak'] / 2**20:.0f} MiB, overhead over the weights "
          f"{median['overhead'] / 2**20:.0f} MiB, beyond weights + KV + workspace "
          f"{median['beyond_weights_kv_workspace'] / 2**20:.0f} MiB (CPU_RUNTIME_OVERHEAD is "
          f"{CPU_RUNTIME_OVERHEAD / 2**20:.0f} MiB)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
