"""Decode speed of a mixture of experts on the CPU engine, against a dense model that reads as many
weight bytes a token.

A random checkpoint of Granite 3.0 1B-A400M's shapes (awq_edge/synthetic.py SHAPES: 24 layers,
hidden 1024, 8 of 32 experts a token, each 512 wide) and a dense Llama of the same attention whose
MLP is as wide as the 8 chosen experts together (4096): per token both read the same weights,
but the mixture also picks its experts and reads them in 8 pieces. Both CPU engines, greedy, batch
1, ONNX Runtime's decode (the mixture: one QMoE node a layer) and the native C decode where it
runs. Prints tokens/s and the ratio, and writes JSON under benchmarks/results/.

    python benchmarks/cpu_experts.py [--layers 24] [--new-tokens 64]
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
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    moe = {**SHAPES["granite3-1b-a400m"], "num_hidden_layers": args.layers}
    active = moe["num_experts_per_tok"] * moe["intermediate_size"]
    dense = {k: v for k, v in moe.items() if k not in ("model_type", "architectures", "num_local_experts",
                                                          "num_experts_per_tok")}
    dense["intermediate_size"] = active
    results = bench_random_engines({"experts": moe, "dense": dense}, args.prompt_tokens, args.new_tokens, args.runs)
    base = results["dense/onnxruntime"]["decode_tok_s"]
    ratios = {k: v["decode_tok_s"] / base for k, v in results.items()}
    for key, ratio in ratios.items():
        print(f"{key:22} {ratio:5.2f}x dense onnxruntime's decode")
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": platform.processor() or platform.machine(),
              "shapes": {"experts": moe, "dense": dense}, "results": results, "ratio_to_dense_onnxruntime": ratios}
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"cpu_experts-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
