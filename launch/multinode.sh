#!/usr/bin/env bash
# Multi-node: run this same command on every node (c10d rendezvous on the first node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS=8 bash launch/multinode.sh model=1.3b parallel.tensor=8 ...
# Tensor-parallel groups are consecutive ranks, i.e. GPUs of one node: keep parallel.tensor <= GPUS.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous)}"
GPUS="${GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
MASTER_PORT="${MASTER_PORT:-29400}"
RUN_ID="${RUN_ID:-megatron-bert}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
# Restarted workers must not read the previous attempt's rendezvous addresses (RELIABILITY.md).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
exec torchrun --nnodes="$NNODES" --nproc_per_node="$GPUS" --rdzv_backend=c10d \
    --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RUN_ID" --max_restarts="${MAX_RESTARTS:-0}" \
    -m megatron_bert.train "$@"
