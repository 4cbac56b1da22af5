#!/usr/bin/env bash
# Create a virtual environment and install a requirements file into it.
#
# Usage: scripts/python-env.sh [VENV REQUIREMENTS]
# Defaults: .venv and tests/python/requirements.txt (the test suite's). The
# benchmarks use .venv-bench and bench/python/requirements.txt. The script is
# safe to run repeatedly, because pip runs only when the requirements file
# differs from the copy stored in the environment at the last successful
# install.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/${1:-.venv}"
requirements="$repo_root/${2:-tests/python/requirements.txt}"
stamp="$venv/.requirements.installed"

if [[ ! -x "$venv/bin/python" ]]; then
    python3 -m venv "$venv"
    rm -f "$stamp"
fi

if [[ -f "$stamp" ]] && cmp -s "$requirements" "$stamp"; then
    exit 0
fi

"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
cp "$requirements" "$stamp"
