"""Two CPU engine folders side by side in one process: prefill and ONNX Runtime decode, alternating run by run, so
that this machine's noise falls on both alike (the same model built from two versions of the code, say).

Each run rewinds to 0, prefills a random prompt and times it, then decodes --new-tokens one token at a time (a
fixed token fed back: the time of a step, not of sampling). Prints the medians and every run, and writes JSON
under benchmarks/results/.

    python benchmarks/ab_engines.py ENGINE_A ENGINE_B [--prompt-tokens 256] [--new-tokens 40] [--runs 4]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def main() -> None:
    from awq_edge.backend_ort import OrtBackend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engines", nargs=2, type=Path)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    context = args.prompt_tokens + args.new_tokens
    backends = {str(path): OrtBackend(path, max_context=context) for path in args.engines}
    prompt = np.random.default_rng(0).integers(0, min(b.vocab_size for b in backends.values()), args.prompt_tokens)
    runs = {name: {"prefill_tok_s": [], "decode_ms_per_token": []} for name in backends}
    for _ in range(args.runs):
        for name, backend in backends.items():
            backend.rewind(0)
            start = time.perf_counter()
            backend.forward(prompt.tolist())
            runs[name]["prefill_tok_s"].append(args.prompt_tokens / (time.perf_counter() - start))
            start = time.perf_counter()
            for _ in range(args.new_tokens):
                backend.forward([int(prompt[0])])
            runs[name]["decode_ms_per_token"].append((time.perf_counter() - start) / args.new_tokens * 1000)
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.machine(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "engines": {}}
    for name, r in runs.items():
        medians = {key: float(np.median(values)) for key, values in r.items()}
        result["engines"][name] = {"median": medians, "runs": r}
        print(f"{name}: prefill {medians['prefill_tok_s']:.1f} tok/s, decode {medians['decode_ms_per_token']:.2f} "
              f"ms/token (runs {', '.join(f'{v:.1f}' for v in r['decode_ms_per_token'])})")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ab_engines-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
