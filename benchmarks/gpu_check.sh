#!/usr/bin/env bash
# Every GPU check in one command, for a session that is lent a GPU machine (the `device` tool's
# `run`, which starts in the repo root with $OUT set) or any machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT, else benchmarks/results/gpu-check
#
# The lent machine is bare and offline, but its python3 has numpy, pytest, cmake, nvcc, torch,
# transformers and tokenizers, which is all these need (no venv, no install). Steps: the GPU, the
# kernel library build, the kernel tests, the cuda backend against its reference executor
# (tests/test_cuda_backend_gpu.py), one 7B-shaped layer against its roofline with a per-op
# breakdown (benchmarks/cuda_layer.py), the GEMV/GEMM benchmark (with its read-only ceiling and
# launch-cost fit), the native decode benchmark against torch fp16 and int4
# (benchmarks/cuda_decode.py), SmolLM2- and Llama-3.2-1B-shaped layers, the floor of a
# persistent decode step (benchmarks/persistent_step.py), the 7B layer at 4096 cached tokens,
# prefill attention, the three lm_heads (benchmarks/cuda_head.py), the quantizer on the GPU, then
# compute-sanitizer over two tiny engines. Each step's log lands beside the
# results, and a failing step does not stop the later ones (the exit code is the first failure's).
# On the H200 (2026-12-04, run 1) the whole script took 353 s with the tests on 8 xdist workers.
set -uo pipefail
cd "$(dirname "$0")/.."
# The lent machine hands back at most 8 files from $OUT: there the logs and JSONs are written to a
# scratch folder and packed into $OUT/gpu-check.tar.gz after every step (so a run cut short at its
# limit still returns what finished), with the summary beside it.
if [ -n "${OUT:-}" ]; then out="$(mktemp -d)"; bundle="$OUT/gpu-check.tar.gz"; else
    out=benchmarks/results/gpu-check; bundle=""; fi
