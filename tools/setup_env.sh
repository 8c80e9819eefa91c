#!/usr/bin/env bash
# Builds .venv with the pinned OpenMMLab stack (why each pin: docs/installation.md).
# Idempotent: a venv whose stamp matches this script and setup.py is left alone, and the compiled mmcv
# wheel is kept in DAT_MM_WHEEL_CACHE so a new clone never compiles it again.
#
# With a CUDA build of torch and a visible GPU, mmcv is compiled with its CUDA ops for TORCH_CUDA_ARCH_LIST (the
# GPU's compute capability unless set); FORCE_CUDA=1 does so without a GPU (a build node), for
# DAT_MM_DEFAULT_CUDA_ARCHS (V100 to H100) unless TORCH_CUDA_ARCH_LIST is set. A CUDA torch without a visible GPU
# otherwise gets CPU ops, as mmcv's own build does: PyPI's Linux torch is a CUDA build, also on CPU machines.
# DAT_MM_SETUP_DRY_RUN=1 prints the mmcv build it would run and stops; DAT_MM_ASSUME_CUDA=<version>
# pretends torch is a CUDA build of that version (both only for checking this script on a CPU machine).
#
# DAT_MM_STACK picks the stack: 'current' (default; torch 2.13 in .venv) or 'torch2.1' (in .venv-torch2.1), the
# stack most mmdet 3 users have: torch 2.1.2 with numpy < 2, and the same mmcv, mmengine, mmdet and mmseg; the
# tests run there are marked 'compat'.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STACK=${DAT_MM_STACK:-current}
PY=${PYTHON:-python3.11}
WHEEL_CACHE=${DAT_MM_WHEEL_CACHE:-$HOME/.cache/dat_mm/wheels}
DRY_RUN=${DAT_MM_SETUP_DRY_RUN:-0}
DEFAULT_CUDA_ARCHS=${DAT_MM_DEFAULT_CUDA_ARCHS:-7.0;7.5;8.0;8.6;8.9;9.0}
MMCV_VERSION=2.1.0
case "$STACK" in
  current) TORCH_VERSION=2.13.0; VENV=${DAT_MM_VENV:-$ROOT/.venv}; NUMPY='numpy' ;;
  torch2.1) TORCH_VERSION=2.1.2; VENV=${DAT_MM_VENV:-$ROOT/.venv-torch2.1}; NUMPY='numpy<2' ;;
  *) echo "[setup] DAT_MM_STACK=$STACK: expected 'current' or 'torch2.1'" >&2; exit 2 ;;
esac

t0=$SECONDS
log() { echo "[setup +$((SECONDS - t0))s] $*"; }
# The deformable attention's CPU kernels, built here so that no training run compiles them; kept outside the
# venv, per machine and torch version (dat_mm/models/layers/deformable_bias.py), so checked on every run.
build_kernels() {
  local start=$SECONDS
  if ! "$VENV/bin/python" -c "import dat_mm.models.layers.deformable_bias as k; k.main()"; then
    echo "[setup] the CPU kernels did not build (see the warning above): DAT runs on CPU with the slower grid_sample lookup"
  elif [ $((SECONDS - start)) -gt 10 ]; then
    log "CPU kernels built in $((SECONDS - start)) s"
  fi
}

stamp_of() { { echo "$STACK"; cat "$ROOT/tools/setup_env.sh" "$ROOT/setup.py"; } | sha256sum | cut -c1-16; }
STAMP=$(stamp_of)
if [ "$DRY_RUN" != 1 ] && [ -f "$VENV/.dat_mm_stamp" ] && [ "$(cat "$VENV/.dat_mm_stamp")" = "$STAMP" ] \
   && "$VENV/bin/python" -c "import dat_mm, mmcv.ops, mmdet, mmseg; dat_mm.DAT" 2>/dev/null; then
  build_kernels
  echo "[setup] $VENV is up to date"
  exit 0
