"""CPU decode benchmark: our ONNX Runtime engine vs transformers fp32 eager vs onnxruntime-genai int4
vs llama.cpp, in one run, on the same model (SmolLM2-135M-Instruct) and the same prompt ids.

    python benchmarks/cpu_engine.py --engine smollm2.engine           # an engine you built
    python benchmarks/cpu_engine.py                                    # builds `awq-edge build smollm2` once (cached)

Every runner is greedy, batch 1, and decodes exactly --new-tokens tokens (EOS ignored) after
prefilling the same --prompt-tokens ids. Each measurement runs in its own fresh process (so
one runtime's idle spinning threads cannot slow another: ORT spins its workers), which loads
the model, does one untimed warm-up and --repeats timed runs, and reports their median (one
burst of another tenant on a shared machine then moves no measurement). Runners alternate
(run 1 of each, then run 2 of each in reverse order, ...) so a slow spell of the shared machine
hits them all; medians are reported. Results: benchmarks/results/cpu_engine-<time>.json and a table.

onnxruntime-genai's model is made by its own builder from the float model
(python -m onnxruntime_genai.models.builder -i <float dir> -o <dir> -p int4 -e cpu) and
cached under the awq-edge cache dir. llama.cpp runs on the GGUF the float model came from,
via llama-cpp-python or a `llama-bench` binary, when one is installed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROMPT = ("The history of computing is a story of machines that got smaller, cheaper and faster, and of "
          "people who found new things to do with them every time. ")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------- runners
# Each runner: setup() once, then run(ids, new_tokens) -> {"ttft_s", "prefill_tok_s", "decode_tok_s"}.

class OurEngine:
    name = "awq-edge (ORT CPU, int4)"

    def __init__(self, engine_dir: Path, threads: int | None, native_decode: bool | None = None):
        from awq_edge.engine import Engine

        self.engine = Engine.load(engine_dir, threads=threads, native_decode=native_decode)
        lm_head = json.loads((Path(engine_dir) / "export.json").read_text()).get("lm_head", "?")
        path = self.engine.backend.decode_path
        decoder = "native decode" if path.startswith("native") else "ORT decode"
        self.name = f"awq-edge {Path(engine_dir).name} ({lm_head} lm_head, {decoder})"
        if native_decode is None and not path.startswith("native"):
            print(f"note: {path}", file=sys.stderr)

    def run(self, ids, new_tokens):
        from awq_edge.sampling import Sampler, SamplingSettings

        self.engine.reset()
        for _ in self.engine.stream_ids(ids, Sampler(SamplingSettings(temperature=0)), new_tokens, ignore_eos=True):
            pass
        s = self.engine.last_stats
        return {"ttft_s": s.ttft_s, "prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s}


class TransformersEager:
    name = "transformers fp32 eager"

    def __init__(self, float_dir: Path, threads: int | None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.float32,
                                                          attn_implementation="eager").eval()

    def run(self, ids, new_tokens):
        torch = self.torch
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model(torch.tensor([ids]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
            t_first = time.perf_counter()
            past = out.past_key_values
            for _ in range(new_tokens - 1):
                out = self.model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
                past, token = out.past_key_values, int(out.logits[0, -1].argmax())
            t_end = time.perf_counter()
        return {"ttft_s": t_first - t0, "prefill_tok_s": len(ids) / (t_first - t0),
                "decode_tok_s": (new_tokens - 1) / (t_end - t_first)}


def ortgenai_model_dir(float_dir: Path) -> Path:
    """onnxruntime-genai's own int4 CPU build of the float model, made once and cached."""
    from awq_edge.data import cache_dir

    out = cache_dir() / "bench" / f"ortgenai-int4-cpu-{float_dir.name}"
    if (out / "genai_config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"building the onnxruntime-genai int4 model into {out} (once) ...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(float_dir), "-o", str(tmp),
                    "-p", "int4", "-e", "cpu", "-c", str(tmp.with_name(tmp.name + "-cache"))],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(tmp.with_name(tmp.name + "-cache"), ignore_errors=True)
    tmp.rename(out)
    return out


