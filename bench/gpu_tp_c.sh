#!/usr/bin/env bash
# For a machine with 4 GPUs, call C of three (see gpu_tp_a.sh): the 3.9B model (L48 h2560, 40 heads)
# at TP=4, seq 512 / global batch 32, ± sequence parallel, then the graphed TP=4 step of the 345M model.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/tp_c.log
T4="torchrun --standalone --nproc_per_node=4"
B="bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --tp 4 --compile --iters 5"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 $T4 $B --sp --tag 3.9b_tp4_sp
run 170 $T4 $B --tag 3.9b_tp4
MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1 run 90 $T4 bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --tp 4 \
  --compile --cuda-graph --tag tp4_graphed
grep -E "^RESULT|^### |rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
