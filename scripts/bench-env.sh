#!/usr/bin/env bash
# Creates .venv-bench with PyTorch (CPU use only) for the benchmark scripts.
# PyPI's Linux wheel of torch pulls its CUDA libraries too (about 5 GB);
# nothing in the test suite needs this environment.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-bench
requirements=bench/python/requirements.txt
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
stamp="$venv/.requirements.sha256"
wanted=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
    echo "$wanted" > "$stamp"
fi
