"""Decode and prefill speed of the layers that keep a recurrent state (Qwen3.5's gated delta nets, Granite 4.0-H's
Mamba-2 mixers) on the CPU engine, against a model of the same shape whose every layer is attention.

A random checkpoint of Qwen3.5 0.8B's shapes (awq_edge/synthetic.py SHAPES: 24 layers, hidden 1024, 18 gated
delta nets and 6 attention layers), or with --shape granite-4.0-h-micro Granite 4.0-H micro's (40 layers, hidden
2048, 36 Mamba-2 mixers and 4 attention layers), and its attention-only twin: the same embedding, head, MLPs and
attention layers, the model whose layer_types name every layer attention. Both CPU engines, greedy, batch 1, ONNX
Runtime's decode (the recurrence: an ONNX Scan) and the native C decode (decode_step.c's delta_conv and
delta_rule or mamba_rule ops). Prints tokens/s and the ratios to the twin's, and writes JSON under
benchmarks/results/.

    python benchmarks/cpu_delta_net.py [--shape qwen3.5-0.8b] [--layers N] [--prompt-tokens 256] [--new-tokens 64]
                                       [--max-context 4096]
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
    parser.add_argument("--shape", default="qwen3.5-0.8b", choices=("qwen3.5-0.8b", "granite-4.0-h-micro"))
    parser.add_argument("--layers", type=int, default=None, help="the first N layers (default: the shape's all)")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    layers = args.layers or shape["num_hidden_layers"]
    hybrid = {**shape, "num_hidden_layers": layers}
    mamba = shape["model_type"] == "granitemoehybrid"
    if mamba:  # (Granite's layer_types list every layer)
        hybrid["layer_types"] = shape["layer_types"][:layers]
    name = "mamba" if mamba else "delta_nets"
    twin = {**hybrid, "layer_types": ["attention" if mamba else "full_attention"] * layers}
    results = bench_random_engines({name: hybrid, "attention": twin}, args.prompt_tokens, args.new_tokens,
                                   args.runs, args.max_context)
    ratios = {key: {kind: value[kind] / results[key.replace(name, "attention")][kind]
                    for kind in ("decode_tok_s", "prefill_tok_s")}
              for key, value in results.items() if key.startswith(name)}
    for key, ratio in ratios.items():
        print(f"{key:22} decode {ratio['decode_tok_s']:5.2f}x, prefill {ratio['prefill_tok_s']:5.2f}x the "
              "attention-only twin's")
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.processor() or platform.machine(),
              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "shapes": {name: hybrid, "attention": twin}, "results": results,
              "ratio_to_the_attention_twin": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cpu_delta_net-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
