#!/usr/bin/env bash
# Sets up both tested stacks if needed (tools/setup_env.sh) and runs the test suite: all of it on the current
# stack (.venv), then the tests marked 'compat' on the torch 2.1 stack that most mmdet 3 users have
# (.venv-torch2.1). Extra arguments go to both pytest runs; DAT_MM_TEST_STACKS=current (or torch2.1) runs one.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACKS=${DAT_MM_TEST_STACKS:-current torch2.1}
for stack in $STACKS; do DAT_MM_STACK=$stack bash "$ROOT/tools/setup_env.sh"; done
cd "$ROOT"
status=0
for stack in $STACKS; do
  case "$stack" in
    current) venv=.venv; select=() ;;
    torch2.1) venv=.venv-torch2.1; select=(-m compat) ;;
  esac
  echo "[tests] stack $stack: $("$ROOT/$venv/bin/python" -c 'import torch; print("torch", torch.__version__)')"
  set +e
  # No path given: pytest.ini's testpaths (tests/); a path or -k in the arguments narrows it.
  "$ROOT/$venv/bin/python" -m pytest -p no:cacheprovider ${select[@]+"${select[@]}"} "$@"
  rc=$?
  set -e
  # pytest exits 5 when it collects nothing, e.g. a -k filter that matches no test: not a failure.
  if [ "$rc" -eq 5 ]; then echo "[tests] stack $stack: no tests collected"; rc=0; fi
  [ "$rc" -eq 0 ] || status=$rc
done
exit "$status"
