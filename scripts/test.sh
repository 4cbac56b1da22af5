#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy, the Rust
# unit, property and integration tests, and the Python float64 reference
# tests against the release binaries. Installs what it needs (a Python
# virtual environment in .venv, Debian's prometheus package) on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (release profile, warnings are errors)"
cargo clippy --workspace --all-targets --release --locked -- -D warnings

step "cargo build (release binaries for the Python tests)"
cargo build --workspace --release --locked

step "cargo test (release profile)"
cargo test --workspace --release --locked

step "Python environment"
bash scripts/python-env.sh

step "Prometheus server and promtool (Debian packages)"
bash scripts/prometheus.sh

step "Python float64 reference tests"
MOGE_CKPT="$PWD/target/release/moge-ckpt" .venv/bin/python -m pytest -q tests/python
