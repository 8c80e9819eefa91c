#!/usr/bin/env bash
# Sets up .venv if needed (tools/setup_env.sh) and runs the test suite; extra arguments go to pytest.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
set +e
# No path given: pytest.ini's testpaths (tests/); a path or -k in the arguments narrows it.
"$ROOT/.venv/bin/python" -m pytest -p no:cacheprovider "$@"
rc=$?
set -e
# pytest exits 5 when it collects nothing, e.g. a -k filter that matches no test: not a failure.
if [ "$rc" -eq 5 ]; then echo "[tests] no tests collected"; exit 0; fi
exit "$rc"
