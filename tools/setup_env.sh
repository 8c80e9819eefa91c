#!/usr/bin/env bash
# Builds .venv with the pinned OpenMMLab stack (facts behind each pin: ../shared/spec/ENVIRONMENT.md).
# Idempotent: a venv whose stamp matches this script and setup.py is left alone, and the compiled mmcv
# wheel is kept in DAT_MM_WHEEL_CACHE so a new clone never compiles it again.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${DAT_MM_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
WHEEL_CACHE=${DAT_MM_WHEEL_CACHE:-$HOME/.cache/dat_mm/wheels}
TORCH_VERSION=2.13.0
MMCV_VERSION=2.1.0

stamp_of() { cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.py" | sha256sum | cut -c1-16; }
STAMP=$(stamp_of)
if [ -f "$VENV/.dat_mm_stamp" ] && [ "$(cat "$VENV/.dat_mm_stamp")" = "$STAMP" ] \
   && "$VENV/bin/python" -c "import dat_mm, mmcv.ops, mmdet, mmseg" 2>/dev/null; then
  echo "[setup] $VENV is up to date"
  exit 0
fi

t0=$SECONDS
log() { echo "[setup +$((SECONDS - t0))s] $*"; }

[ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

# torch first: anything that depends on torch would otherwise pull the newest CUDA build.
log "torch==$TORCH_VERSION"
"${PIP[@]}" "torch==$TORCH_VERSION"
# mmcv 2.1.0's setup.py imports pkg_resources, gone from setuptools >= 81.
"${PIP[@]}" "setuptools>=77,<81" ninja wheel "mmengine==0.10.7"

# The compiled ops depend on the exact torch build (CPU or CUDA), so the cache is keyed by it.
TORCH_TAG=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+', '_'))")
MMCV_DIR="$WHEEL_CACHE/mmcv-$MMCV_VERSION-torch$TORCH_TAG"
if ! ls "$MMCV_DIR"/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1; then
  log "compiling mmcv $MMCV_VERSION with ops (about 9 minutes on 2 cores); cached in $MMCV_DIR"
  mkdir -p "$MMCV_DIR.tmp"
  # No build isolation: an isolated build env would fetch another torch and silently skip the ops.
  MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$VENV/bin/python" -m pip wheel -q --no-deps \
    --no-build-isolation --no-binary mmcv -w "$MMCV_DIR.tmp" "mmcv==$MMCV_VERSION"
  rm -rf "$MMCV_DIR" && mv "$MMCV_DIR.tmp" "$MMCV_DIR"
fi
log "mmcv from $MMCV_DIR"
"${PIP[@]}" "$MMCV_DIR"/mmcv-$MMCV_VERSION-*.whl

log "mmdet, mmsegmentation, dat_mm"
# mmsegmentation 1.2.2 imports ftfy and regex without declaring them.
"${PIP[@]}" "mmdet==3.3.0" "mmsegmentation==1.2.2" ftfy regex pycocotools matplotlib pytest
# openmim for `mim train`. Its opendatalab dependency pins setuptools 60 (below torch's >= 77) and only
# serves `mim download`, so it is left out.
"${PIP[@]}" --no-deps "openmim==0.3.9"
"${PIP[@]}" click colorama model-index pandas requests rich tabulate
"${PIP[@]}" --no-deps -e "$ROOT"

"$VENV/bin/python" - <<'PY'
import torch, mmcv, mmengine, mmdet, mmseg
from mmcv.ops import nms  # noqa: F401  (fails here if the ops were not compiled)
print(f"[setup] torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}")
PY
echo "$STAMP" > "$VENV/.dat_mm_stamp"
log "done"
