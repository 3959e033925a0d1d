"""When does a prompt that is partly in the KV cache give bit-identical logits to a fresh prefill?

    python benchmarks/kv_reuse_exact.py --engine out/engine [--layouts 200] [--prompts 20]

The server (awq_edge/server.py, reusable_prefix) keeps cached prompt rows and feeds only the
rest; `awq-edge run` prefills from an empty cache in chunks of PREFILL_CHUNK (256). With ORT's
int8-compute MatMulNBits (accuracy_level 4) the rounding depends on how a row was computed.
The model tested here: a row is computed in one of three ways, and its result depends only on
which one, not on the chunk's size or position:
  - paired: rows of a chunk go through the kernel two at a time;
  - odd last row of a chunk of >= 3 rows (the remainder, a one-row tile of the same kernel);
  - a chunk of 1 token (M = 1: a different, GEMV kernel; every decode step is one).
Part 1 feeds random prompts in random chunkings and checks that the last logits equal the
fresh prefill's exactly when the model predicts they do (every row computed the same way).
Part 2 measures what naive reuse costs: the same prompt twice, the second time keeping the
longest common prefix (all but the last token, which is then fed alone, as Engine.stream_ids
with reuse_cache=True does), vs a fresh prefill: how many greedy replies change.
Writes benchmarks/results/kv_reuse_exact-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPTS = ["What is the capital of France?", "Name three uses of a robot arm.", "Explain what a KV cache is.",
           "Write a haiku about the sea.", "List the planets of the solar system.", "How do magnets work?",
           "Give me a recipe for pancakes.", "What is 17 times 23?", "Describe a sunset in two sentences.",
           "Why is the sky blue?", "Translate 'good morning' into French and German.", "What is a lidar?",
           "Summarize the plot of Hamlet.", "How does a PID controller work?", "Tell me a joke about robots.",
           "What is the boiling point of water on Mount Everest?", "Name five programming languages.",
           "What does a servo motor do?", "Explain recursion to a child.", "What is an inertial measurement unit?"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def row_kinds(chunks: list[int]) -> list[str]:
    """How each row is computed: 'pair', 'odd' (the last row of an odd chunk of >= 3), 'one' (a 1-token chunk)."""
    kinds = []
    for n in chunks:
        kinds += ["pair"] * (n - n % 2) + (["one"] if n == 1 else ["odd"] if n % 2 else [])
    return kinds


def fresh_chunks(n: int, chunk: int) -> list[int]:
    return [min(chunk, n - s) for s in range(0, n, chunk)]


def last_logits(backend, ids: list[int], chunks: list[int]) -> np.ndarray:
    backend.rewind(0)
    start = 0
    for n in chunks:
        logits = backend.forward(ids[start:start + n])
        start += n
    return logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, type=Path)
    ap.add_argument("--layouts", type=int, default=200, help="random chunkings to test (part 1)")
    ap.add_argument("--prompts", type=int, default=20, help="prompts for the greedy comparison (part 2)")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from awq_edge.engine import PREFILL_CHUNK, Engine
    from awq_edge.sampling import Sampler, SamplingSettings

    engine = Engine.load(args.engine)
    backend = engine.backend
    text_ids = engine.tokenizer.encode((HERE.parent / "README.md").read_text(encoding="utf-8"))
    rng = random.Random(args.seed)

    # Part 1: random prompt lengths (short ones and ones past a prefill chunk), random chunkings.
    cases, agree, identical = [], 0, 0
    t0 = time.perf_counter()
    for _ in range(args.layouts):
        n = rng.choice([rng.randint(2, 64), rng.randint(200, 600)])
        start = rng.randrange(0, len(text_ids) - n)
        ids = text_ids[start:start + n]
        chunks, left = [], n
        while left:
            size = min(left, rng.choice([1, 2, 3, 4, 5, 6, 8, 16, 31, 64, 100, 254, 255, 256]))
            chunks.append(size)
            left -= size
        same = bool(np.array_equal(last_logits(backend, ids, fresh_chunks(n, PREFILL_CHUNK)),
                                   last_logits(backend, ids, chunks)))
        predicted = row_kinds(chunks) == row_kinds(fresh_chunks(n, PREFILL_CHUNK))
        agree += same == predicted
        identical += same
        cases.append({"tokens": n, "chunks": chunks, "identical": same, "predicted": predicted})
        if same != predicted:
            print(f"NOT AS PREDICTED: {n} tokens in chunks {chunks}: identical={same}", flush=True)
    part1_s = time.perf_counter() - t0
    print(f"part 1: {args.layouts} chunkings, {identical} bit-identical to a fresh prefill, "
          f"the model predicted {agree}/{args.layouts} ({part1_s:.0f} s)")

    # Part 2: greedy replies, fresh vs a repeated prompt with naive reuse (its last token fed alone).
    greedy = SamplingSettings(temperature=0.0)
    differ, first_diff = 0, []
    for prompt in PROMPTS[:args.prompts]:
        ids = engine.prompt_ids(prompt)
        fresh = engine.generate(prompt, max_new_tokens=args.new_tokens, temperature=0)
        engine.reset()
        list(engine.stream_ids(ids, Sampler(greedy), 0, reuse_cache=True))  # the prompt, prefilled as `run` does
        naive = "".join(engine.stream_ids(ids, Sampler(greedy), args.new_tokens, reuse_cache=True))
        assert engine.last_stats.reused_tokens == len(ids) - 1
        if naive != fresh:
            differ += 1
            first_diff.append(next(i for i, (a, b) in enumerate(zip(naive + "\0", fresh + "\1")) if a != b))
    print(f"part 2: {differ} of {args.prompts} greedy replies ({args.new_tokens} tokens) change when the last "
          "prompt token is fed alone")

    import onnxruntime

    out = {
        "script": "benchmarks/kv_reuse_exact.py", "engine": str(args.engine),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu_name(), "cores": os.cpu_count(),
        "python": sys.version.split()[0], "onnxruntime": onnxruntime.__version__,
        "matmul_accuracy_level": engine.export.matmul_accuracy_level,
        "prefill_chunk": PREFILL_CHUNK,
        "part1": {"layouts": args.layouts, "bit_identical": identical, "as_predicted": agree, "seconds": part1_s,
                  "cases": cases},
        "part2": {"prompts": args.prompts, "new_tokens": args.new_tokens, "replies_changed": differ,
                  "first_different_char": first_diff},
    }
    (HERE / "results").mkdir(exist_ok=True)
    path = HERE / "results" / f"kv_reuse_exact-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
