"""How far the native C decode's logits sit from ONNX Runtime's, per family: the margin behind the
bound of tests/test_cpu_native.py::test_native_decode_matches_onnxruntime_for_every_family.

For each family that test runs, the same tiny random checkpoint (tests/test_export_helpers.py
tiny_checkpoint, hidden 128, head 64), exported for the ort target, prefilled with 12 tokens and
then fed 32 more one at a time, teacher-forced: each step's relative logit error
||native - ort|| / ||ort|| (the native step keeps a bf16 copy of the cache and int8 activations, so
it is not bit-exact). Prints the largest error per family (and the next largest: a mixture of
experts may route a near tie the other way on one step) and writes JSON under benchmarks/results/.

    python benchmarks/native_decode_families.py [--families llama gpt_neox ...]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test's own helpers: the same checkpoints, the same loop


def main() -> None:
    from awq_edge.export import export_checkpoint
    from awq_edge.model import resolve_source
    from native_helpers import teacher_forced
    from test_cpu_native import FAMILIES, native_and_onnxruntime, tiny_family_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args()
    errors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for model_type in args.families:
            root = Path(tmp) / model_type
            ckpt = tiny_family_checkpoint(root, model_type, resolve_source("smollm2"))
            native, reference = native_and_onnxruntime(export_checkpoint(ckpt, root / "ort", "ort"), 64)
            ids = np.random.default_rng(1).integers(0, 256, 12 + 32).tolist()
            steps, disagreements = teacher_forced(native, reference, ids, 12)
            # (a mixture of experts: one step may route a near tie the other way; the test lets one off)
            errors[model_type] = {"max_rel_error": max(steps), "second_largest": sorted(steps)[-2],
                                  "disagreements": disagreements}
            print(f"{model_type:18} max relative logit error {max(steps):.4f} (next {sorted(steps)[-2]:.4f})  "
                  f"argmax disagreements {disagreements}")
    result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "families": errors,
              "largest": max(e["max_rel_error"] for e in errors.values())}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"native_decode_families-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"largest {result['largest']:.4f}; wrote {path}")


if __name__ == "__main__":
    main()
