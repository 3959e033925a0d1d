#!/usr/bin/env bash
# Every GPU check in one command, for a session that is lent a GPU machine (the `device` tool's
# `run`, which starts in the repo root with $OUT set) or any machine with an NVIDIA GPU:
#
#     bash benchmarks/gpu_check.sh            # results under $OUT, else benchmarks/results/gpu-check
#
# The lent machine is bare and offline, but its python3 has numpy, pytest, cmake, nvcc, torch and
# transformers, which is all these need (no venv, no install: PYTHONPATH=.). Steps: the GPU, the
# kernel library build, the kernel tests, the quantizer on the GPU, then the GEMV/GEMM benchmark.
# Each step's log lands beside the results, and a failing step does not stop the later ones (the
# exit code is the first failure's).
# On an H100 the whole run takes about a minute (2026-11-23). Commit the JSON and the logs' numbers.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu-check}"
mkdir -p "$out"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 AWQ_EDGE_CACHE="${AWQ_EDGE_CACHE:-/tmp/awq-edge-cache}"
status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember the first failure
    echo "== $1"
    "${@:2}" 2>&1 | tee "$out/$1.log"
    local rc=${PIPESTATUS[0]}
    echo "== $1: exit $rc"
    [ "$status" -ne 0 ] || status=$rc
}

step gpu bash -c 'nvidia-smi || exit; nvcc --version | tail -2
    python3 -c "from awq_edge import plugins; print(\"TensorRT headers:\", plugins.tensorrt_include_dir())"
    python3 -c "import tensorrt; print(\"tensorrt\", tensorrt.__version__)" 2>&1 | tail -1'
step build python3 -c "from awq_edge import plugins; from awq_edge.cuda_runtime import find_gpus; \
gpus = find_gpus(); assert gpus, 'no NVIDIA GPU found'; print(gpus[0]); print(plugins.build_kernel_library(gpus[0].arch))"
step tests python3 -m pytest -q -s -m gpu -p no:cacheprovider tests/test_kernels_gpu.py  # -s: each case's error
step quantize python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_quantize_gpu.py
step gemv python3 benchmarks/gemv.py --output "$out/gemv.json"
exit "$status"
