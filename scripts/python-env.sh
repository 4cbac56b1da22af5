#!/usr/bin/env bash
# Create .venv at the repository root and install tests/python/requirements.txt
# into it. The script is safe to run repeatedly, because pip runs only when the
# requirements file differs from the copy stored in .venv at the last
# successful install.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
requirements="$repo_root/tests/python/requirements.txt"
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
