#!/usr/bin/env python3
"""What quantizing a 7B model costs on this host, measured on the first blocks of one.

    python benchmarks/quantizer_7b_blocks.py [--shape llama2-7b] [--blocks 3] [--output FILE]

A 7B model cannot be quantized whole on a 2-core, 24 GB machine in a session. Its cost is per block,
though: the quantizer holds one block's float weights at a time (model.load_for_quantization) and
each block costs the same. So this writes a float model of the shape (awq_edge/synthetic.py SHAPES:
its widths, heads and vocabulary) with random weights and only --blocks decoder blocks. The weights
are fp16 safetensors, and the byte-level tokenizer stands in for the model's (the calibration
text's bytes are the tokens). It then runs the default `quantize` on it in this process (AWQ,
group 128, 64 x 512 calibration tokens of the built-in Wikipedia split).

A thread samples the RSS every 20 ms. Each block's start is stamped (with the RSS after
malloc_trim: live memory), so the script reports:
- per block: seconds and peak RSS;
- the RSS with the embeddings loaded;
- what each finished block leaves behind (its quantized levels);
- the checkpoint write's peak.

From these it extrapolates to the shape's full depth. Writes benchmarks/results/quantizer-7b-blocks-<shape>.json.
Linux only (/proc/self/statm).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent))
from quantizer_memory import RESULTS, rss_bytes  # noqa: E402  (this folder is on sys.path)

GIB = 1 << 30


def live_rss_bytes() -> int:
    """RSS after glibc hands freed memory back (malloc_trim), so that what a finished block
    leaves behind is not hidden under the pages its working set left cached in the allocator."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    return rss_bytes()


