#!/usr/bin/env bash
# Testing on a Slurm cluster: tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py arguments...]
# (allocation: see tools/srun.sh)
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
shift 4
exec "$(dirname "${BASH_SOURCE[0]}")/srun.sh" "$PARTITION" "$JOB_NAME" "$(dirname "${BASH_SOURCE[0]}")/test.py" \
    "$CONFIG" "$CHECKPOINT" "$@"
