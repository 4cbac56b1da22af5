#!/usr/bin/env bash
# Measures the compute core side by side in one run: this machine's ceilings
# (sgemm rate, read bandwidth), the Rust layer, and eager PyTorch on the same
# weights with the same thread count. Prints a Markdown table for
# docs/benchmarks.md and keeps the raw JSON in .cache/bench/results.
#
# Usage: scripts/bench-core.sh [--tokens 1,8,64,256,1024] [--seconds S]
set -euo pipefail
cd "$(dirname "$0")/.."

tokens=1,8,64,256,1024
seconds=3
while [ $# -gt 0 ]; do
    case "$1" in
        --tokens) tokens=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        *) echo "unknown option $1, expected --tokens LIST or --seconds S" >&2; exit 2 ;;
    esac
done
threads=$(nproc)
results=.cache/bench/results
mkdir -p "$results"

cargo build --release --locked -p moge-ckpt -p moge-bench
# PyPI's Linux wheel of torch pulls its CUDA libraries too (about 5 GB);
# nothing in the test suite needs this environment.
bash scripts/python-env.sh .venv-bench bench/python/requirements.txt

echo "== ceilings" >&2
RAYON_NUM_THREADS=$threads target/release/moge-bench --ceilings-only --json "$results/ceilings.json"

for preset in pangu-pro-moe small; do
    checkpoint=.cache/bench/$preset
    if [ ! -f "$checkpoint/config.json" ]; then
        target/release/moge-ckpt generate --preset "$preset" --out "$checkpoint" --layers 0..1
    fi
    for weights in stored f32; do
        echo "== moge-bench $preset, weights $weights" >&2
        RAYON_NUM_THREADS=$threads target/release/moge-bench --checkpoint "$checkpoint" \
            --tokens "$tokens" --seconds "$seconds" --weights "$weights" --no-ceilings \
            --json "$results/rust-$preset-$weights.json"
    done
    for dtype in float32 bfloat16; do
        echo "== PyTorch $preset, $dtype" >&2
        # torch's MKL otherwise runs its own OpenMP runtime beside torch's,
        # and the two spin against each other on a 2-core machine (6x slower).
        MKL_THREADING_LAYER=GNU .venv-bench/bin/python bench/python/torch_layer.py \
            --checkpoint "$checkpoint" --tokens "$tokens" --seconds "$seconds" \
            --threads "$threads" --dtype "$dtype" --json "$results/torch-$preset-$dtype.json"
    done
done
.venv-bench/bin/python bench/python/report.py "$results"
