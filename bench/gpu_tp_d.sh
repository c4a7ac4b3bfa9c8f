#!/usr/bin/env bash
# For a machine with 4 GPUs, an optional fourth call after gpu_tp_a/b/c.sh (written in session 16): the
# 3.9B model at TP=4 with the whole step captured (collectives included), ± sequence parallel, and its
# TP=1 reference on one of the GPUs. On one H200 the 3.9B step went from 41% MFU (micro-batch 8, eager
# launches) to 57% graphed without micro-batches (session 16): the graphed TP=4 step is the one to set
# against the >= 40% MFU target. The TP=1 run needs ~116 GiB (an H200; an 80 GB H100 takes
# --micro-batch 8 instead).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/tp_d.log
T4="torchrun --standalone --nproc_per_node=4"
B="bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --compile --cuda-graph --iters 5"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1 run 200 $T4 $B --tp 4 --sp --tag 3.9b_tp4_sp_graphed
MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1 run 200 $T4 $B --tp 4 --tag 3.9b_tp4_graphed
CUDA_VISIBLE_DEVICES=0 run 150 python3 $B --tag 3.9b_tp1_graphed
grep -E "^RESULT|^### |rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
