#!/bin/sh
# Shared torchrun launcher behind exp_*/train_*.sh.
# usage: sh tools/launch.sh TRAINER NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]
# Several nodes: run the same command on every node with NODE_RANK (0..NNODES-1), MASTER_ADDR (node 0's address)
# and MASTER_PORT exported. Without a GPU, torch.distributed uses gloo on the CPU.
set -eu
if [ "$#" -lt 5 ]; then
    echo "usage: $0 TRAINER NNODES GPUS_PER_NODE CONFIG SAVE_DIR [key=value ...]" >&2
    exit 2
fi
TRAINER=$1; NNODES=$2; NPROC=$3; CONFIG=$4; SAVE_DIR=$5
shift 5
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Every check that needs no network, once, in a plain process: a bad input ends in its one line and exit code 2
# here, not inside torchrun's report. The workers then skip it (senseflow/trainer/preflight.py).
"${PYTHON:-python}" -m senseflow.cli train --preflight --trainer "$TRAINER" --config_path "$CONFIG" \
    --save_path "$SAVE_DIR" "$@"
export SENSEFLOW_PREFLIGHT_DONE=1
export PYTHONFAULTHANDLER=1
exec torchrun \
    --nnodes "$NNODES" --nproc_per_node "$NPROC" \
    --node_rank "${NODE_RANK:-0}" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m senseflow.cli train --trainer "$TRAINER" --config_path "$CONFIG" --save_path "$SAVE_DIR" "$@"
