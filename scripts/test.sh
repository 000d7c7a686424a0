#!/usr/bin/env bash
# Set up (first run only), then lint, type-check and run every test. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy"
mypy
echo "== pytest"
python -m pytest "$@"
if [ "$#" -eq 0 ]; then
    # Its tests share one runtime: run them backwards too, so none leans on another's state.
    echo "== pytest tests/e2e/test_ai_run.py, in reverse order"
    python -m pytest -q --reverse tests/e2e/test_ai_run.py
fi
