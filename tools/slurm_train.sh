#!/usr/bin/env bash
# Training on a Slurm cluster: tools/slurm_train.sh PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py arguments...]
# e.g. GPUS=16 tools/slurm_train.sh PARTITION dat configs/det/mask-rcnn_dat-t++_fpn_ms-crop-3x_coco.py work_dirs/x --resume
# (allocation: see tools/srun.sh)
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
shift 3
# A WORK_DIR goes back into the arguments as --work-dir: no array, which bash < 4.4 would call unbound under
# set -u when empty ("$@" is exempt).
if [ $# -gt 0 ] && [[ $1 != -* ]]; then
  WORK_DIR=$1
  shift
  set -- --work-dir "$WORK_DIR" "$@"
fi
exec "$(dirname "${BASH_SOURCE[0]}")/srun.sh" "$PARTITION" "$JOB_NAME" "$(dirname "${BASH_SOURCE[0]}")/train.py" \
    "$CONFIG" "$@"