class OrtGenai:
    name = "onnxruntime-genai int4"

    def __init__(self, model_dir: Path, threads: int):
        import tempfile

        import onnxruntime_genai as og

        self.og = og
        # The same thread count as every other runner: genai reads it from genai_config.json's session
        # options, so load a view of the model dir (links) whose config says so.
        self.view = Path(tempfile.mkdtemp(prefix="ortgenai-threads-"))
        for f in model_dir.iterdir():
            (self.view / f.name).symlink_to(f.resolve())
        config = json.loads((model_dir / "genai_config.json").read_text())
        options = config["model"]["decoder"].setdefault("session_options", {})
        options.update(intra_op_num_threads=threads, inter_op_num_threads=1)
        (self.view / "genai_config.json").unlink()
        (self.view / "genai_config.json").write_text(json.dumps(config, indent=2))
        self.model = og.Model(og.Config(str(self.view)))

    def __del__(self):
        shutil.rmtree(getattr(self, "view", ""), ignore_errors=True)

    def run(self, ids, new_tokens):
        og = self.og
        params = og.GeneratorParams(self.model)
        total = len(ids) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)  # min_length: no early EOS
        gen = og.Generator(self.model, params)
        t0 = time.perf_counter()
        gen.append_tokens(np.asarray(ids, dtype=np.int32))  # prefill, and the first token is chosen
        t_first = time.perf_counter()
        n = 1
        while n < new_tokens and not gen.is_done():
            gen.generate_next_token()
            n += 1
        t_end = time.perf_counter()
        return {"ttft_s": t_first - t0, "prefill_tok_s": len(ids) / (t_first - t0),
                "decode_tok_s": (n - 1) / (t_end - t_first)}


class LlamaCppPython:
    name = "llama.cpp (llama-cpp-python)"

    def __init__(self, gguf: Path, threads: int | None, n_ctx: int):
        from llama_cpp import Llama

        self.llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(self, ids, new_tokens):
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t_first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t_end = time.perf_counter()
        return {"ttft_s": t_first - t0, "prefill_tok_s": len(ids) / (t_first - t0),
                "decode_tok_s": (new_tokens - 1) / (t_end - t_first)}


class LlamaBench:
    name = "llama.cpp (llama-bench)"

    def __init__(self, binary: str, gguf: Path, threads: int | None):
        self.cmd = [binary, "-m", str(gguf), "-t", str(threads), "-r", "1", "-o", "json"]

    def run(self, ids, new_tokens):
        out = subprocess.run(self.cmd + ["-p", str(len(ids)), "-n", str(new_tokens)], capture_output=True,
                             text=True, check=True).stdout
        rows = json.loads(out)
        prefill = next(r for r in rows if r.get("n_prompt", 0) > 0)["avg_ts"]
        decode = next(r for r in rows if r.get("n_gen", 0) > 0)["avg_ts"]
        return {"ttft_s": len(ids) / prefill, "prefill_tok_s": prefill, "decode_tok_s": decode}


# ---------------------------------------------------------------- main

