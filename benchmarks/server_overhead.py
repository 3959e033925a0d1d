"""What the HTTP server costs: tokens/s streamed through `awq-edge serve` vs the engine called in-process.

    python benchmarks/server_overhead.py --engine out/engine [--runs 9] [--new-tokens 128]

One `awq-edge serve ENGINE --port 0` process, and the same engine loaded here. Each run sends
the same prompt both ways, greedy, EOS ignored so both decode exactly --new-tokens tokens:
  - server: /v1/completions, streamed, through the official openai client (its parsing counts);
  - engine: Engine.stream_ids on the same token ids (what Engine.stream does, plus ignore_eos).
Both are timed the same way, from the call to the last text piece: end-to-end tok/s =
new tokens / that time (prefill included), decode tok/s = (new tokens - 1) / (last - first piece)
(both sides send the first token's text at once; the server then sends the pieces of 20 ms
together, awq_edge/server.py STREAM_INTERVAL_S).
Wall times on a shared machine are noisy, so CPU time is measured too: CPU seconds per token
of this process (engine side), and of the server process plus this one (client) on the
server side; it counts the server's extra work whatever the other users of the machine do.
The server's event loop thread (HTTP, JSON, SSE; the engine runs in another thread) is
measured on its own too: its CPU time per token (/proc/PID/task/PID/schedstat).
Each run's prompt starts with its own number, so the server cannot reuse the previous prompt
from its KV cache: both sides prefill the whole prompt. The two sides alternate (server first
in even runs, engine first in odd ones) after one warm-up each; medians are reported, with the
load average of the (shared) machine before and after.
Writes benchmarks/results/server_overhead-<time>.json.
"""
from __future__ import annotations

import argparse
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


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one by default), all its threads."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True, type=Path)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    import openai

    from awq_edge.engine import Engine
    from awq_edge.sampling import Sampler, SamplingSettings

    load_before = os.getloadavg()
    proc, url = start_server(args.engine)
    try:
        engine = Engine.load(args.engine)
        name = args.engine.resolve().name
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)

        def through_server(prompt: str) -> dict:
            def start():
                stream = client.completions.create(model=name, prompt=prompt, max_tokens=args.new_tokens,
                                                   temperature=0, stream=True, extra_body={"ignore_eos": True})
                return (c.choices[0].text if c.choices else "" for c in stream)
            return timed(start, proc.pid)

        def in_process(prompt: str) -> dict:
            def start():
                ids = engine.prompt_ids(prompt, chat_template=False)  # as the server tokenizes /v1/completions
                return engine.stream_ids(ids, Sampler(SamplingSettings(temperature=0.0)), args.new_tokens,
                                         ignore_eos=True)
            result = timed(start)
            assert engine.last_stats.new_tokens == args.new_tokens
            return result

        sides = {"server": through_server, "engine": in_process}
        runs = {"server": [], "engine": []}
        for i in range(args.runs + 1):  # run 0 is the warm-up
            prompt = f"{i + 1}. {PROMPT}"
            for side in (("server", "engine") if i % 2 == 0 else ("engine", "server")):
                r = sides[side](prompt)
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
    loss = {m: 1 - median["server"][m] / median["engine"][m] for m in ("tok_s", "decode_tok_s")}
    # CPU per token, server side over engine side: everything (server process + client), the server process alone
    loss["cpu_per_token"] = median["server"]["cpu_ms_per_token"] / median["engine"]["cpu_ms_per_token"] - 1
    loss["server_process_cpu_per_token"] = (median["server"]["server_cpu_ms_per_token"]
                                            / median["engine"]["cpu_ms_per_token"] - 1)
    # Paired per run too: the two sides of one run ran back to back, so a slow spell of the machine hits both.
    paired = [1 - s["tok_s"] / e["tok_s"] for s, e in zip(runs["server"], runs["engine"])]
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
        "engine": str(args.engine), "manifest_quantization": engine.manifest.get("quantization"),
        "prompt_tokens": len(engine.prompt_ids(f"1. {PROMPT}", chat_template=False)),
        "new_tokens": args.new_tokens, "runs": args.runs,
        "median": median, "loss": loss, "paired_loss_median": statistics.median(paired), "paired_loss": paired,
        "all_runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"server_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")

    print(f"\n{result['prompt_tokens']} prompt tokens, {args.new_tokens} new, greedy, median of {args.runs} "
          f"({cpu_name()}, {os.cpu_count()} CPUs, load {load_before[0]:.2f} -> {load_after[0]:.2f})")
    print(f"{'':8} {'end to end tok/s':>17} {'decode tok/s':>13} {'first piece ms':>15} {'CPU ms/token':>13}")
    for side in ("engine", "server"):
        m = median[side]
        print(f"{side:8} {m['tok_s']:17.1f} {m['decode_tok_s']:13.1f} {m['first_s'] * 1000:15.1f} "
              f"{m['cpu_ms_per_token']:13.2f}")
    print(f"server loss: {loss['tok_s'] * 100:.1f}% end to end, {loss['decode_tok_s'] * 100:.1f}% decode "
          f"(paired per run, median: {statistics.median(paired) * 100:.1f}%); "
          f"CPU per token: {loss['cpu_per_token'] * 100:+.1f}% (server process {median['server']['server_cpu_ms_per_token']:.2f}"
          f" ms: {loss['server_process_cpu_per_token'] * 100:+.1f}%, of which its event loop "
          f"{median['server']['server_loop_cpu_ms_per_token']:.2f} ms; openai client "
          f"{median['server']['client_cpu_ms_per_token']:.2f} ms); {median['server']['pieces']:.0f} streamed events "
          f"for {args.new_tokens} tokens")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
