#!/usr/bin/env bash
# The demo: sets up .venv if needed (tools/setup_env.sh), then runs tools/demo.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
"$ROOT/.venv/bin/python" tools/demo.py "$@"
