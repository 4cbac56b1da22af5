#!/usr/bin/env bash
# Installs Triton's perf_analyzer into .cache/perf-analyzer and prints the
# path of a wrapper that runs it. PyPI's `perf-analyzer` 0.1.0 is an empty
# placeholder, so the binary comes from the manylinux wheel of
# tritonclient 2.40.0, the last one that ships it. It links libb64 (Debian's
# libb64-0d) and libcudart.so.12 (PyPI's nvidia-cuda-runtime-cu12) but runs
# without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

dir=.cache/perf-analyzer
wrapper=$PWD/$dir/perf_analyzer
if [ -x "$wrapper" ]; then
    echo "$wrapper"
    exit 0
fi
mkdir -p "$dir"
if ! ldconfig -p | grep -q libb64.so.0d; then
    sudo=(); [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    echo "installing libb64-0d from Debian's packages" >&2
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq libb64-0d >/dev/null
fi
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
    -d "$dir/wheels" tritonclient==2.40.0 >&2
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
    -d "$dir/wheels" nvidia-cuda-runtime-cu12==12.9.79 >&2
python3 -m zipfile -e "$dir"/wheels/tritonclient-2.40.0-*.whl "$dir/tritonclient"
python3 -m zipfile -e "$dir"/wheels/nvidia_cuda_runtime_cu12-*.whl "$dir/cudart"
chmod +x "$dir/tritonclient/tritonclient-2.40.0.data/data/bin/perf_analyzer"
cat > "$wrapper" <<WRAPPER
#!/usr/bin/env bash
export LD_LIBRARY_PATH="$PWD/$dir/cudart/nvidia/cuda_runtime/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$PWD/$dir/tritonclient/tritonclient-2.40.0.data/data/bin/perf_analyzer" "\$@"
WRAPPER
chmod +x "$wrapper"
echo "$wrapper"
