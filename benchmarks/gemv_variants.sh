#!/usr/bin/env bash
# benchmarks/gemv.py on variants of the decode GEMV, one after the other in one run:
#
#     bash benchmarks/gemv_variants.sh DIR NAME...     # DIR/gemv_w4a16_NAME.cu for each NAME
#
# Each variant runs in its own copy of the tree (/tmp/gemv-variant-NAME) with
# plugins/kernels/gemv_w4a16.cu replaced, so the kernel library is built from its sources.
# Results land in $OUT (the device tool) or benchmarks/results/gemv-variants/ as
# gemv-NAME.json and gemv-NAME.log. Compare variants measured in the same run only.
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: bash benchmarks/gemv_variants.sh DIR NAME..." >&2; exit 2; }
dir=$(cd "$1" && pwd) || exit 2
shift
out="${OUT:-$PWD/benchmarks/results/gemv-variants}"
mkdir -p "$out"
for name in "$@"; do
    src="$dir/gemv_w4a16_$name.cu"
    [ -f "$src" ] || { echo "error: $src not found" >&2; exit 2; }
    tree="/tmp/gemv-variant-$name"
    rm -rf "$tree" && mkdir -p "$tree" && cp -r awq_edge benchmarks plugins "$tree/"
    cp "$src" "$tree/plugins/kernels/gemv_w4a16.cu"
    echo "== variant $name"
    (cd "$tree" && PYTHONPATH="$tree" python3 benchmarks/gemv.py --output "$out/gemv-$name.json" 2>&1 \
        | tee "$out/gemv-$name.log")
done
