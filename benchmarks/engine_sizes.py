#!/usr/bin/env python3
"""What a cuda engine of each family-table model holds, from its shape alone (no weights).

    python benchmarks/engine_sizes.py [--group-size 128]

For each model shape below (the published configs' sizes): the weight bytes decoder.tensor_layout
gives (int4 body, int8 head, the embedding as decoder.embed_table says: a tied model's is the int8
head's own table, an untied one's int8 rows), what the same engine held with the embedding in
fp16 (2 bytes a value, as before session 37), the RoPE tables, and KV bytes per token. Arithmetic
on the layout, not a measurement. Writes benchmarks/results/engine_sizes-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))

SHAPES = {
    "SmolLM2-135M": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       tie_word_embeddings=True, max_position_embeddings=40960),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072),
    "Gemma-3-1B": dict(model_type="gemma3_text", hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
                       sliding_window=512, max_position_embeddings=32768),
    "Gemma-3-4B": dict(model_type="gemma3_text", hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=262208,
                       sliding_window=1024, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "Gemma-2-2B": dict(model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000),
    # LongRoPE's factors change no size: ones here
    "Phi-3.5-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064, sliding_window=262144,
                         max_position_embeddings=131072, original_max_position_embeddings=4096,
                         rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}),
    "Phi-4-mini": dict(model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                       num_attention_heads=24, num_key_value_heads=8, vocab_size=200064, tie_word_embeddings=True,
                       partial_rotary_factor=0.75, sliding_window=262144, max_position_embeddings=131072,
                       original_max_position_embeddings=4096,
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [1.0] * 48}),
    "Qwen2.5-7B": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768),
    "Llama-3.1-8B": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072),
    "Qwen3-8B": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960),
}


def main() -> None:
    import numpy as np

    from awq_edge.decoder import decoder_spec, tensor_layout
    from awq_edge.export.spec import model_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--group-size", type=int, default=128)
    args = ap.parse_args()
    rows = {}
    for name, config in SHAPES.items():
        spec = decoder_spec(model_spec(config), args.group_size)
        sizes = {n: np.dtype(d).itemsize * int(np.prod(s)) for n, (d, s) in tensor_layout(spec).items()}
        weights = sum(sizes.values())
        embedding = sum(v for n, v in sizes.items() if n.startswith("model.embed_tokens"))
        fp16_embedding = weights - embedding + 2 * spec.vocab * spec.hidden
        rows[name] = {"weight_bytes": weights, "with_fp16_embedding": fp16_embedding,
                      "rope_bytes": sum(v for n, v in sizes.items() if n.startswith("rope.")),
                      "kv_bytes_per_token": spec.kv_bytes_per_token, "tied": spec.tie_embeddings}
        print(f"{name:14s} {weights / 2**30:6.2f} GiB (with an fp16 embedding {fp16_embedding / 2**30:5.2f}), "
              f"RoPE tables {rows[name]['rope_bytes'] / 2**20:4.0f} MiB, KV {spec.kv_bytes_per_token // 1024} KiB/token")
    out = ROOT / "benchmarks" / "results" / f"engine_sizes-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({"command": " ".join(sys.argv), "group_size": args.group_size, "engines": rows},
                              indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
