#!/usr/bin/env bash
# Sets up .venv if needed (tools/setup_env.sh) and runs the test suite; extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
set +e
"$ROOT/.venv/bin/python" -m pytest tests -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collects nothing, e.g. a -k filter that matches no test: not a failure.
if [ "$rc" -eq 5 ]; then echo "[tests] no tests collected"; exit 0; fi
exit "$rc"
