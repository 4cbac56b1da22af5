#!/usr/bin/env bash
# Installs the Prometheus server and promtool from Debian's packages when
# they are missing, for the telemetry tests. Debian's package does not start
# the server where no init system runs; the tests start their own on loopback.
set -euo pipefail

if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null; then
    sudo=(sudo)
else
    echo "error: prometheus is missing and installing it needs root; run: apt-get install prometheus" >&2
    exit 1
fi
echo "installing prometheus from Debian's packages" >&2
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends prometheus >/dev/null
prometheus --version 2>&1 | head -n 1 >&2
