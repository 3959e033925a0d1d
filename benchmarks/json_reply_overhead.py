"""What holding a reply to JSON costs: decode ms per token with and without it, in one process.

    python benchmarks/json_reply_overhead.py --engine engines/smollm2 [--runs 7] [--new-tokens 96]

Each run generates from the same prompt five ways, in an order that rotates from run to run
(after one warm-up run): plain (EOS ignored, so it decodes --new-tokens), json_object, and
json_schema (a 4-field object), the last two greedy and sampled (temperature 0.9, top_k 50:
the draw among up to 50 checked candidates). A JSON reply ends where it is whole, so its token
count differs: what is compared is decode time per token (GenerationStats: from the first token
to the last, over the tokens between), medians over runs, and each JSON way's ratio to plain in
the same run (paired: the machine is shared). Also timed: building the tokenizer's table of
token bytes, which the first JSON reply of a process pays.
Writes benchmarks/results/json_reply_overhead-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from awq_edge.engine import Engine  # noqa: E402
from awq_edge.sampling import Sampler, SamplingSettings  # noqa: E402
from awq_edge.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Describe the city of Paris: its name, its country, its population and its size."
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string"},
                                         "population": {"type": "integer"},
                                         "size": {"enum": ["small", "medium", "large"]}},
        "required": ["city", "country", "population", "size"], "additionalProperties": False}
GREEDY, SAMPLED = SamplingSettings(0.0), SamplingSettings(0.9, 50, 1.0, seed=1)
WAYS = {"plain": (GREEDY, {}), "json_object greedy": (GREEDY, {"json_object": True}),
        "json_object sampled": (SAMPLED, {"json_object": True}),
        "json_schema greedy": (GREEDY, {"json_schema": CITY}), "json_schema sampled": (SAMPLED, {"json_schema": CITY})}


def decode(engine: Engine, ids: list[int], settings: SamplingSettings, new_tokens: int, kwargs: dict) -> dict:
    text = "".join(engine.stream_ids(ids, Sampler(settings), new_tokens, ignore_eos=not kwargs, **kwargs))
    s = engine.last_stats
    steps = max(1, s.new_tokens - 1)
    return {"tokens": s.new_tokens, "decode_ms_per_token": s.decode_s / steps * 1000, "finish": s.finish_reason,
            "text": text[:200]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--engine", type=Path, required=True)
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--new-tokens", type=int, default=96)
    args = p.parse_args()

    load_before = os.getloadavg()
    started = time.perf_counter()
    table = Tokenizer(args.engine).token_bytes()
    table_s = time.perf_counter() - started
    engine = Engine.load(args.engine)
    ids = engine.prompt_ids(PROMPT)
    names = list(WAYS)
    runs = []
    for run in range(args.runs + 1):
        order = names[run % len(names):] + names[:run % len(names)]
        result = {}
        for name in order:
            settings, kwargs = WAYS[name]
            result[name] = decode(engine, ids, settings, args.new_tokens, kwargs)
        if run:  # (run 0 warms up)
            runs.append(result)
    summary = {}
    for name in names:
        ms = [r[name]["decode_ms_per_token"] for r in runs]
        ratio = [r[name]["decode_ms_per_token"] / r["plain"]["decode_ms_per_token"] for r in runs]
        summary[name] = {"decode_ms_per_token": statistics.median(ms), "ratio_to_plain": statistics.median(ratio),
                         "tokens": statistics.median(r[name]["tokens"] for r in runs),
                         "finish": runs[-1][name]["finish"], "text": runs[-1][name]["text"]}
        print(f"{name:22s} {summary[name]['decode_ms_per_token']:6.2f} ms/token  x{summary[name]['ratio_to_plain']:.2f} "
              f"of plain  ({summary[name]['tokens']:.0f} tokens, {summary[name]['finish']})")
    print(f"token byte table: {len(table)} tokens in {table_s * 1000:.0f} ms (once per process)")
    out = HERE / "results" / f"json_reply_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"engine": str(args.engine), "runs": args.runs, "new_tokens": args.new_tokens,
                               "load_before_after": [load_before, os.getloadavg()], "token_table_ms": table_s * 1000,
                               "vocab": len(table), "summary": summary, "per_run": runs}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
