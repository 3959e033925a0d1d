#!/usr/bin/env python3
"""Decode speed of the native cuda backend against torch on the same GPU, in one run.

    python3 benchmarks/cuda_decode.py [--shapes smollm2-135m,llama3.2-1b,llama2-7b] [--output FILE.json]

Models: random-weight int4 g128 engines of real models' shapes (awq_edge/synthetic.py SHAPES),
written on this machine; speed does not depend on the values, and no model can be carried to
the lent GPU machine. Per shape, each runtime in its own subprocess (a fault in one cannot
poison the others, and each starts with the GPU's memory free):

    awq-edge     Engine.load on the engine (backend cuda, the Python API): a 128-token prompt,
                 then 256 greedy tokens with ignore_eos, each chosen on the GPU and read back,
                 detokenized as a user's stream is
    torch-fp16   a plain Llama decoder in torch (fp16 weights, static KV cache, fused q/k/v and
                 gate/up, SDPA), every decode step one CUDA graph replay; the prompt eager
    torch-int4   the same decoder on torch's int4 weight-only kernel (aten._weight_int4pack_mm,
                 tinygemm, what gpt-fast uses), bf16 activations, int4 g128 where K allows
    copy         a 2 GiB device-to-device copy: the bandwidth ceiling, (read + write) / time

For awq-edge, decode runs on each one-row GEMV choice (cuda_backend.DECODE_GEMVS, set_decode_gemv):
keys decode_gemv (the default, "auto": per linear the GEMV timed fastest at load, gemv_tuning;
the prompt's chunk size timed on every prefill path at first use, prefill_tuning, in ms) and
decode_tok_s_{choice} for each choice; and once more on the
default without running ahead (each token read back before the step that feeds it is queued):
decode_tok_s_step_by_step.
decode_tok_s = (new tokens - 1) / time after the first token; ttft_s = prompt in -> first token
on the host; both the median of --runs runs after a warm-up. For awq-edge also one prefill chunk
of 16, 64, 128 and 256 rows both ways (our kernels: the GEMV up to 32 rows, the GEMM
above; and dequantize + cuBLAS when the machine has it), in turn: prefill_{rows}_{ours|cublas}_ms
(a 256-row chunk is a full one: a CUDA graph replay). roofline_fraction = (weight bytes
read per token / copy bandwidth) / time per token, with the weight bytes each runtime reads: every
linear and the lm_head (ours int8 by default, the peers fp16; an embedding table that is not the head
is gathered, one row). JSON rows carry the keys
gpu, shape, runtime, decode_tok_s, ttft_s, roofline_fraction (and bytes, errors); a runtime that
fails gives a row with its one-line error, never a number. Needs an NVIDIA GPU, nvcc (the
engine's kernels are compiled here) and torch with CUDA for the peers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT))  # after PYTHONPATH: an installed (or gpu_check.sh's linked) awq_edge wins

DEFAULT_SHAPES = "smollm2-135m,llama3.2-1b,llama2-7b"
PROMPT_TOKENS, NEW_TOKENS = 128, 256
PREFILL_ROWS = (16, 64, 128, 256)  # prefill chunk sizes timed on both GEMM paths (CUBLAS_FROM_ROWS)


# ---------------------------------------------------------------- the workers (one per subprocess)

def worker_copy() -> dict:
    import torch

    n = 2 << 30
    a, b = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    for _ in range(3):
        b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(10):
            b.copy_(a)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / 10)
    return {"copy_bandwidth_gbs": 2 * n / sorted(times)[2] / 1e9, "gpu": torch.cuda.get_device_name()}


def worker_ours(engine_dir: str, runs: int) -> dict:
    from awq_edge.cuda_backend import DECODE_GEMVS
    from awq_edge.engine import Engine
    from awq_edge.sampling import Sampler, SamplingSettings

    path = Path(engine_dir)
    t0 = time.perf_counter()
    engine = Engine.load(path, max_context=PROMPT_TOKENS + NEW_TOKENS + 1)
    load_s = time.perf_counter() - t0
    prompt = [int(i) for i in range(PROMPT_TOKENS)]  # byte ids: any are valid

    def greedy_runs(count: int) -> list:
        """The GenerationStats of `count` greedy replies of NEW_TOKENS to the prompt."""
        stats = []
        for _ in range(count):
            "".join(engine.stream_ids(prompt, Sampler(SamplingSettings(0.0)), NEW_TOKENS, ignore_eos=True))
            assert engine.last_stats.new_tokens == NEW_TOKENS, engine.last_stats
            stats.append(engine.last_stats)
        return stats

    default = engine.backend.decode_gemv
    by_gemv = {}
    for gemv in DECODE_GEMVS:
        engine.backend.set_decode_gemv(gemv)
        by_gemv[gemv] = greedy_runs(runs + 1)[1:]  # (the first captures the decode graph)
    engine.backend.set_decode_gemv(default)
    engine.backend.run_ahead = False  # one step at a time: the host reads each token before the next step
    step_by_step = greedy_runs(runs)
    engine.backend.run_ahead = True
    stats = by_gemv[default]
    return {"decode_tok_s": median([s.decode_tok_s for s in stats]), "ttft_s": median([s.ttft_s for s in stats]),
            "decode_gemv": default, "gemv_tuning": engine.backend.gemv_tuning,
            **{f"decode_tok_s_{gemv}": median([s.decode_tok_s for s in runs_]) for gemv, runs_ in by_gemv.items()},
            "decode_tok_s_step_by_step": median([s.decode_tok_s for s in step_by_step]),
            "weight_bytes_per_token": weight_bytes_read(engine.export), "load_s": load_s,
            "prefill_path": engine.backend.prefill_path,  # (what the timing at first use chose, before:)
            "prefill_tuning": {str(rows): ms for rows, ms in engine.backend.prefill_tuning.items()},
            **prefill_times(engine.backend, runs)}


def prefill_times(backend, runs: int) -> dict:
    """Milliseconds of one prefill chunk of PREFILL_ROWS rows on our kernels (the chunked GEMV up to
    32 rows, the GEMM above) and, when the machine has cuBLAS, through dequantize + cuBLAS (at
    every size, whatever cuda_backend.CUBLAS_FROM_ROWS says) with 16 MiB slabs and, where the L2
    is smaller than 32 MiB (Orin, RTX 40xx laptops), with slabs of half the L2 ("cublas_l2");
    the paths in turn, twice, each after a warm-up run (which captures each size's graph);
    median of runs: where the backend's switch and slab size belong."""
    from awq_edge.cuda_backend import DEQUANT_SLAB_BYTES

    blas, switch, timing = backend.cublas, backend.cublas_from_rows, backend.time_prefill
    paths = {"ours": (None, DEQUANT_SLAB_BYTES)}
    if blas is not None:
        paths["cublas"] = (blas, DEQUANT_SLAB_BYTES)
        l2_half = backend.drv.l2_cache_bytes() // 2  # slabs that stay in L2 between the two kernels
        if l2_half < DEQUANT_SLAB_BYTES:
            paths["cublas_l2"] = (blas, l2_half)
    times = {(rows, path): [] for rows in PREFILL_ROWS for path in paths}
    for _ in range(2):
        for path, (gemm, slab_bytes) in paths.items():
            backend.set_prefill_path(gemm, 1, slab_bytes)
            for run in range(runs + 1):
                for rows in PREFILL_ROWS:
                    backend.rewind(0)
                    t0 = time.perf_counter()
                    backend.forward(list(range(rows)))  # returns after the step (the backend synchronizes)
                    if run:
                        times[rows, path].append(time.perf_counter() - t0)
    backend.set_prefill_path(blas, switch, DEQUANT_SLAB_BYTES)
    backend.time_prefill = timing  # (each chunk size timed again at its next first use)
    return {f"prefill_{rows}_{path}_ms": median(seconds) * 1e3 for (rows, path), seconds in times.items()}


def weight_bytes_read(info) -> int:
    """Bytes of the engine's tensors one decode step reads whole: all but the RoPE tables, the
    embedding table unless it is the head, and an int4 head's fp16 table (one row of each is
    read, or its top 64)."""
    import numpy as np

    head_is_table = info.spec.tie_embeddings and info.spec.lm_head == "fp16"
    skip = {"model.embed_tokens.q8", "model.embed_tokens.q8_scales"} | (
        set() if head_is_table else {"model.embed_tokens.weight"})
    if info.spec.lm_head == "int4":
        skip.add("lm_head.weight")
    return sum(np.dtype(dtype).itemsize * int(np.prod(shape)) for name, (dtype, shape, _) in info.tensors.items()
               if name not in skip and not name.startswith("rope."))


def worker_torch(shape_name: str, kind: str, runs: int) -> dict:
    from awq_edge.synthetic import SHAPES

    decoder = TorchDecoder(SHAPES[shape_name], kind, PROMPT_TOKENS + NEW_TOKENS)
    ttft, decode = [], []
    for _ in range(runs + 1):
        t, d = decoder.generate(list(range(PROMPT_TOKENS)), NEW_TOKENS)
        ttft.append(t)
        decode.append(d)
    return {"decode_tok_s": median(decode[1:]), "ttft_s": median(ttft[1:]),
            "weight_bytes_per_token": decoder.weight_bytes, **decoder.notes}


class TorchDecoder:
    """A Llama decoder in plain torch (gpt-fast's recipe, without torch.compile): fp16 weights, or
    int4 through aten._weight_int4pack_mm; random weights; static KV cache [layers, Hkv, C, D]."""

    def __init__(self, shape: dict, kind: str, context: int, device: str = "cuda"):
        import torch

        self.torch, self.kind, self.context, self.device = torch, kind, context, device
        self.dtype = torch.float16 if kind == "fp16" else torch.bfloat16
        self.hidden, self.inter = shape["hidden_size"], shape["intermediate_size"]
        self.heads, self.kv_heads, self.head_dim = (shape["num_attention_heads"], shape["num_key_value_heads"],
                                                    shape["head_dim"])
        self.weight_bytes, self.notes = 0, {}
        H, Hkv, D, dev = self.heads, self.kv_heads, self.head_dim, device
        torch.manual_seed(0)
        self.embed = torch.randn(shape["vocab_size"], self.hidden, device=dev).to(self.dtype)
        self.head = self.embed if shape["tie_word_embeddings"] else \
            (torch.randn(shape["vocab_size"], self.hidden, device=dev) / self.hidden ** 0.5).to(self.dtype)
        self.weight_bytes += self.head.numel() * 2
        self.layers = []
        for _ in range(shape["num_hidden_layers"]):
            self.layers.append({
                "attn_norm": torch.ones(self.hidden, device=dev, dtype=self.dtype),
                "mlp_norm": torch.ones(self.hidden, device=dev, dtype=self.dtype),
                "qkv": self.linear((H + 2 * Hkv) * D, self.hidden), "o": self.linear(self.hidden, H * D),
                "gate_up": self.linear(2 * self.inter, self.hidden), "down": self.linear(self.hidden, self.inter)})
        self.norm = torch.ones(self.hidden, device=dev, dtype=self.dtype)
        inv_freq = 1.0 / (shape["rope_theta"] ** (torch.arange(0, D, 2, device=dev).float() / D))
        angles = torch.outer(torch.arange(context, device=dev).float(), inv_freq)
        self.cos, self.sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        cache = (len(self.layers), Hkv, context, D)
        self.k_cache = torch.zeros(cache, device=dev, dtype=self.dtype)
        self.v_cache = torch.zeros(cache, device=dev, dtype=self.dtype)
        self.pos = torch.zeros((), dtype=torch.long, device=dev)
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.graph = None

    def linear(self, n: int, k: int):
        torch = self.torch
        if self.kind == "fp16":
            w = (torch.randn(n, k, device=self.device) / k ** 0.5).to(self.dtype)
            self.weight_bytes += w.numel() * 2
            return lambda x: x @ w.t()
        group = next(g for g in (128, 64, 32) if k % g == 0)
        tiles = next(t for t in (8, 4, 2) if k % (16 * t) == 0)
        self.notes.setdefault("int4_group_sizes", set()).add(group)
        q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=self.device)
        packed = torch.ops.aten._convert_weight_to_int4pack(q, tiles)
        scales_zeros = torch.zeros(k // group, n, 2, device=self.device, dtype=torch.bfloat16)
        scales_zeros[..., 0] = 1.0 / (4.6 * k ** 0.5)  # (q - 8) * scale + zero, zero = 0
        self.weight_bytes += packed.numel() * packed.element_size() + scales_zeros.numel() * 2
        return lambda x: torch.ops.aten._weight_int4pack_mm(x.contiguous(), packed, group, scales_zeros)

    def rms(self, x, w):
        x32 = x.float()
        return (x32 * self.torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(self.dtype) * w

    def rope(self, x, cos, sin):  # x [S, heads, D]; rotate_half
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[:, None, :], sin[:, None, :]
        return self.torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)

    def forward(self, ids):
        """Logits float32 [V] after ids [S] at positions pos..pos+S-1; advances pos."""
        torch, F = self.torch, self.torch.nn.functional
        H, Hkv, D, S = self.heads, self.kv_heads, self.head_dim, ids.shape[0]
        positions = self.pos + torch.arange(S, device=self.device)
        cos, sin = self.cos[positions], self.sin[positions]
        mask = torch.arange(self.context, device=self.device)[None, :] <= positions[:, None]
        x = self.embed[ids]
        for i, layer in enumerate(self.layers):
            qkv = layer["qkv"](self.rms(x, layer["attn_norm"]))
            q = self.rope(qkv[:, :H * D].view(S, H, D), cos, sin)
            k = self.rope(qkv[:, H * D:(H + Hkv) * D].view(S, Hkv, D), cos, sin)
            v = qkv[:, (H + Hkv) * D:].view(S, Hkv, D)
            self.k_cache[i].index_copy_(1, positions, k.transpose(0, 1))
            self.v_cache[i].index_copy_(1, positions, v.transpose(0, 1))
            out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], self.k_cache[i][None],
                                                 self.v_cache[i][None], attn_mask=mask, enable_gqa=True)
            x = x + layer["o"](out[0].transpose(0, 1).reshape(S, H * D))
            gate_up = layer["gate_up"](self.rms(x, layer["mlp_norm"]))
            x = x + layer["down"](F.silu(gate_up[:, :self.inter]) * gate_up[:, self.inter:])
        self.pos += S
        return (self.rms(x[-1:], self.norm) @ self.head.t()).float()[0]

    def decode_step(self):
        self.token.copy_(self.forward(self.token).argmax())

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[float, float]:
        """(ttft_s, decode tok/s): the prompt eager, then one graph replay and one read-back per token."""
        torch = self.torch
        if self.graph is None:  # warm up on a side stream, then capture (torch's recipe)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.decode_step()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.decode_step()
        torch.cuda.synchronize()
        self.pos.zero_()
        t0 = time.perf_counter()
        self.token.copy_(self.forward(torch.tensor(prompt, device=self.device)).argmax())
        tokens = [int(self.token.item())]
        t1 = time.perf_counter()
        for _ in range(new_tokens - 1):
            self.graph.replay()
            tokens.append(int(self.token.item()))
        t2 = time.perf_counter()
        return t1 - t0, (new_tokens - 1) / (t2 - t1)


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def run_worker(args: list[str], timeout: int) -> dict:
    """One worker subprocess; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    return json.loads(lines[-1])


def worker_main(argv: list[str]) -> None:
    kind, *rest = argv
    if kind == "copy":
        result = worker_copy()
    elif kind == "ours":
        result = worker_ours(rest[0], int(rest[1]))
    else:
        result = worker_torch(rest[0], kind.removeprefix("torch-"), int(rest[1]))
    print(json.dumps(result, default=sorted))


# ---------------------------------------------------------------- the run

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help=f"comma-separated SHAPES names ({DEFAULT_SHAPES})")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per runtime and shape")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind: the temp dirs are removed
    from awq_edge.cuda_runtime import benchmark_gpu
    from awq_edge.devices import profile_for_arch
    from awq_edge.synthetic import SHAPES, write_random_engine

    gpu0 = benchmark_gpu("benchmarks/cuda_decode.py")
    if gpu0 is None:
        return 2
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"error: unknown shape {unknown[0]}; choose from {', '.join(SHAPES)}", file=sys.stderr)
        return 2
    device = profile_for_arch(gpu0.arch)
    if device is None:
        print(f"error: no device profile has the arch {gpu0.arch}; add one under devices/", file=sys.stderr)
        return 2
    copy = run_worker(["copy"], args.timeout)
    bandwidth = copy.get("copy_bandwidth_gbs")
    gpu = copy.get("gpu", gpu0.name)
    print(f"{gpu}: device copy {bandwidth and round(bandwidth)} GB/s {copy.get('error', '')}", flush=True)
    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory(prefix="awq-edge-bench-") as tmp:
            t0 = time.perf_counter()
            engine = Path(tmp) / "engine"
            write_random_engine(engine, shape, device)
            print(f"{shape}: engine written in {time.perf_counter() - t0:.0f} s", flush=True)
            for runtime, worker in (("awq-edge", ["ours", str(engine)]), ("torch-fp16", ["torch-fp16", shape]),
                                    ("torch-int4", ["torch-int4", shape])):
                result = run_worker([*worker, str(args.runs)], args.timeout)
                row = {"gpu": gpu, "shape": shape, "runtime": runtime, "decode_tok_s": result.pop("decode_tok_s", None),
                       "ttft_s": result.pop("ttft_s", None), "roofline_fraction": None, **result}
                if row["decode_tok_s"] and bandwidth:
                    row["roofline_fraction"] = row["weight_bytes_per_token"] / (bandwidth * 1e9) * row["decode_tok_s"]
                rows.append(row)
                print(format_row(row), flush=True)
    for shape in shapes:
        by = {r["runtime"]: r for r in rows if r["shape"] == shape}
        for n in PREFILL_ROWS:
            mine, blas, l2 = (by["awq-edge"].get(f"prefill_{n}_{path}_ms") for path in ("ours", "cublas", "cublas_l2"))
            if mine and blas:
                print(f"{shape}: a {n}-row prefill chunk: our kernels {mine:.2f} ms, dequantize + cuBLAS {blas:.2f} ms "
                      f"(cuBLAS {mine / blas:.2f}x faster)" + (f", with L2-sized slabs {l2:.2f} ms" if l2 else ""))
        ours = by["awq-edge"]["decode_tok_s"]  # (printed until 2026-12-05 as the last prefill time / the peer's tok/s)
        for peer in ("torch-fp16", "torch-int4"):
            if ours and by[peer]["decode_tok_s"]:
                print(f"{shape}: awq-edge / {peer} decode = {ours / by[peer]['decode_tok_s']:.2f}x")
    out = args.output or ROOT / "benchmarks" / "results" / f"cuda_decode-{dt.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cuda_decode", "date": dt.datetime.now().isoformat(timespec="seconds"),
                               "gpu": gpu, "device_profile": device.name, "copy_bandwidth_gbs": bandwidth,
                               "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS, "runs": args.runs,
                               "group_size": 128, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0 if all(r["decode_tok_s"] for r in rows if r["runtime"] == "awq-edge") else 1


def format_row(row: dict) -> str:
    if row.get("error"):
        return f"{row['shape']:>14} {row['runtime']:>11}: error {row['error']}"
    frac = row["roofline_fraction"]
    return (f"{row['shape']:>14} {row['runtime']:>11}: decode {row['decode_tok_s']:8.1f} tok/s, "
            f"TTFT {1e3 * row['ttft_s']:7.1f} ms, {row['weight_bytes_per_token'] / 1e9:.3f} GB/token, "
            f"roofline {'-' if frac is None else f'{100 * frac:.0f}%'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
