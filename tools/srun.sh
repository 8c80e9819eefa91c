#!/usr/bin/env bash
# srun over GPUS tasks, one per GPU, GPUS_PER_NODE to a node: tools/srun.sh PARTITION JOB_NAME SCRIPT [arguments...]
# GPUS (default 8), GPUS_PER_NODE (default 8), CPUS_PER_TASK (default 5) and SRUN_ARGS (extra srun options,
# e.g. "--quotatype=spot --time=48:00:00") set the allocation. MMEngine's slurm launcher takes each task's
# rank and the job's nodes from Slurm, and the port from MASTER_PORT (default 29500).
set -euo pipefail
PARTITION=$1
JOB_NAME=$2
SCRIPT=$3
shift 3
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python)}
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
# SRUN_ARGS is split into words, as a user writes them. Without it EXTRA is empty, which bash < 4.4 (RHEL/CentOS
# 7 ship 4.2) calls unbound under set -u when expanded plainly, hence ${EXTRA[@]+...}: nothing where it is empty.
read -r -a EXTRA <<< "${SRUN_ARGS:-}"
exec srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
    ${EXTRA[@]+"${EXTRA[@]}"} "$PYTHON" -u "$SCRIPT" "$@" --launcher slurm
