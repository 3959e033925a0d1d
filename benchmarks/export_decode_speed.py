"""Graph-level decode speed: our exported `ort` graph (through OrtBackend) vs onnxruntime-genai int4.

    python benchmarks/export_decode_speed.py                      # SmolLM2, RTN g128, all variants
    python benchmarks/export_decode_speed.py --checkpoint CKPT --float-dir HF_DIR --reps 5

Used to choose the ops and defaults of `export --target ort` (docs/export.md). The runtime
engineer's benchmarks/cpu_engine.py is the full end-to-end CPU benchmark; this one only times
graphs: greedy decode of --new-tokens tokens after a --prompt-tokens prefill, batch 1,
EOS ignored. Runners alternate within every repetition (a slow spell of the shared machine
hits them all); the first repetition is a warm-up and is not counted; medians are reported.

Variants of our graph (exported from the same checkpoint into a temp dir):
  default            lm_head int4 (block 32) + exact re-scoring of the top 64 at runtime,
                     MatMulNBits accuracy_level 4 (int8 compute)
  lm_head-int8       lm_head int8 (block 32) + exact re-scoring, accuracy_level 4
  lm_head-int8-raw   lm_head int8, no re-scoring (the default before int4 + re-scoring)
  lm_head-int4-raw   lm_head int4, no re-scoring (onnxruntime-genai's head as it is)
  exact              float lm_head, accuracy_level 0 (what the correctness tests use)
onnxruntime-genai: its builder's int4 CPU model of the float model (-p int4 -e cpu).
Output: a table on stdout and JSON in benchmarks/results/export_decode_speed-<time>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
VARIANTS = {
    "default": {},
    "lm_head-int8": {"lm_head_bits": 8},
    "lm_head-int8-raw": {"lm_head_bits": 8, "rescore_top_k": 0},
    "lm_head-int4-raw": {"lm_head_bits": 4, "rescore_top_k": 0},
    "exact": {"lm_head_bits": None, "accuracy_level": 0},
}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class Ours:
    def __init__(self, export_dir: Path, threads: int | None, max_context: int):
        from awq_edge.backend_ort import OrtBackend

        self.backend = OrtBackend(export_dir, max_context=max_context, threads=threads)

    def run(self, ids: list[int], new_tokens: int) -> dict:
        b = self.backend
        b.rewind(0)
        t0 = time.perf_counter()
        token = int(np.argmax(b.forward(ids)))
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = int(np.argmax(b.forward([token])))
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_tok_s": (new_tokens - 1) / (t2 - t1)}


class Genai:
    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(og.Config(str(model_dir)))

    def run(self, ids: list[int], new_tokens: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))  # prefill; picks the first token
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            gen.generate_next_token()
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_tok_s": (new_tokens - 1) / (t2 - t1)}


def build_genai(float_dir: Path, out: Path) -> Path:
    if (out / "genai_config.json").exists():
        return out
    cache = out.with_name(out.name + "-cache")
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(float_dir),
                    "-o", str(out), "-p", "int4", "-e", "cpu", "-c", str(cache)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, help="AWQ checkpoint (default: SmolLM2 RTN g128, made once)")
    ap.add_argument("--float-dir", type=Path, help="float HF dir for onnxruntime-genai (default: SmolLM2)")
    ap.add_argument("--work", type=Path, default=HERE / "results" / "tmp" / "export_decode_speed")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions (plus one warm-up)")
    ap.add_argument("--threads", type=int, default=None, help="our intra-op threads (default: physical cores)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    args = ap.parse_args()

    from awq_edge.export import export_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    float_dir = args.float_dir
    if float_dir is None:
        from awq_edge.model import resolve_source

        float_dir = Path(resolve_source("smollm2"))
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = args.work / "smollm2-rtn-g128"
        if not (ckpt / "config.json").exists():
            from awq_edge.quantize import QuantizeSettings, quantize_checkpoint

            quantize_checkpoint(str(float_dir), ckpt, QuantizeSettings(method="rtn", group_size=128), progress=False)

    runners = {}
    max_context = args.prompt_tokens + args.new_tokens
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        for name in args.variants.split(","):
            out = export_checkpoint(ckpt, Path(tmp) / name, "ort", **VARIANTS[name])
            runners[f"ours:{name}"] = Ours(out, args.threads, max_context)
        runners["onnxruntime-genai int4"] = Genai(build_genai(float_dir, args.work / "genai-int4"))

        rng = np.random.default_rng(0)
        ids = rng.integers(100, 10000, args.prompt_tokens).tolist()
        results: dict[str, list[dict]] = {name: [] for name in runners}
        for rep in range(args.reps + 1):
            for name, runner in runners.items():
                r = runner.run(ids, args.new_tokens)
                if rep:  # repetition 0 is the warm-up
                    results[name].append(r)
                print(f"rep {rep} {name:28} decode {r['decode_tok_s']:7.1f} tok/s", file=sys.stderr, flush=True)

    genai_name = "onnxruntime-genai int4"
    summary = {}
    for name, rs in results.items():
        summary[name] = {"decode_tok_s": statistics.median(r["decode_tok_s"] for r in rs),
                         "decode_tok_s_all": [round(r["decode_tok_s"], 2) for r in rs],
                         "prefill_ms": 1e3 * statistics.median(r["prefill_s"] for r in rs)}
    ref = summary[genai_name]["decode_tok_s"]
    print(f"{'graph':30} {'decode tok/s':>13} {'vs genai':>9} {'prefill ms':>11}")
    for name, s in summary.items():
        s["vs_genai"] = s["decode_tok_s"] / ref
        print(f"{name:30} {s['decode_tok_s']:13.1f} {s['vs_genai']:8.2f}x {s['prefill_ms']:11.1f}")
    import onnxruntime

    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "cpu": cpu_name(), "threads": args.threads,
        "onnxruntime": onnxruntime.__version__, "checkpoint": str(ckpt), "float_dir": str(float_dir),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "reps": args.reps,
        "command": " ".join(sys.argv), "results": summary,
    }
    out = HERE / "results" / f"export_decode_speed-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
