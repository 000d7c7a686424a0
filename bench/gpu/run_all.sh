#!/usr/bin/env bash
# Validates libomnicuda on a machine with a real GPU: build, GPU tests, then the density bench.
# Usage: bench/gpu/run_all.sh   (from anywhere; uses $PYTHON or the repo's .venv if present)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

echo "== building libomnicuda"
"$python" -m pip install -q -e cstub
"$python" -c 'import omni_cstub; print(omni_cstub.library_path())'

if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
else
    echo "nvidia-smi not found: the GPU tests below will skip unless cuInit succeeds"
fi

echo "== CPU tests against the fake driver"
"$python" -m pytest tests/cstub -q

if [[ -d tests/gpu ]]; then
    echo "== GPU tests"
    "$python" -m pytest tests/gpu -q -rs
fi

if [[ -f bench/gpu/density.py ]]; then
    echo "== density benchmark"
    "$python" bench/gpu/density.py "$@"
else
    echo "bench/gpu/density.py is not there yet; skipping the density benchmark"
fi

echo "== hook overhead against the fake driver"
"$python" bench/hooks.py
