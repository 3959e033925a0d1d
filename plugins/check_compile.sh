#!/usr/bin/env bash
# Compile checks that need no GPU (CI runs them through tests/test_cuda_compile.py).
#
#   plugins/check_compile.sh kernels [ARCH ...]   compile every plugins/kernels/*.cu for each
#                                                 arch (default: 87 89 90); warnings, register
#                                                 spills and local-memory use are errors
#   plugins/check_compile.sh trt                  compile plugins/trt/*.cpp against the headers
#                                                 in $TENSORRT_ROOT/include (skips with a
#                                                 message and exit 0 when they are absent)
#
# One nvcc invocation per file and arch, up to $JOBS at once (default: number of cores).
# Objects go to a temp dir that is removed afterwards. With KEEP_PTX=DIR set, each file's PTX
# stays as DIR/sm_ARCH/NAME.ptx (the PDL contract test reads it: the same front end's output,
# not compiled a second time).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
mode="${1:-kernels}"
shift || true
NVCC="${NVCC:-nvcc}"
CXX="${CXX:-g++}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

cuda_include() {
    # cuda_fp16.h / cuda_runtime_api.h for host-only compiles: $CUDA_HOME, next to nvcc, or /usr/local/cuda.
    local nvcc_root=""
    command -v "$NVCC" > /dev/null && nvcc_root="$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")"
    for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "$nvcc_root" /usr/local/cuda; do
        if [ -n "$root" ] && [ -f "$root/include/cuda_runtime_api.h" ]; then echo "$root/include"; return; fi
    done
    echo "/usr/local/cuda/include"
}

compile_kernel() {
    # One file for one arch. -Werror all-warnings covers nvcc, the host compiler and ptxas
    # warnings; -warn-spills / -warn-lmem-usage make ptxas warn (hence fail) on spills.
    local arch="$1" src="$2" name keep=()
    name="$(basename "$src" .cu)"
    if [ -n "${KEEP_PTX:-}" ]; then mkdir -p "$work/keep_$arch/$name"; keep=(-keep -keep-dir "$work/keep_$arch/$name"); fi
    "$NVCC" -std=c++17 -O3 -c \
        -gencode "arch=compute_$arch,code=sm_$arch" \
        -Xcompiler -Wall,-Wextra \
        -Xptxas -warn-spills,-warn-lmem-usage \
        -Werror all-warnings \
        -I "$here/kernels" \
        -o "$work/sm_$arch/$name.o" "${keep[@]}" "$src" \
        > "$work/sm_$arch/$name.log" 2>&1 \
        || { echo "FAIL sm_$arch $name.cu:"; cat "$work/sm_$arch/$name.log"; touch "$work/sm_$arch/failed"; }
}

case "$mode" in
kernels)
    command -v "$NVCC" > /dev/null || { echo "SKIP: nvcc not found (set NVCC or put CUDA on PATH)"; exit 0; }
    archs=("$@")
    [ ${#archs[@]} -gt 0 ] || archs=(87 89 90)
    "$NVCC" --version | tail -n 2
    # One job per (arch, file), up to $JOBS at once, largest files first: two files take most of
    # the time, and one nvcc call per arch would leave a core idle while the third arch compiles.
    mapfile -t sources < <(ls -S "$here"/kernels/*.cu)
    running=0
    for src in "${sources[@]}"; do
        for arch in "${archs[@]}"; do
            mkdir -p "$work/sm_$arch"
            if [ "$running" -ge "$JOBS" ]; then wait -n; running=$((running - 1)); fi
            compile_kernel "$arch" "$src" &
            running=$((running + 1))
        done
    done
    wait
    status=0
    for arch in "${archs[@]}"; do
        if [ -e "$work/sm_$arch/failed" ]; then status=1; continue; fi
        if [ -n "${KEEP_PTX:-}" ]; then mkdir -p "$KEEP_PTX/sm_$arch"; cp "$work/keep_$arch"/*/*.ptx "$KEEP_PTX/sm_$arch/"; fi
        echo "ok   sm_$arch: ${#sources[@]} files"
    done
    exit $status
    ;;
trt)
    root="${TENSORRT_ROOT:-}"
    if [ -z "$root" ] || [ ! -f "$root/include/NvInferRuntime.h" ]; then
        echo "SKIP: TensorRT headers not found (set TENSORRT_ROOT to a dir with include/NvInferRuntime.h)"
        exit 0
    fi
    # TensorRT and CUDA headers are -isystem: their own deprecation warnings are not ours.
    for src in "$here"/trt/*.cpp; do
        "$CXX" -std=c++17 -Wall -Wextra -Werror -fPIC -c \
            -I "$here/kernels" -isystem "$root/include" -isystem "$(cuda_include)" \
            -o "$work/$(basename "$src").o" "$src"
    done
    version="$(printf '#include <NvInferVersion.h>\nNV_TENSORRT_MAJOR.NV_TENSORRT_MINOR.NV_TENSORRT_PATCH\n' \
        | "$CXX" -E -P -x c++ -I "$root/include" - 2>/dev/null | tail -n 1 | tr -d ' ')"
    echo "TensorRT headers: ${version:-unknown version} ($root/include)"
    echo "ok   trt: $(ls "$here"/trt/*.cpp | wc -l) files"
    ;;
*)
    echo "usage: $0 kernels [ARCH ...] | trt" >&2
    exit 2
    ;;
esac
