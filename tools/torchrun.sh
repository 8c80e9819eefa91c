#!/usr/bin/env bash
# torchrun over this node's GPUS processes: tools/torchrun.sh GPUS SCRIPT [arguments...]
# Several nodes: run it on each with NNODES, NODE_RANK, MASTER_ADDR (and the same PORT) set.
set -euo pipefail
GPUS=$1
shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$([ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python)}
exec "$PYTHON" -m torch.distributed.run \
    --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" \
    --master_port="${PORT:-29500}" --nproc_per_node="$GPUS" "$@" --launcher pytorch
