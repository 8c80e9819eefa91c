#!/usr/bin/env bash
# Distributed training: tools/dist_train.sh CONFIG GPUS_PER_NODE [train.py arguments...] (see tools/torchrun.sh)
set -euo pipefail
CONFIG=$1
GPUS=$2
shift 2
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$GPUS" "$(dirname "${BASH_SOURCE[0]}")/train.py" "$CONFIG" "$@"
