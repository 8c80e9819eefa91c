#!/usr/bin/env bash
# Distributed testing: tools/dist_test.sh CONFIG CHECKPOINT GPUS_PER_NODE [test.py arguments...] (see tools/torchrun.sh)
set -euo pipefail
CONFIG=$1
CHECKPOINT=$2
GPUS=$3
shift 3
exec "$(dirname "${BASH_SOURCE[0]}")/torchrun.sh" "$GPUS" "$(dirname "${BASH_SOURCE[0]}")/test.py" "$CONFIG" "$CHECKPOINT" "$@"
