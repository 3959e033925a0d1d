"""llm-compressor's AWQ or GPTQ (W4A16 asymmetric) on given calibration tokens; saves a compressed-tensors checkpoint.

    $AWQ_EDGE_CACHE/peers/llmcompressor-venv/bin/python benchmarks/llmcompressor_worker.py \
        --model HF_DIR --tokens calib.npy --method awq|gptq --group-size G --output DIR

Run by benchmarks/quantizer_peers.py with llm-compressor's own venv (it pins transformers and
compressed-tensors versions of its own); imports nothing from awq_edge. The tokens are an int64
[n, seqlen] .npy of input_ids, used exactly as given (attention_mask all ones, no shuffling):
num_calibration_samples = n, max_seq_length = seqlen. The scheme is the preset W4A16_ASYM
(int4, asymmetric, group strategy) at group size G on every Linear but lm_head; each modifier keeps
its defaults otherwise (AWQ: duo_scaling, n_grid 20; GPTQ: block 128, dampening 0.01, actorder
static). The model is saved with save_compressed=True (pack-quantized) and its tokenizer.
A group size that does not divide every linear's inputs is refused in one line before loading
llm-compressor's pipeline (compressed-tensors has no short last group; llm-compressor refuses too).
Prints one JSON line: versions, the scheme, oneshot and save seconds, the process's peak RSS.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import resource
import sys
import time

import numpy as np
import torch

# llm-compressor pins the cached activations (IntermediatesCache.pin_memory, called by AWQ's
# scale search) for faster host-to-device copies; pin_memory needs an accelerator and raises on a
# CPU-only host. Pinning changes no values, so on CPU the tensor itself stands in for its pinned copy.
if not torch.accelerator.is_available():
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self


def scheme(group_size: int):
    from compressed_tensors.quantization import preset_name_to_scheme

    preset = preset_name_to_scheme("W4A16_ASYM", ["Linear"])
    weights = preset.weights.model_copy(update={"group_size": group_size})
    return preset.model_copy(update={"weights": weights})


def recipe(method: str, group_size: int):
    groups = {"group_0": scheme(group_size)}
    if method == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(), QuantizationModifier(config_groups=groups, ignore=["lm_head"])]
    from llmcompressor.modifiers.gptq import GPTQModifier

    return [GPTQModifier(config_groups=groups, ignore=["lm_head"])]


def check_group_fits(model, group_size: int) -> None:
    """compressed-tensors has no short last group: llm-compressor refuses (in a long message) any
    linear whose inputs are not a multiple of the group size; say so in one line."""
    short = {n: m.in_features for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head") and m.in_features % group_size}
    if short:
        widths = sorted(set(short.values()))
        sys.exit(f"error: llm-compressor refuses group size {group_size}: {len(short)} linears have inputs "
                 f"({', '.join(map(str, widths))}) not a multiple of it, e.g. {next(iter(short))}; "
                 "compressed-tensors has no short last group")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="float Hugging Face model directory")
    ap.add_argument("--tokens", required=True, help="int64 [n, seqlen] .npy of calibration input_ids")
    ap.add_argument("--method", choices=("awq", "gptq"), required=True)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--output", required=True)
    args = ap.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = np.load(args.tokens).astype(np.int64)
    n, seqlen = ids.shape
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    check_group_fits(model, args.group_size)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    steps = recipe(args.method, args.group_size)
    started = time.time()
    model = oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=steps, num_calibration_samples=n,
                    max_seq_length=seqlen, shuffle_calibration_samples=False)
    oneshot_s = time.time() - started
    started = time.time()
    model.save_pretrained(args.output, save_compressed=True)
    tokenizer.save_pretrained(args.output)
    save_s = time.time() - started
    fmt = json.load(open(f"{args.output}/config.json"))["quantization_config"].get("format")
    print(json.dumps({
        "method": args.method, "group_size": args.group_size, "calib_shape": [int(n), int(seqlen)],
        "scheme": "W4A16_ASYM", "format": fmt, "recipe": [type(m).__name__ for m in steps],
        "oneshot_s": round(oneshot_s, 1), "save_s": round(save_s, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "versions": {p: importlib.metadata.version(p) for p in ("llmcompressor", "compressed-tensors", "torch",
                                                                "transformers")}}))


if __name__ == "__main__":
    main()
