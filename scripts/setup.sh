#!/usr/bin/env bash
# Create .venv with omni-sdk, omni-runtime, the example models and the dev tools.
# Safe to run again: it reinstalls only when a pyproject.toml or requirements file changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
    echo "omni setup: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi

# etcd for the fleet's tests (tests/fleet_etcd.py): Debian's etcd-server, when we may install it.
# Never a reason for setup to fail: without it the fleet tests are skipped.
if ! command -v etcd >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "omni setup: installing etcd-server (the fleet's store) with apt-get"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -q etcd-server >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 \
                && apt-get install -y -q etcd-server >/dev/null 2>&1; } \
            || true
    fi
    command -v etcd >/dev/null 2>&1 \
        || echo "omni setup: etcd is not installed; the fleet tests will be skipped"
fi

stamp="$VENV/.omni-installed"
want=$(cat pyproject.toml runtime/pyproject.toml cstub/pyproject.toml cstub/setup.py \
    engines/*/pyproject.toml examples/*/pyproject.toml requirements-dev.txt \
    | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "omni setup: installing packages into $VENV (the first run takes a few minutes)"
"$VENV/bin/python" -m pip --disable-pip-version-check -q install --upgrade pip
# The CPU build of torch: pip takes it from this machine's wheel cache, where uv would
# download a multi-GB CUDA build. Installed first, so nothing later asks for another.
"$VENV/bin/python" -m pip --disable-pip-version-check -q install "torch==2.13.0"
# The base layer every model environment shares: Omni itself, the engines and their frameworks
# (onnxruntime-gpu runs on the CPU where no GPU is usable), the CUDA hooks (compiled here), and
# the examples, so their requirements are already satisfied when the runtime builds their envs.
"$VENV/bin/python" -m pip --disable-pip-version-check -q install \
    -e . -e runtime -e cstub -e engines/torch -e engines/onnx -e engines/triton \
    -e examples/embeddings-minilm -e examples/embeddings-minilm-torch \
    -e examples/embeddings-minilm-onnx -r requirements-dev.txt
"$VENV/bin/python" -c "import omni_runtime, omni_cstub, omni_engine_torch, omni_engine_onnx, \
omni_engine_triton, omni_example_minilm, onnxruntime, torch" \
    || { echo "omni setup: the install is incomplete" >&2; exit 1; }
echo "$want" > "$stamp"
echo "omni setup: done"
