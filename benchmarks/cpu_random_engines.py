"""What benchmarks/cpu_experts.py and cpu_delta_net.py share: random checkpoints of given shapes built for the
CPU engine, each benched with ONNX Runtime's decode and with the native C decode (no main here)."""
from __future__ import annotations

import tempfile
from pathlib import Path


def bench_random_engines(shapes: dict[str, dict], prompt_tokens: int, new_tokens: int, runs: int,
                         max_context: int = 1024) -> dict[str, dict]:
    """{"name/onnxruntime" | "name/native": {decode_tok_s, prefill_tok_s, decode_path}} for each named shape
    (awq_edge/synthetic.py SHAPES' kind), greedy, batch 1, the median of `runs` (engine.bench_engine)."""
    from awq_edge.build import build_engine
    from awq_edge.engine import Engine, bench_engine
    from awq_edge.synthetic import byte_tokenizer, write_random_checkpoint

    results = {}
    with tempfile.TemporaryDirectory(prefix="awq-edge-bench-") as tmp:
        tokenizer = byte_tokenizer(Path(tmp) / "tokenizer")
        for name, shape in shapes.items():
            ckpt = write_random_checkpoint(Path(tmp) / f"{name}.ckpt", shape, 128, tokenizer)
            engine_dir = Path(tmp) / f"{name}.engine"
            build_engine(str(ckpt), "cpu", engine_dir, max_memory="8GiB", max_context=max_context, progress=False)
            for native in (False, True):
                engine = Engine.load(engine_dir, native_decode=native)
                stats = bench_engine(engine, prompt_tokens, new_tokens, runs)
                path = stats.get("decode_path", "onnxruntime" if not native else "native")
                results[f"{name}/{'native' if native else 'onnxruntime'}"] = {
                    "decode_tok_s": stats["decode_tok_s"], "prefill_tok_s": stats["prefill_tok_s"],
                    "decode_path": path}
                print(f"{name:10} {'native' if native else 'ort':6} decode {stats['decode_tok_s']:8.1f} tok/s  "
                      f"prefill {stats['prefill_tok_s']:8.1f} tok/s  ({path[:70]})")
                del engine
    return results
