#!/usr/bin/env bash
# Measures the whole serving path side by side in one run. The parts are the
# layer in process, the embedded stack, the services as separate processes,
# Triton's perf_analyzer, and a KServe Python model server with PyTorch on
# the same checkpoint. It also compares telemetry on and off, and MoGE
# against top-K with every group capped to an equal CPU share. Prints Markdown for docs/benchmarks.md and
# keeps the raw JSON and logs in .cache/bench/e2e.
#
# Usage: scripts/bench-e2e.sh [--decode-requests N] [--prefill-requests N] [--group-cpu-share F]
# The CPU caps need a writable cgroup v1 cpu controller (/sys/fs/cgroup/cpu),
# usually root; without one the balance run is uncapped and says so.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked -p moge-gateway -p moge-router -p moge-expert -p moge-ckpt -p moge-bench -p moge-load
# PyPI's Linux wheel of torch pulls its CUDA libraries too (about 5 GB);
# nothing in the test suite needs this environment.
bash scripts/python-env.sh .venv-bench bench/python/requirements.txt
PERF_ANALYZER=$(bash scripts/perf-analyzer.sh)
export PERF_ANALYZER
# PyTorch's f32 path runs several times slower with MKL's default threading
# layer on this kind of machine.
export MKL_THREADING_LAYER=GNU
.venv-bench/bin/python bench/python/e2e.py "$@"