fi
# Every install below keeps torch and numpy where the stack pins them: mmdet's or mmseg's requirements
# would otherwise be free to replace either.
CONSTRAINTS="$VENV/dat_mm-constraints.txt"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c "$CONSTRAINTS")

if [ "$DRY_RUN" != 1 ]; then
  [ -x "$VENV/bin/python" ] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
  printf 'torch==%s\n%s\n' "$TORCH_VERSION" "$NUMPY" > "$CONSTRAINTS"
  # torch first: anything that depends on torch would otherwise pull the newest CUDA build.
  log "torch==$TORCH_VERSION"
  "${PIP[@]}" "torch==$TORCH_VERSION" "$NUMPY"
  # mmcv 2.1.0's setup.py imports pkg_resources, gone from setuptools >= 81.
  "${PIP[@]}" "setuptools>=77,<81" ninja wheel "mmengine==0.10.7"
fi

# The compiled ops depend on the exact torch build and, for CUDA, on the toolkit and the GPU
# architectures, so the cache key holds all three.
TORCH_TAG=$("$VENV/bin/python" -c "import torch; print(torch.__version__.replace('+', '_'))")
TORCH_CUDA=${DAT_MM_ASSUME_CUDA:-$("$VENV/bin/python" -c "import torch; print(torch.version.cuda or '')")}
BUILD_ENV=(MMCV_WITH_OPS=1 "MAX_JOBS=${MAX_JOBS:-$(nproc)}")
MMCV_DIR="$WHEEL_CACHE/mmcv-$MMCV_VERSION-torch$TORCH_TAG"
GPU_VISIBLE=$("$VENV/bin/python" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [ -n "$TORCH_CUDA" ] && [ "$GPU_VISIBLE" = 0 ] && [ "${FORCE_CUDA:-0}" != 1 ]; then
  log "torch is a CUDA $TORCH_CUDA build, but no GPU is visible: mmcv's ops are compiled for the CPU" \
      "(FORCE_CUDA=1 compiles its CUDA ops instead)"
  MMCV_DIR="$MMCV_DIR-cpu-ops"
elif [ -n "$TORCH_CUDA" ]; then
  # torch's own search order would take /usr/local for an nvcc wrapper script in /usr/local/bin.
  CUDA_ROOT=${CUDA_HOME:-}
  if [ -z "$CUDA_ROOT" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_ROOT=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_ROOT=$(dirname "$(dirname "$(command -v nvcc)")"); fi
  fi
  if [ -z "$CUDA_ROOT" ] || [ ! -x "$CUDA_ROOT/bin/nvcc" ]; then
    echo "[setup] torch is a CUDA $TORCH_CUDA build, but nvcc was not found (CUDA_HOME=${CUDA_HOME:-unset}," >&2
    echo "[setup] /usr/local/cuda, PATH). mmcv's CUDA ops (RoIAlign, nms on GPU tensors) need it: install the" >&2
    echo "[setup] CUDA $TORCH_CUDA toolkit (e.g. the cuda-nvcc-${TORCH_CUDA/./-} package), set CUDA_HOME, run this again." >&2
    exit 1
  fi
  ARCHS=${TORCH_CUDA_ARCH_LIST:-$("$VENV/bin/python" -c "import torch
if torch.cuda.is_available():
    print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || true)}
  ARCHS=${ARCHS:-$DEFAULT_CUDA_ARCHS}
  BUILD_ENV+=(FORCE_CUDA=1 "TORCH_CUDA_ARCH_LIST=$ARCHS" "CUDA_HOME=$CUDA_ROOT")
  MMCV_DIR="$MMCV_DIR-cuda$TORCH_CUDA-sm${ARCHS//[;. ]/_}"
fi
# --no-cache-dir: pip's own wheel cache keys a built mmcv by its source alone and would hand back a wheel
# compiled against another torch (or without CUDA ops) in a second-long "build".
BUILD=(env "${BUILD_ENV[@]}" "$VENV/bin/python" -m pip wheel -v --no-deps --no-build-isolation --no-cache-dir
       --no-binary mmcv -w "$MMCV_DIR.tmp" "mmcv==$MMCV_VERSION")
if [ "$DRY_RUN" = 1 ]; then
  echo "[setup] dry run: would build into $MMCV_DIR"
  echo "[setup] dry run: ${BUILD[*]}"
  exit 0
fi

if ! ls "$MMCV_DIR"/mmcv-$MMCV_VERSION-*.whl >/dev/null 2>&1; then
  log "compiling mmcv $MMCV_VERSION with ops (${BUILD_ENV[*]}; 10-30 min on 2 cores); cached in $MMCV_DIR"
  rm -rf "$MMCV_DIR.tmp" && mkdir -p "$MMCV_DIR.tmp"
  BUILD_LOG="$MMCV_DIR.tmp/build.log"
  # No build isolation: an isolated build env would fetch another torch and silently skip the ops.
  "${BUILD[@]}" >"$BUILD_LOG" 2>&1 &
  build_pid=$!
  # ninja numbers each compile step [done/total]; report the latest every 30 s.
  while kill -0 "$build_pid" 2>/dev/null; do
    for _ in $(seq 30); do kill -0 "$build_pid" 2>/dev/null && sleep 1; done
    kill -0 "$build_pid" 2>/dev/null || break
    step=$(grep -o '^ *\[[0-9]*/[0-9]*\]' "$BUILD_LOG" | tail -n 1 | tr -d '[] ' || true)
    log "compiling mmcv: ${step:-0/?} objects compiled"
  done
  if ! wait "$build_pid"; then
    tail -n 40 "$BUILD_LOG" >&2
    echo "[setup] mmcv build failed; full log: $BUILD_LOG" >&2
    exit 1
  fi
  rm -f "$BUILD_LOG" && rm -rf "$MMCV_DIR" && mv "$MMCV_DIR.tmp" "$MMCV_DIR"
fi
log "mmcv from $MMCV_DIR"
"${PIP[@]}" "$MMCV_DIR"/mmcv-$MMCV_VERSION-*.whl

log "mmdet, mmsegmentation, dat_mm"
# mmsegmentation 1.2.2 imports ftfy and regex without declaring them.
"${PIP[@]}" "mmdet==3.3.0" "mmsegmentation==1.2.2" ftfy regex pycocotools matplotlib pytest
# The deploy extra (tools/export_onnx.py and its test), tested on the current stack only.
if [ "$STACK" = current ]; then "${PIP[@]}" "onnx==1.23.2" "onnxruntime==1.32.0"; fi
# openmim for `mim train`, after the dependencies it uses. Its opendatalab dependency pins setuptools 60
# (below torch's >= 77) and only serves `mim download`, so it is left out, and pip is told not to report it
# missing; conflicts elsewhere are still reported by the installs above.
"${PIP[@]}" click colorama model-index pandas requests rich tabulate
"${PIP[@]}" --no-deps --no-warn-conflicts "openmim==0.3.9"
"${PIP[@]}" --no-deps -e "$ROOT"
# mim reads an installed package's configs and tools from <site-packages>/dat_mm/.mim: links to this checkout.
"$VENV/bin/python" "$ROOT/tools/link_mim_files.py"

"$VENV/bin/python" - <<'PY'
import torch, mmcv, mmengine, mmdet, mmseg
from mmcv.ops import nms  # noqa: F401  (fails here if the ops were not compiled)
print(f"[setup] torch {torch.__version__}, mmcv {mmcv.__version__}, mmengine {mmengine.__version__}, "
      f"mmdet {mmdet.__version__}, mmseg {mmseg.__version__}")
PY
log "deformable-attention CPU kernels"
build_kernels
echo "$STAMP" > "$VENV/.dat_mm_stamp"
log "done"
