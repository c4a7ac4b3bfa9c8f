#!/usr/bin/env bash
# Single node, N GPUs:  GPUS=8 bash launch/pretrain.sh model=345m parallel.tensor=2 data=bert \
#     data.prefix=/data/wiki_text_sentence data.tokenizer=/data/bert-large-uncased-vocab.txt
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS="${GPUS:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
exec torchrun --standalone --nproc_per_node="$GPUS" -m megatron_bert.train train.precision=bf16 "$@"
