"""Our quantizer next to llm-compressor's AWQModifier and GPTQModifier: same model, same calibration tokens, same eval.

    python benchmarks/quantizer_peers.py [--model smollm2] [--group-sizes 128,64] [--windows N] [--seqlen 1024]
        [--calib-samples N] [--calib-seqlen N] [--peer-python PATH] [--output FILE]

One run, per group size G (W4A16, asymmetric, lm_head left float):
  - rtn:       `awq-edge quantize MODEL -o DIR --method rtn --group-size G`;
  - ours:      `awq-edge quantize MODEL -o DIR --group-size G` (default settings);
  - llmc-awq:  llm-compressor's `oneshot` with AWQModifier,  } benchmarks/llmcompressor_worker.py, in
  - llmc-gptq: llm-compressor's `oneshot` with GPTQModifier, } llm-compressor's own venv (below).
The calibration tokens are built once here, with the quantizer's own functions and default settings
(QuantizeSettings(); --calib-samples/--calib-seqlen override them for ours and the peers alike), and
handed to llm-compressor as exactly those input_ids (a .npy file); ours rebuilds the same tokens from
the same settings (the checkpoint's metadata records how many, which is checked).
Every model, float included, is scored by `awq-edge eval --json` with protocols plain and deployed on
the built-in Wikipedia evaluation split and on Shakespeare; the table gives
(ppl_method - ppl_float) / (ppl_rtn - ppl_float) for ours and the peers (lower is better, 0 = float).

llm-compressor's venv: $AWQ_EDGE_CACHE/peers/llmcompressor-venv (AWQ_EDGE_CACHE defaults to
~/.cache/awq-edge), created on first use: CPU torch==2.13.0 (an exact pin; a looser one pulls the CUDA
wheels), then llmcompressor==0.14.0.1 with torch held at 2.13.0 by a constraints file. --peer-python
uses an existing interpreter that has llmcompressor instead. When there is none the peer rows are
skipped with a one-line note. A failing step becomes its row's one-line error, not a crash.
compressed-tensors has no short last group, so llm-compressor refuses a G that does not divide every
linear's inputs (SmolLM2-135M, hidden 576, at G = 128: its peer rows are that error), where ours
quantizes the last 64 columns as a short group.

Prints a markdown table and writes benchmarks/results/quantizer-peers-<model>-<timestamp>.json
(or --output). Work files go to a temp dir that is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORKER = HERE / "llmcompressor_worker.py"
TORCH_PIN = "torch==2.13.0"  # the CPU wheel; llmcompressor 0.14.0.1 wants 2.10 <= torch <= 2.14.0
LLMC_PIN = "llmcompressor==0.14.0.1"
PEERS = {"llmc-awq": "awq", "llmc-gptq": "gptq"}
PROTOCOLS = ("plain", "deployed")


def last_line(text: str) -> str:
    """The last non-empty line (progress bars' carriage returns split lines too), whole."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text or "") if ln.strip()]
    return lines[-1] if lines else ""


def error_line(proc: subprocess.CompletedProcess) -> str:
    """One line for a failed command: its last error-looking line (an exception, `error: ...`),
    else its exit status and last line of output."""
    text = proc.stderr if proc.stderr.strip() else proc.stdout
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text or "") if ln.strip()]
    for line in reversed(lines):
        if re.match(r"(error:|[\w.]*(Error|Exception|Interrupt)\b)", line, re.IGNORECASE):
            return line[:300]
    why = f"killed by signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
    return f"{why}; last output: {(lines or ['(none)'])[-1][:200]}"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """cmd's result; raises RuntimeError with error_line() when it fails."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise RuntimeError(error_line(proc))
    return proc


def cli(*args: str) -> str:
    return run([sys.executable, "-m", "awq_edge.cli", *args]).stdout


# ---------------------------------------------------------------- llm-compressor's venv

def peer_venv_dir() -> Path:
    from awq_edge.data import cache_dir

    return cache_dir() / "peers" / "llmcompressor-venv"


def has_llmcompressor(python: Path) -> bool:
    return subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode == 0


def create_peer_venv(venv: Path) -> Path:
    """venv with CPU torch (exact pin) and llmcompressor; its python. Raises RuntimeError."""
    print(f"creating llm-compressor's venv at {venv} (first use: {TORCH_PIN} CPU, then {LLMC_PIN}; "
          "a few minutes, about 1.5 GB)", flush=True)
    run([sys.executable, "-m", "venv", "--clear", venv])
    python = venv / "bin" / "python"
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH_PIN + "\n")  # llmcompressor's own torch range would pick a CUDA build
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    run([*pip, "--upgrade", "pip"])
    run([*pip, TORCH_PIN])
    run([*pip, "-c", constraints, LLMC_PIN])
    names = json.loads(run([python, "-m", "pip", "list", "--format", "json"]).stdout)
    cuda = [p["name"] for p in names if p["name"].lower().startswith("nvidia-") and p["name"] != "nvidia-ml-py"]
    if cuda:  # nvidia-ml-py (pynvml, pure python) is an llmcompressor requirement; CUDA wheels are not
        raise RuntimeError(f"the peer venv got CUDA packages ({', '.join(cuda)}); remove {venv} and check the pins")
    if not has_llmcompressor(python):
        raise RuntimeError(f"llmcompressor does not import in {venv}")
    return python


def peer_python(given: str | None) -> tuple[Path | None, str]:
    """(python with llmcompressor, note); (None, why) when there is none."""
    if given:
        python = Path(given)
        return (python, "given") if has_llmcompressor(python) else (None, f"{given} cannot import llmcompressor")
    venv = peer_venv_dir()
    python = venv / "bin" / "python"
    if python.exists() and has_llmcompressor(python):
        return python, "cached"
    try:
        return create_peer_venv(venv), "created"
    except (RuntimeError, OSError) as e:
        return None, f"could not create llm-compressor's venv at {venv}: {e}"


def peer_versions(python: Path) -> dict:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "('llmcompressor', 'compressed-tensors', 'torch', 'transformers', 'datasets')}))")
    try:
        return json.loads(last_line(run([python, "-c", code]).stdout))
    except (RuntimeError, ValueError) as e:
        return {"error": str(e)}


# ---------------------------------------------------------------- steps

def calibration(model: str, samples: int | None, seqlen: int | None, out: Path) -> dict:
    """Build the calibration tokens once (the quantizer's functions and defaults); save them as .npy."""
    import numpy as np
    from transformers import AutoTokenizer

    from awq_edge import data
    from awq_edge.evaluate import window_prefix
    from awq_edge.model import resolve_source
    from awq_edge.quantize import QuantizeSettings, calibration_tokens

    settings = QuantizeSettings()
    if samples:
        settings.calib_samples = samples
    if seqlen:
        settings.calib_seqlen = seqlen
    model_dir = resolve_source(model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = data.read_texts(data.fetch_wikipedia()[0])
    prefix = window_prefix(tokenizer, settings.calib_protocol)
    tokens = calibration_tokens(tokenizer, texts, settings.calib_samples, settings.calib_seqlen,
                                settings.calib_seed, prefix)
    np.save(out, tokens.numpy().astype(np.int64))
    return {"model_dir": str(model_dir), "samples": settings.calib_samples, "seqlen": settings.calib_seqlen,
            "seed": settings.calib_seed, "protocol": settings.calib_protocol, "prefix": prefix,
            "shape": list(tokens.shape), "tokens": int(tokens.numel()), "file": str(out)}


def quantize_ours(model: str, out: Path, group: int, method: str, calib: dict, overrides: list[str]) -> dict:
    args = ["quantize", model, "-o", str(out), "--group-size", str(group)]
    args += ["--method", "rtn"] if method == "rtn" else overrides
    started = time.time()
    stdout = cli(*args)
    wall = time.time() - started
    meta = json.loads((out / "awq_edge.json").read_text())
    run_info = {"command": "awq-edge " + " ".join(args), "quantize_wall_s": round(wall, 1),
                "quantize_s": meta["seconds"], "peak_rss_bytes": meta["peak_rss_bytes"],
                "settings": meta["settings"], "calibration": meta["calibration"], "cli_line": last_line(stdout)}
    if method != "rtn" and calib["tokens"] and meta["calibration"]["tokens"] != calib["tokens"]:
        run_info["warning"] = (f"ours calibrated on {meta['calibration']['tokens']} tokens, the peers on "
                               f"{calib['tokens']}")
    return run_info


def quantize_peer(python: Path, model_dir: str, tokens: Path, out: Path, method: str, group: int) -> dict:
    cmd = [python, WORKER, "--model", model_dir, "--tokens", tokens, "--method", method,
           "--group-size", str(group), "--output", out]
    started = time.time()
    proc = run(cmd, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    wall = time.time() - started
    report = json.loads(last_line(proc.stdout))
    return {"command": f"{python} {WORKER.name} " + " ".join(str(c) for c in cmd[2:]),
            "quantize_wall_s": round(wall, 1), **report}


def evaluate(model: str, text: Path | None, protocol: str, args) -> dict:
    extra = ["--text", str(text)] if text else []
    extra += ["--windows", str(args.windows)] if args.windows else []
    result = json.loads(last_line(cli("eval", model, "--json", "--protocol", protocol, "--seqlen",
                                      str(args.seqlen), *extra)))
    return {k: result[k] for k in ("perplexity", "windows", "tokens", "seqlen", "protocol", "text")}


def evaluate_all(model: str, texts: dict, args) -> dict:
    """{text: {protocol: eval result or {"error": line}}}."""
    scores = {}
    for name, path in texts.items():
        for protocol in PROTOCOLS:
            try:
                scores.setdefault(name, {})[protocol] = evaluate(model, path, protocol, args)
            except RuntimeError as e:
                scores.setdefault(name, {})[protocol] = {"error": str(e)}
    return scores


def ppl(scores: dict, text: str, protocol: str):
    return scores.get(text, {}).get(protocol, {}).get("perplexity") if scores else None


def ratio(method, rtn, fp):
    if None in (method, rtn, fp) or rtn == fp:
        return None
    return (method - fp) / (rtn - fp)


# ---------------------------------------------------------------- report

def fmt(x, digits=3) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict], runs: dict, methods: list[str]) -> str:
    lines = ["| text | protocol | group | float | RTN | " + " | ".join(f"{m} ppl | {m} ratio" for m in methods) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(methods)]
    for r in rows:
        cells = " | ".join(f"{fmt(r['ppl'].get(m))} | {fmt(r['ratio'].get(m))}" for m in methods)
        lines.append(f"| {r['text']} | {r['protocol']} | {r['group_size']} | {fmt(r['ppl']['float'])} | "
                     f"{fmt(r['ppl'].get('rtn'))} | {cells} |")
    errors = [f"- {key}: {run_info['error']}" for key, run_info in runs.items() if "error" in run_info]
    errors += [f"- {key} eval {text}/{protocol}: {res['error']}" for key, run_info in runs.items()
               for text, by in run_info.get("eval", {}).items() for protocol, res in by.items() if "error" in res]
    timing = [f"- {key}: quantize {run_info['quantize_wall_s']:.0f} s wall"
              + (f", peak RSS {run_info['peak_rss_bytes'] / 2**30:.2f} GiB" if "peak_rss_bytes" in run_info else "")
              for key, run_info in runs.items() if "quantize_wall_s" in run_info]
    return "\n".join(lines + ([""] + timing if timing else []) + (["", "errors:"] + errors if errors else []))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--group-sizes", default="128,64")
    ap.add_argument("--windows", type=int, default=None, help="eval windows per text; default: every full window")
    ap.add_argument("--seqlen", type=int, default=1024, help="eval window length")
    ap.add_argument("--calib-samples", type=int, default=None, help="default: QuantizeSettings' (64)")
    ap.add_argument("--calib-seqlen", type=int, default=None, help="default: QuantizeSettings' (512)")
    ap.add_argument("--peer-python", default=None, help="a python with llmcompressor; default: "
                                                        "$AWQ_EDGE_CACHE/peers/llmcompressor-venv, created on first use")
    ap.add_argument("--output", default=None)
    args = ap.parse_args()

    from awq_edge import data
    from awq_edge.errors import UserError

    started = time.time()
    groups = [int(g) for g in args.group_sizes.split(",")]
    texts = {"wikipedia": None}  # None: eval's built-in Wikipedia evaluation split
    try:
        texts["shakespeare"] = data.fetch_shakespeare()
    except (UserError, OSError, RuntimeError) as e:
        print(f"shakespeare skipped: {str(e).strip().splitlines()[0]}", flush=True)
    overrides = []
    if args.calib_samples:
        overrides += ["--calib-samples", str(args.calib_samples)]
    if args.calib_seqlen:
        overrides += ["--calib-seqlen", str(args.calib_seqlen)]
    python, peer_note = peer_python(args.peer_python)
    versions = peer_versions(python) if python else {}
    print(f"llm-compressor: {python or 'skipped'} ({peer_note}) {versions}", flush=True)
    methods = ["ours"] + (list(PEERS) if python else [])

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="quantizer-peers-") as tmp:
        tmp = Path(tmp)
        try:
            calib = calibration(args.model, args.calib_samples, args.calib_seqlen, tmp / "calib_tokens.npy")
            print(f"calibration: {calib['shape'][0]} x {calib['shape'][1]} tokens, prefix {calib['prefix']}",
                  flush=True)
        except (UserError, RuntimeError, OSError, ValueError) as e:  # ours may still run; the peers cannot
            calib = {"error": str(e).strip().splitlines()[0], "tokens": None}
            print(f"calibration tokens failed: {calib['error']}", flush=True)
        runs["float"] = {"eval": evaluate_all(args.model, texts, args)}
        print(f"float: {summary(runs['float'])}", flush=True)
        for g in groups:
            for key in ["rtn", "ours"] + [m for m in methods if m in PEERS]:
                name, out = f"{key}-g{g}", tmp / f"{key}-g{g}"
                try:
                    if key in PEERS and "error" in calib:
                        raise RuntimeError(f"no calibration tokens ({calib['error']})")
                    if key in PEERS:
                        runs[name] = quantize_peer(python, calib["model_dir"], Path(calib["file"]), out, PEERS[key], g)
                    else:
                        runs[name] = quantize_ours(args.model, out, g, "rtn" if key == "rtn" else "awq", calib,
                                                   overrides)
                except (RuntimeError, OSError, ValueError, KeyError) as e:
                    runs[name] = {"error": f"quantize failed: {e}"}
                    print(f"{name}: {runs[name]['error']}", flush=True)
                    continue
                runs[name]["eval"] = evaluate_all(str(out), texts, args)
                print(f"{name}: quantize {runs[name]['quantize_wall_s']:.0f} s wall; {summary(runs[name])}", flush=True)

    rows = []
    for text in texts:
        for protocol in PROTOCOLS:
            for g in groups:
                fp = ppl(runs["float"]["eval"], text, protocol)
                rtn = ppl(runs[f"rtn-g{g}"].get("eval"), text, protocol)
                row = {"text": text, "protocol": protocol, "group_size": g, "ppl": {"float": fp, "rtn": rtn},
                       "ratio": {}}
                for m in methods:
                    row["ppl"][m] = ppl(runs[f"{m}-g{g}"].get("eval"), text, protocol)
                    row["ratio"][m] = ratio(row["ppl"][m], rtn, fp)
                rows.append(row)
    elapsed = time.time() - started
    print("\n" + table(rows, runs, methods))
    if not python:
        print(f"\nllm-compressor rows skipped: {peer_note}")
    print(f"\ntotal {elapsed / 60:.1f} min")

    name = Path(args.model).name.replace(".gguf", "")
    out = Path(args.output) if args.output else RESULTS / f"quantizer-peers-{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python benchmarks/quantizer_peers.py " + " ".join(sys.argv[1:]),
        "model": args.model, "group_sizes": groups, "eval_seqlen": args.seqlen, "eval_windows": args.windows,
        "texts": {k: str(v) if v else "builtin: Wikipedia evaluation split" for k, v in texts.items()},
        "calibration": {k: v for k, v in calib.items() if k != "file"},
        "peer": {"python": str(python) if python else None, "note": peer_note, "versions": versions},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "total_s": round(elapsed, 1),
        "rows": rows, "runs": runs}, indent=2) + "\n")
    print(f"wrote {out}")


def summary(run_info: dict) -> str:
    return ", ".join(f"{t}/{p} " + (fmt(res.get("perplexity")) if "perplexity" in res else "error")
                     for t, by in run_info["eval"].items() for p, res in by.items())


if __name__ == "__main__":
    main()