def default_engine() -> Path:
    """`awq-edge build smollm2` (default AWQ settings: minutes on 2 cores), made once and cached."""
    from awq_edge.build import build_engine
    from awq_edge.data import cache_dir

    out = cache_dir() / "bench" / "smollm2-awq.engine"
    if not (out / "manifest.json").exists():
        print(f"building {out} with default AWQ settings (once; several minutes) ...", file=sys.stderr)
        build_engine("smollm2", "cpu", out, force=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", type=Path, action="append",
                    help="our engine dir; repeat to compare several (default: build smollm2 once, cached)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="fresh processes per runner, alternating")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per process; their median is the run's")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads for every runner, the same for all (default: this machine's physical cores)")
    ap.add_argument("--ort-decode", action="store_true",
                    help="also run each engine with ONNX Runtime decoding (--no-native-decode; runner ours-ort) "
                         "beside the default (native decode where it runs)")
    ap.add_argument("--skip", action="append", default=[], help="runner to leave out: ours, hf, ortgenai, llamacpp")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measurement of one runner
    args = ap.parse_args()
    if args.threads is None:
        from awq_edge.backend_ort import physical_cores

        args.threads = physical_cores()  # our engine's own default, pinned for every runner alike

    from awq_edge import data
    from awq_edge.model import resolve_source
    from awq_edge.tokenizer import Tokenizer

    float_dir = resolve_source("smollm2")
    engine_dirs = args.engine or [default_engine()]
    tok = Tokenizer(float_dir)
    base = tok.encode(PROMPT)
    ids = (base * (args.prompt_tokens // len(base) + 1))[:args.prompt_tokens]

    skipped = {}
    makers = {("ours" if i == 0 else f"ours{i + 1}"): (lambda e=e: OurEngine(e, args.threads))
              for i, e in enumerate(engine_dirs)}
    if args.ort_decode:
        makers.update({("ours-ort" if i == 0 else f"ours{i + 1}-ort"): (lambda e=e: OurEngine(e, args.threads, False))
                       for i, e in enumerate(engine_dirs)})
    makers.update({
        "hf": lambda: TransformersEager(float_dir, args.threads),
        "ortgenai": lambda: OrtGenai(ortgenai_model_dir(float_dir), args.threads),
    })
    try:
        import llama_cpp  # noqa: F401
        makers["llamacpp"] = lambda: LlamaCppPython(data.smollm2_gguf(), args.threads,
                                                    args.prompt_tokens + args.new_tokens + 8)
    except ImportError:
        binary = shutil.which("llama-bench")
        if binary:
            makers["llamacpp"] = lambda: LlamaBench(binary, data.smollm2_gguf(), args.threads)
        else:
            skipped["llama.cpp"] = "not installed (pip install llama-cpp-python, or put llama-bench on PATH)"
    if args.worker:  # a child process: load, warm up, measure --repeats times, print one JSON line
        runner = makers[args.worker]()
        runner.run(ids, min(8, args.new_tokens))  # warm-up (graph optimisation, allocator, caches)
        timed = [runner.run(ids, args.new_tokens) for _ in range(max(1, args.repeats))]
        print("RESULT " + json.dumps({"name": runner.name,
                                      **{m: statistics.median(t[m] for t in timed) for m in timed[0]}}))
        return
    if "ortgenai" in makers and "ortgenai" not in args.skip:
        ortgenai_model_dir(float_dir)  # build it once here, not inside a timed child
    names, runs = {}, {}
    for key in makers:
        if key in args.skip:
            skipped[key] = "skipped (--skip)"
        else:
            runs[key] = []
    child = [sys.executable, str(Path(__file__).resolve()), *[a for e in engine_dirs for a in ("--engine", str(e))],
             "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
             "--threads", str(args.threads), "--repeats", str(args.repeats)] + (["--ort-decode"] if args.ort_decode else [])
    for i in range(args.runs):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # alternate, and flip the order
        for key in order:
            if key in skipped:
                continue
            done = subprocess.run(child + ["--worker", key], capture_output=True, text=True)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:  # a runner that cannot run is reported, the others go on
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                skipped[key] = f"failed: {tail[:200]}"
                continue
            result = json.loads(line[len("RESULT "):])
            names[key] = result.pop("name")
            runs[key].append(result)
            print(f"run {i + 1} {names[key]:32} decode {result['decode_tok_s']:7.1f} tok/s", file=sys.stderr)
    runs = {k: v for k, v in runs.items() if v and k not in skipped}

    medians = {k: {m: statistics.median(r[m] for r in v) for m in ("ttft_s", "prefill_tok_s", "decode_tok_s")}
               for k, v in runs.items()}
    for peer in ("ortgenai", "llamacpp"):
        ref = medians.get(peer, {}).get("decode_tok_s")
        for m in medians.values():
            m[f"decode_vs_{peer}"] = m["decode_tok_s"] / ref if ref else None
    result = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform()},
        "model": "SmolLM2-135M-Instruct", "engines": [str(e) for e in engine_dirs],
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
        "repeats_per_run": args.repeats, "load_average_at_end": os.getloadavg(),
        "threads": args.threads,
        "runners": {k: {"name": names[k], "median": medians[k], "runs": runs[k]} for k in runs},
        "not_run": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"cpu_engine-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\nSmolLM2-135M, prompt {args.prompt_tokens} tokens, {args.new_tokens} new, greedy, "
          f"median of {args.runs} ({cpu_name()}, {os.cpu_count()} CPUs)")
    print(f"{'runtime':34} {'TTFT ms':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'vs ort-genai':>13} "
          f"{'vs llama.cpp':>13}")
    for k, m in medians.items():
        ratios = [f"{m[r]:.2f}x" if m[r] else "-" for r in ("decode_vs_ortgenai", "decode_vs_llamacpp")]
        print(f"{names[k]:34} {m['ttft_s'] * 1000:8.1f} {m['prefill_tok_s']:14.1f} {m['decode_tok_s']:13.1f} "
              f"{ratios[0]:>13} {ratios[1]:>13}")
    for k, why in skipped.items():
        print(f"{k:34} {why}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
