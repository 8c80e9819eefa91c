#!/usr/bin/env bash
# The GPU check: tests/test_cuda.py, then benchmark.py on CUDA (both attention plans, batch 2, fp32, bf16 and
# fp16), about 8 minutes on one H100/H200. Results go to $OUT (or work_dirs/gpu_check): the pytest log, the
# benchmark tables, and the JSON reports of test_cuda.py.
#
#   bash tools/analysis/gpu_check.sh                 # on the GPU machine; without CUDA: a dry run, exit 0
#   bash tools/analysis/gpu_check.sh --fetch-wheels  # beforehand, where PyPI is reachable: the pure-Python
#                                                    # wheels a machine with torch alone lacks, into .whl/
#
# A machine with torch, pytest and timm but no OpenMMLab packages (and no package index) needs mmengine and
# mmcv-lite: wheels found in .whl/ are installed into a private folder first. mmcv-lite has no compiled ops,
# which the backbone does not need; mmdet is then missing, and Swin-T comes from timm.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
WHEELS="$ROOT/.whl"
OUT_DIR=${OUT:-$ROOT/work_dirs/gpu_check}
PY=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}

if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
    mmengine==0.10.7 mmcv-lite==2.1.0 addict termcolor yapf platformdirs
  echo "[gpu_check] wheels in $WHEELS: carry it to the GPU machine with the checkout"
  exit 0
fi

TESTS=("$PY" -m pytest -p no:cacheprovider -q -rs -s tests/test_cuda.py)
BENCH=("$PY" tools/analysis/benchmark.py --device cuda --sizes 1344x800 --batch 2
       --models 'DAT-T++ fast' 'DAT-T (1,1,2,1) fast' Swin-T --plans device cpu)
BENCH_RUNS=("--modes fwd fwd+bwd --dtypes fp32 bf16" "--modes fwd+bwd --dtypes fp16")

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "[gpu_check] dry run: $PY sees no CUDA device. On a GPU machine this script would run, from $ROOT:"
  [ -d "$WHEELS" ] && echo "  pip install --no-index --no-deps --target <tmp> $WHEELS/*.whl (then PYTHONPATH=<tmp>:$ROOT)"
  echo "  DAT_MM_GPU_REPORT=$OUT_DIR ${TESTS[*]}"
  for run in "${BENCH_RUNS[@]}"; do echo "  ${BENCH[*]} $run"; done
  exit 0
fi

mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 DAT_MM_GPU_REPORT="$OUT_DIR" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import mmengine, mmcv' 2>/dev/null; then
  [ -d "$WHEELS" ] || { echo "[gpu_check] mmengine/mmcv are missing and there is no $WHEELS (see --fetch-wheels)" >&2; exit 1; }
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
"$PY" - <<'PY'
import torch
print(f'[gpu_check] {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}', flush=True)
PY
start=$SECONDS
status=0
timeout 330 "${TESTS[@]}" 2>&1 | tee "$OUT_DIR/test_cuda.log" || status=1
echo "[gpu_check] tests: $((SECONDS - start)) s"
for run in "${BENCH_RUNS[@]}"; do
  # shellcheck disable=SC2086  # each run's options are words
  timeout 240 "${BENCH[@]}" $run 2>&1 | tee -a "$OUT_DIR/benchmark.md" || status=1
done
echo "[gpu_check] done in $((SECONDS - start)) s; results in $OUT_DIR"
exit "$status"
