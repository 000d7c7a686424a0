#!/usr/bin/env bash
# Set up (first run only) and serve the example models on http://127.0.0.1:8000.
# Extra arguments go to `omni-runtime serve`, e.g. --port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/omni-runtime serve examples "$@"
