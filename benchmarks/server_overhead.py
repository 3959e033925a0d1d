"""What the HTTP server costs: tokens/s streamed through `awq-edge serve` vs the engine called in-process.

    python benchmarks/server_overhead.py --engine out/engine [--runs 41] [--new-tokens 128]

One `awq-edge serve ENGINE --port 0` process, and the same engine loaded here. Each run sends
the same prompt three ways, greedy, EOS ignored so all decode exactly --new-tokens tokens:
  - engine: Engine.stream_ids on the prompt's token ids (what Engine.stream does, plus ignore_eos);
  - http: /v1/completions streamed, read with http.client (the server's cost, little client's);
  - openai: the same through the official openai client (its parsing counts too).
All are timed the same way, from the call to the last text piece: end-to-end tok/s =
new tokens / that time (prefill included), decode tok/s = (new tokens - 1) / (last - first
piece) (every side sends the first token's text at once; the server then sends the pieces of
STREAM_INTERVAL_S together, awq_edge/server.py).
The machine is shared, so wall times are noisy. The three sides run back to back in an order
that rotates from run to run, after one warm-up run; medians over runs are reported, and the
median of the per-run ratios (paired: one run's sides saw nearly the same machine), with the
load average before and after. CPU time is measured too, which other users of the machine
disturb less: of this process (engine side; the client on the server sides), of the server
process, and of the server's event loop thread alone (HTTP, JSON, SSE; the engine runs in
another thread), per token.
Every request's prompt starts with its own 4-digit number (digits are single tokens, so all
prompts have the same length), so the server cannot reuse the previous prompt from its KV
cache: every side prefills the whole prompt.
Writes benchmarks/results/server_overhead-<time>.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import select
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROMPT = ("The history of computing is a story of machines that got smaller, cheaper and faster, and of people "
          "who found new things to do with them every time. Write the next chapter of that story:")


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def start_server(engine: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "awq_edge.cli", "serve", str(engine), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline().decode()
            if line.startswith("serving "):
                return proc, line.split(" at ")[1].split()[0]
    proc.kill()
    raise SystemExit("the server did not start")


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time of a process, all its threads, to the nanosecond (/proc/PID/task/*/schedstat)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9


def loop_cpu_seconds(pid: int) -> float:
    """CPU time of a process's main thread (the server's event loop), to the nanosecond."""
    return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9


def timed(start_stream, server_pid: int | None = None) -> dict:
    """Wall times of a stream of text pieces, from the call that starts it to its last piece, and CPU time."""
    here0, server0 = cpu_seconds(), cpu_seconds(server_pid) if server_pid else 0.0
    loop0 = loop_cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for piece in start_stream() if piece]
    here, server = cpu_seconds() - here0, (cpu_seconds(server_pid) - server0 if server_pid else 0.0)
    loop = loop_cpu_seconds(server_pid) - loop0 if server_pid else 0.0
    return {"total_s": stamps[-1] - t0, "first_s": stamps[0] - t0, "pieces": len(stamps),
            "decode_s": stamps[-1] - stamps[0], "cpu_s": here + server, "server_cpu_s": server, "client_cpu_s": here,
            "server_loop_cpu_s": loop}


def read_sse(host: str, port: int, body: dict):
    """/v1/completions streamed, read with the standard library: the text of each event."""
    conn = http.client.HTTPConnection(host, port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    for line in response:
        if line.startswith(b"data: {"):
            yield json.loads(line[6:])["choices"][0]["text"]
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, type=Path)
    ap.add_argument("--runs", type=int, default=41)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import openai

    from awq_edge.engine import Engine
    from awq_edge.sampling import Sampler, SamplingSettings
    from awq_edge.server import STREAM_INTERVAL_S

    load_before = os.getloadavg()
    proc, url = start_server(args.engine)
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    try:
        engine = Engine.load(args.engine)
        name = Path(os.path.abspath(args.engine)).name
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        request = {"model": name, "max_tokens": args.new_tokens, "temperature": 0, "stream": True, "ignore_eos": True}

        def engine_side(prompt: str) -> dict:
            def start():
                ids = engine.prompt_ids(prompt, chat_template=False)  # as the server tokenizes /v1/completions
                return engine.stream_ids(ids, Sampler(SamplingSettings(temperature=0.0)), args.new_tokens,
                                         ignore_eos=True)
            result = timed(start)
            assert engine.last_stats.new_tokens == args.new_tokens
            return result

        def http_side(prompt: str) -> dict:
            return timed(lambda: read_sse(host, int(port), {**request, "prompt": prompt}), proc.pid)

        def openai_side(prompt: str) -> dict:
            def start():
                stream = client.completions.create(model=name, prompt=prompt, max_tokens=args.new_tokens,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
                return (c.choices[0].text if c.choices else "" for c in stream)
            return timed(start, proc.pid)

        sides = {"engine": engine_side, "http": http_side, "openai": openai_side}
        orders = [("engine", "http", "openai"), ("openai", "engine", "http"), ("http", "openai", "engine")]
        runs = {side: [] for side in sides}
        for i in range(args.runs + 1):  # run 0 is the warm-up
            for k, side in enumerate(orders[i % 3]):
                r = sides[side](f"{3 * i + k:04d}. {PROMPT}")
                r["tok_s"] = args.new_tokens / r["total_s"]
                r["decode_tok_s"] = (args.new_tokens - 1) / r["decode_s"]
                for what in ("cpu", "server_cpu", "client_cpu", "server_loop_cpu"):
                    r[f"{what}_ms_per_token"] = r[f"{what}_s"] / args.new_tokens * 1000
                if i > 0:
                    runs[side].append(r)
                print(f"run {i}{' (warm-up)' if i == 0 else ''} {side:6} {r['tok_s']:6.1f} tok/s end to end, "
                      f"decode {r['decode_tok_s']:6.1f} tok/s, {r['cpu_ms_per_token']:5.2f} CPU ms/token",
                      file=sys.stderr, flush=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    load_after = os.getloadavg()

    metrics = ("tok_s", "decode_tok_s", "total_s", "first_s", "cpu_ms_per_token", "server_cpu_ms_per_token",
               "client_cpu_ms_per_token", "server_loop_cpu_ms_per_token", "pieces")
    median = {side: {m: statistics.median(r[m] for r in rs) for m in metrics} for side, rs in runs.items()}
    loss = {}
    for side in ("http", "openai"):
        paired = [1 - s["tok_s"] / e["tok_s"] for s, e in zip(runs[side], runs["engine"])]
        loss[side] = {
            "tok_s": 1 - median[side]["tok_s"] / median["engine"]["tok_s"],
            "decode_tok_s": 1 - median[side]["decode_tok_s"] / median["engine"]["decode_tok_s"],
            "tok_s_paired_median": statistics.median(paired), "tok_s_paired": paired,
            # CPU per token over the engine's: the server process and this process (the client) together
            "cpu_per_token": median[side]["cpu_ms_per_token"] / median["engine"]["cpu_ms_per_token"] - 1,
        }
    import onnxruntime
    import starlette
    import uvicorn

    result = {
        "script": "benchmarks/server_overhead.py",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpu": cpu_name(), "logical_cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": load_after},
        "versions": {"python": sys.version.split()[0], "onnxruntime": onnxruntime.__version__,
                     "starlette": starlette.__version__, "uvicorn": uvicorn.__version__, "openai": openai.__version__},
        "engine": str(args.engine), "quantization": engine.manifest.get("quantization"),
        "stream_interval_s": STREAM_INTERVAL_S,
        "prompt_tokens": len(engine.prompt_ids(f"0000. {PROMPT}", chat_template=False)),
        "new_tokens": args.new_tokens, "runs": args.runs,
        "median": median, "loss": loss, "all_runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"server_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['prompt_tokens']} prompt tokens, {args.new_tokens} new, greedy, median of {args.runs} "
          f"({cpu_name()}, {os.cpu_count()} CPUs, load {load_before[0]:.2f} -> {load_after[0]:.2f})")
    print(f"{'':8} {'end to end tok/s':>17} {'decode tok/s':>13} {'loss':>6} {'paired':>7} {'CPU ms/token':>13} "
          f"{'server loop':>12} {'client':>7} {'events':>7}")
    for side, m in median.items():
        lost = f"{loss[side]['tok_s'] * 100:.1f}%" if side in loss else ""
        paired = f"{loss[side]['tok_s_paired_median'] * 100:.1f}%" if side in loss else ""
        print(f"{side:8} {m['tok_s']:17.1f} {m['decode_tok_s']:13.1f} {lost:>6} {paired:>7} "
              f"{m['cpu_ms_per_token']:13.2f} {m['server_loop_cpu_ms_per_token']:12.2f} "
              f"{m['client_cpu_ms_per_token'] if side in loss else 0.0:7.2f} {m['pieces']:7.0f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
