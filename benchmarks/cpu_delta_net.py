"""Decode and prefill speed of Qwen3.5's gated delta nets on the CPU engine, against a model of the same shape
whose every layer is attention.

A random checkpoint of Qwen3.5 0.8B's shapes (awq_edge/synthetic.py SHAPES: 24 layers, hidden 1024, 18 gated
delta nets and 6 attention layers) and its attention-only twin: the same embedding, head, MLPs and attention
layers, a Qwen3.5 whose layer_types name every layer full_attention (its q_proj's output gate, q/k norms, partial
RoPE). Both CPU engines, greedy, batch 1, ONNX Runtime's decode (a delta net's recurrence: an ONNX Scan) and the
native C decode (decode_step.c's delta_conv and delta_rule ops). Prints tokens/s and the ratios to the twin's,
and writes JSON under benchmarks/results/.

    python benchmarks/cpu_delta_net.py [--layers 24] [--prompt-tokens 256] [--new-tokens 64] [--max-context 4096]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    from awq_edge.synthetic import SHAPES
    from cpu_random_engines import bench_random_engines

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    hybrid = {**SHAPES["qwen3.5-0.8b"], "num_hidden_layers": args.layers}
    twin = {**hybrid, "layer_types": ["full_attention"] * args.layers}
    results = bench_random_engines({"delta_nets": hybrid, "attention": twin}, args.prompt_tokens, args.new_tokens,
                                   args.runs, args.max_context)
    ratios = {key: {kind: value[kind] / results[key.replace("delta_nets", "attention")][kind]
                    for kind in ("decode_tok_s", "prefill_tok_s")}
              for key, value in results.items() if key.startswith("delta_nets")}
    for key, ratio in ratios.items():
        print(f"{key:22} decode {ratio['decode_tok_s']:5.2f}x, prefill {ratio['prefill_tok_s']:5.2f}x the "
              "attention-only twin's")
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.processor() or platform.machine(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "shapes": {"delta_nets": hybrid, "attention": twin}, "results": results,
              "ratio_to_the_attention_twin": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cpu_delta_net-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