class RssSampler(threading.Thread):
    """Peak RSS since the last mark(), every 20 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_bytes(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.02)

    def mark(self) -> int:
        peak, self.peak = max(self.peak, rss_bytes()), rss_bytes()
        return peak


def write_float_model(folder: Path, shape: dict, blocks: int) -> Path:
    """A Llama model of `shape` with `blocks` decoder blocks: random fp16 weights (std 0.02, norms 1),
    one safetensors file per block, so writing it never holds more than one block."""
    import torch
    from safetensors.torch import save_file

    from awq_edge.synthetic import byte_tokenizer, llama_linears, random_checkpoint_config

    folder.mkdir(parents=True)
    config = {**random_checkpoint_config(shape), "num_hidden_layers": blocks, "torch_dtype": "float16"}
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    byte_tokenizer(folder)
    g = torch.Generator().manual_seed(0)
    hidden, vocab = shape["hidden_size"], shape["vocab_size"]

    def normal(*size):
        return (torch.randn(*size, generator=g) * 0.02).half()

    head = {"model.embed_tokens.weight": normal(vocab, hidden), "model.norm.weight": torch.ones(hidden).half()}
    if not shape["tie_word_embeddings"]:
        head["lm_head.weight"] = normal(vocab, hidden)
    save_file(head, str(folder / "model-head.safetensors"))
    for i in range(blocks):
        p = f"model.layers.{i}"
        tensors = {f"{p}.input_layernorm.weight": torch.ones(hidden).half(),
                   f"{p}.post_attention_layernorm.weight": torch.ones(hidden).half()}
        for name, n, k in llama_linears(shape):
            tensors[f"{p}.{name}.weight"] = normal(n, k)
        save_file(tensors, str(folder / f"model-{i:05d}.safetensors"))
    return folder


def main() -> int:
    from awq_edge.synthetic import SHAPES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the temp dirs are removed
    if args.blocks < 3:
        sys.exit("error: --blocks must be >= 3 (what a finished block leaves behind is measured from block 1 to 2)")

    from awq_edge import model as model_mod, quantize
    from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

    shape = SHAPES[args.shape]
    sampler = RssSampler()
    stamps = []  # (what, time, rss now, peak since the previous stamp): loaded, block 0, 1, ..., quantized
    load_inner, quantize_inner = model_mod.load_for_quantization, quantize.quantize_model

    def stamp(what) -> None:
        peak = sampler.mark()
        stamps.append((what, time.perf_counter(), live_rss_bytes(), peak))

    def load_for_quantization(model_dir):
        model, tokenizer, materialize = load_inner(model_dir)
        stamp("loaded")

        def stamped(i):
            stamp(i)
            materialize(i)
        return model, tokenizer, stamped

    def quantize_model(*a, **kw):
        result = quantize_inner(*a, **kw)
        stamp("quantized")
        return result

    with tempfile.TemporaryDirectory(prefix="awq-edge-7b-", dir=os.environ.get("TMPDIR")) as tmp:
        t0 = time.perf_counter()
        source = write_float_model(Path(tmp) / "float", shape, args.blocks)
        print(f"wrote a {args.blocks}-block {args.shape} float model in {time.perf_counter() - t0:.0f} s", flush=True)
        model_mod.load_for_quantization, quantize.quantize_model = load_for_quantization, quantize_model
        sampler.start()
        sampler.mark()
        start, start_rss = time.perf_counter(), rss_bytes()
        meta = quantize_checkpoint(str(source), Path(tmp) / "ckpt", QuantizeSettings(), progress=True)
        end = time.perf_counter()
        write_peak = sampler.mark()
        sampler.running = False
    model_mod.load_for_quantization, quantize.quantize_model = load_inner, quantize_inner

    blocks = [{"block": j, "seconds": round(stamps[j + 2][1] - stamps[j + 1][1], 1),
               "rss_at_start_bytes": stamps[j + 1][2], "peak_rss_bytes": stamps[j + 2][3]}
              for j in range(args.blocks)]
    # what a finished block leaves behind: the live RSS from one block's start to the next's, after
    # block 1 (block 0's start lacks some one-off allocations its run makes)
    growth = [b["rss_at_start_bytes"] - a["rss_at_start_bytes"] for a, b in zip(blocks[1:], blocks[2:])]
    kept_per_block = sum(growth) / len(growth)
    layers = shape["num_hidden_layers"]
    steady = blocks[1:]  # block 0 also pays one-off costs (thread pools, first allocations)
    block_seconds = sum(b["seconds"] for b in steady) / len(steady)
    block_peak_over_start = max(b["peak_rss_bytes"] - b["rss_at_start_bytes"] for b in blocks)
    full_quantize_peak = blocks[0]["rss_at_start_bytes"] + (layers - 1) * kept_per_block + block_peak_over_start
    result = {
        "benchmark": "quantizer_7b_blocks", "shape": args.shape, "shape_config": shape, "blocks_run": args.blocks,
        "settings": meta["settings"], "calibration_tokens": meta["calibration"]["tokens"],
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": os.getloadavg()},  # > cpus: other processes shared the cores
        "rss_before_load_bytes": start_rss, "rss_loaded_bytes": stamps[0][2], "load_peak_rss_bytes": stamps[0][3],
        "capture_seconds": round(stamps[1][1] - stamps[0][1], 1), "capture_peak_rss_bytes": stamps[1][3],
        "blocks": blocks, "kept_per_block_bytes": int(kept_per_block),
        "write_peak_rss_bytes": write_peak, "total_seconds": round(end - start, 1),
        "extrapolated": {"layers": layers, "seconds_per_block": round(block_seconds, 1),
                         "quantize_seconds": round(layers * block_seconds),
                         "quantize_peak_rss_bytes": int(full_quantize_peak),
                         "note": "RSS with the embeddings loaded + (layers - 1) finished blocks' kept levels + the "
                                 "largest block working set; the checkpoint write is measured at this depth only"},
    }
    print(f"{args.shape}: {args.blocks} blocks, {block_seconds:.0f} s per block after the first; loaded {stamps[0][2] / GIB:.2f} GiB, "
          f"block peak +{block_peak_over_start / GIB:.2f} GiB over its start, each finished block keeps "
          f"{kept_per_block / GIB:.3f} GiB; write peak {write_peak / GIB:.2f} GiB")
    print(f"extrapolated to {layers} blocks: {layers * block_seconds / 3600:.1f} h, quantize peak RSS "
          f"{full_quantize_peak / GIB:.1f} GiB (before the checkpoint write)")
    out = args.output or RESULTS / f"quantizer-7b-blocks-{args.shape}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