mkdir -p "$out"
# awq_edge.export and awq_edge.devices are the top-level export/ and devices/ (pyproject.toml's
# package map). Without an install, a package of links gives them those names.
pkg="$(mktemp -d)"
mkdir "$pkg/awq_edge"
ln -s "$PWD"/awq_edge/* "$pkg/awq_edge/"
ln -s "$PWD/export" "$pkg/awq_edge/export"
ln -s "$PWD/devices" "$pkg/awq_edge/devices"
trap 'rm -rf "$pkg"; [ -z "$bundle" ] || rm -rf "$out"' EXIT  # (python3 -P below: `-m` would put ./awq_edge, without those names, first)
export PYTHONPATH="$pkg:$PWD" PYTHONUNBUFFERED=1 AWQ_EDGE_CACHE="${AWQ_EDGE_CACHE:-/tmp/awq-edge-cache}"
status=0
# GPU_CHECK_STEPS="build tests gemv ...": only those steps (a second run in one session's budget)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, remember the first failure
    [ -z "${GPU_CHECK_STEPS:-}" ] || [[ " $GPU_CHECK_STEPS " == *" $1 "* ]] || return 0
    echo "== $1"
    local started=$SECONDS
    timeout --kill-after=10 "$2" "${@:3}" 2>&1 | tee "$out/$1.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || echo "== $1: stopped after $2 s"
    echo "== $1: exit $rc after $((SECONDS - started)) s (of $2)"
    [ "$status" -ne 0 ] || status=$rc
    pack
}
pack() { [ -z "$bundle" ] || { tar czf "$bundle.part" -C "$out" . && mv "$bundle.part" "$bundle"; }; }
# pytest-xdist (on the lent machine's image) runs the GPU tests' CPU side (engine writing, the
# numpy reference) on all cores; -rA prints each passing case's measured error, as -s would.
# --durations: the slowest cases in each log (the backend step has grown to ~234 cases since run 1's
# 68 in 68 s: if it nears its limit, these say what to split off)
if python3 -c "import xdist" 2>/dev/null; then par=(-n 8 -rA --durations=15); else par=(-s --durations=15); fi

# Most telling first: correctness of the kernels and the backend, then the layer and kernel
# speeds, then end to end, then the quantizer. The limits keep a hung step from eating the
# session's device time (all of them together are about 19 minutes; a normal run ~6).
step gpu 60 bash -c 'nvidia-smi || exit; nvcc --version | tail -2
    python3 -c "from awq_edge import plugins; print(\"TensorRT headers:\", plugins.tensorrt_include_dir())"
    python3 -c "import tensorrt; print(\"tensorrt\", tensorrt.__version__)" 2>&1 | tail -1'
step build 180 python3 -c "from awq_edge import plugins; from awq_edge.cuda_runtime import find_gpus; \
gpus = find_gpus(); assert gpus, 'no NVIDIA GPU found'; print(gpus[0]); print(plugins.build_kernel_library(gpus[0].arch)); \
print(plugins.build_cubins(gpus[0].arch))"
step tests 150 python3 -m pytest -q "${par[@]}" -m gpu -p no:cacheprovider tests/test_kernels_gpu.py
step cuda_backend 300 python3 -P -m pytest -q "${par[@]}" -m gpu -p no:cacheprovider tests/test_cuda_backend_gpu.py
step cuda_layer 120 python3 benchmarks/cuda_layer.py --output "$out/cuda_layer.json"
# (the steps the next decision needs first: whether a persistent step is worth building rests on
# SmolLM2's real layer against the skeleton's floor; each step's results are packed as it ends,
# so a run cut short by the session's time keeps them)
# (SmolLM2 in a chat engine's 8192-token cache: 64 attention blocks a head, 5 with keys at 512;
# run 3 timed it in a 513-token cache)
step cuda_layer_small 120 python3 benchmarks/cuda_layer.py --shape smollm2-135m --cache 8192 --output "$out/cuda_layer-smollm2.json"
# the floor of a persistent decode step (one launch, grid barriers) against a launch per op,
# SmolLM2 and Llama-3.2-1B shapes: read against cuda_layer_small's real layer
step persistent_step 90 python3 benchmarks/persistent_step.py --output "$out/persistent_step.json"
step gemv 180 python3 benchmarks/gemv.py --output "$out/gemv.json"
step cuda_decode 300 python3 benchmarks/cuda_decode.py --timeout 150 --output "$out/cuda_decode.json" ${CUDA_DECODE_SHAPES:+--shapes "$CUDA_DECODE_SHAPES"}
# Llama-3.2-1B's layer (run 3's end to end, less its head: ~41 us a layer, its roofline ~8): where it goes
step cuda_layer_1b 100 python3 benchmarks/cuda_layer.py --shape llama3.2-1b --cache 8192 --output "$out/cuda_layer-1b.json"
step cuda_layer_long 120 python3 benchmarks/cuda_layer.py --context 4096 --output "$out/cuda_layer-4096.json"
step cuda_attention 60 python3 benchmarks/cuda_attention.py --output "$out/cuda_attention.json"
step cuda_head 150 python3 benchmarks/cuda_head.py --output "$out/cuda_head.json"
step quantize 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quantize_gpu.py
# Last, on whatever time is left: compute-sanitizer over three tiny engines' backend tests (every
# kind of kernel a prefill and a decode step launch, graphs and programmatic launches; the ragged
# one's K % 32 != 0; the persistent step, its blocks waiting on each other's counts; LFM2's short
# convolutions, their store by position): memcheck (an access outside an allocation, a misaligned one), racecheck
# (shared memory read and written without a barrier between), synccheck (a barrier not all reach).
# What the CPU emulation cannot see: the hardware's own order. sanitize.log: "ERROR SUMMARY" a tool.
step sanitize 150 bash -c 'for tool in memcheck racecheck synccheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -P -m pytest -q -p no:cacheprovider -m gpu \
        "tests/test_cuda_backend_gpu.py::test_every_family_matches_the_reference[llama-fused-tensor_cores]" \
        tests/test_cuda_backend_gpu.py::test_ragged_shapes_match_the_reference \
        "tests/test_cuda_backend_gpu.py::test_every_family_on_the_persistent_step[llama]" \
        "tests/test_cuda_backend_gpu.py::test_short_convolutions_match_the_reference[cuda_cores]" || exit; done'
# One screen of the numbers issue 19 asks for, from the JSONs above (whatever exists).
python3 - "$out" <<'SUMMARY' 2>&1 | tee "$out/summary.log" ${bundle:+"$OUT/summary.log"}
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
def load(name):
    try:
        return json.loads((out / name).read_text())
    except (OSError, ValueError):
        return None
def on_step(tuning):  # the timing at load's persistent step against the per-op step
    if tuning.get("persistent_step_error"):
        return f"; persistent step not taken: {tuning['persistent_step_error']}"
    us = tuning.get("persistent_step_us")
    if us:
        return (f"; persistent step {'taken' if tuning.get('persistent_step') else 'not taken'} "
                f"({us['persistent']:.1f} us, per op {us['per_op']:.1f} us)")
    return "; persistent step taken" if tuning.get("persistent_step") else ""
g = load("gemv.json")
if g:
    for name, fit in g.get("fit_m1", {}).items():
        print(f"fit {name}: {fit['intercept_us']:.2f} us + bytes / {fit['slope_gbs']:.0f} GB/s ({fit['slope_pct_of_copy']:.0f}% of copy)")
    for r in g["decode"]:
        if r["M"] == 1:
            tc = (f", tensor cores {r['tensor_cores_us']:.1f} us, {r['tensor_cores_pct_of_copy']:.0f}%, persistent "
                  f"{r['tensor_cores_persistent_us']:.1f} us, {r['tensor_cores_persistent_pct_of_copy']:.0f}%"
                  if r.get("tensor_cores_persistent_us") else "")
            print(f"GEMV {r['K']}x{r['N']}: {r['us']:.1f} us, {r['pct_of_copy']:.0f}% of copy (read-only {r['read_only_pct_of_copy']:.0f}%){tc}")
    print("M=8/M=1: " + ", ".join(f"{k} {v:.2f}x" for k, v in g.get("m8_over_m1", {}).items()))
    print("M=8/M=1 on CUDA cores: " + ", ".join(f"{k} {v:.2f}x" for k, v in g.get("m8_cuda_cores_over_m1", {}).items()))
    print("M=8/M=1, 32-row tensor-core blocks: " + ", ".join(f"{k} {v:.2f}x" for k, v in g.get("m8_mma32_over_m1", {}).items()))
    for r in g["prefill"]:
        vs = f"{r['speedup_vs_torch']:.2f}x cuBLAS" if r.get("speedup_vs_torch") else "no torch"
        dq = f", {r['ours_vs_dequant_cublas']:.2f}x dequant+cuBLAS" if r.get("ours_vs_dequant_cublas") else ""
        dq += f", 8 rows at a time {r['chunks_of_8_us']:.1f} us" if r.get("chunks_of_8_us") else ""
        dq += f", K split {r['split_k']} ways {r['split_k_us']:.1f} us" if r.get("split_k_us") else ""
        print(f"prefill {r['K']}x{r['N']} M={r['M']}: {r['us']:.1f} us, {vs}{dq}")
for name in ("cuda_layer.json", "cuda_layer-smollm2.json", "cuda_layer-1b.json", "cuda_layer-4096.json"):
    layer = load(name)
    if layer:
        for variant, r in layer["variants"].items():
            print(f"layer {layer['shape']} at {layer['context']} keys of {layer.get('cache', layer['context'] + 1)}, "
                  f"{variant}: {r['us_per_layer']:.1f} us, "
                  f"{r['launches_per_layer']:.2g} launches, "
                  f"{100 * r['roofline_fraction']:.0f}% of roofline")
        tuning = layer.get("gemv_tuning") or {}
        if "seconds" in tuning:
            print(f"  auto's GEMVs, timed at load ({tuning['seconds']:.2f} s): "
                  + "; ".join(f"{role} {kind}" + (f" ({', '.join(f'{k} {v:.1f}' for k, v in tuning['us'][role].items())} us)"
                                                   if role in tuning["us"] else "")
                              for role, kind in tuning["gemv"].items()) + (f"; step {tuning['step_us']}" if tuning.get("step_us") else "")
                  + on_step(tuning))
        for gemv, rows in layer.get("breakdown", {}).items():
            print(f"  GEMV on {gemv}: " + ", ".join(f"{r['op'].removeprefix('linear ')} {r['us_per_layer']:.1f} us "
                                                    f"({r['pct_of_copy']:.0f}%)" for r in rows))
ps = load("persistent_step.json")
for r in (ps or {}).get("shapes", []):
    print(f"step skeleton {r['shape']}, us a layer (roofline {r['roofline_us']:.2f}): "
          + "; ".join(f"{way} " + ", ".join(f"{v:.2f} at {k} blocks/SM" for k, v in r[f"{way}_us"].items())
                      for way in ("per_op", "persistent", "queue")))
a = load("cuda_attention.json")
for r in (a or {}).get("rows", []):
    mma = f", tensor cores {r['mma_us']:.0f} us ({r['mma_speedup']:.2f}x)" if r.get("mma_us") else ""
    print(f"prefill attention H {r['heads']}/{r['kv_heads']} D {r['head_dim']} after {r['past']}: per token "
          f"{r['per_token_us']:.0f} us, 16-token blocks {r['block_us']:.0f} us ({r['speedup']:.2f}x){mma}")
h = load("cuda_head.json")
for r in (h or {}).get("rows", []):
    print(f"head {r['shape']}: int8 {r['int8_us']:.1f} us ({r['int8_gbs']:.0f} GB/s), int4 {r['int4_us']:.1f} us "
          f"({r['int4_over_int8']:.2f}x int8; re-scoring {r['int4_rescore_us']:.1f} us), fp16 {r['fp16_us']:.1f} us; "
          f"int4 argmax {'=' if r['int4_argmax_is_fp16s'] else '!='} fp16's")
d = load("cuda_decode.json")
for r in (d or {}).get("rows", d if isinstance(d, list) else []):
    if isinstance(r, dict) and r.get("decode_tok_s"):
        print(f"decode {r['shape']} {r['runtime']}: {r['decode_tok_s']:.0f} tok/s, "
              f"{100 * (r.get('roofline_fraction') or 0):.0f}% of roofline, TTFT {1e3 * r['ttft_s']:.0f} ms")
        kinds = {k.removeprefix("decode_tok_s_"): v for k, v in r.items() if k.startswith("decode_tok_s_")}
        step_by_step = kinds.pop("step_by_step", None)
        if kinds:
            print("  GEMV " + ", ".join(f"{kind} {v:.0f} tok/s" for kind, v in kinds.items()))
        tuning = r.get("gemv_tuning") or {}
        if tuning:
            how = f"timed at load in {tuning['seconds']:.2f} s" if "seconds" in tuning else "read from the cache"
            print(f"  auto {how}: " + ", ".join(
                f"{role.split()[0]} {kind}" for role, kind in tuning["gemv"].items()) + on_step(tuning))
        if step_by_step:
            print(f"  run ahead {r['decode_tok_s']:.0f} tok/s, one step at a time {step_by_step:.0f} "
                  f"({r['decode_tok_s'] / step_by_step:.2f}x)")
        if r.get("prefill_path"):
            print(f"  prefill: {r['prefill_path']}")
        for rows, ms in (r.get("prefill_tuning") or {}).items():
            print(f"  {rows}-row chunk timed at first use: " + ", ".join(f"{path} {v:.2f} ms" for path, v in ms.items()))
        for n in (16, 64, 128, 256):
            ours, blas, l2 = (r.get(f"prefill_{n}_{path}_ms") for path in ("ours", "cublas", "cublas_l2"))
            if ours and blas:
                print(f"  {n}-row chunk: our kernels {ours:.2f} ms, dequantize + cuBLAS {blas:.2f} ms ({ours / blas:.2f}x)"
                      + (f", with L2-sized slabs {l2:.2f} ms" if l2 else ""))
sanitize = out / "sanitize.log"  # (each tool ends with its "ERROR SUMMARY: N errors", in the step's order)
if sanitize.exists():
    found = [line.split("ERROR SUMMARY:")[1].strip()
             for line in sanitize.read_text().splitlines() if "ERROR SUMMARY:" in line]
    tools = ", ".join(f"{tool} {n}" for tool, n in zip(("memcheck", "racecheck", "synccheck"), found))
    print("compute-sanitizer: " + (tools or "no summary (see sanitize.log)"))
SUMMARY
pack
exit "$status"
