#!/usr/bin/env bash
# For a machine with 4 GPUs, call B of three (see gpu_tp_a.sh): the TP=2 A/Bs — epilogues only
# (MEGATRON_BERT_COMPILE_TP=0, the path before session 10), the step captured as CUDA graphs with its
# NCCL collectives (MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1), Inductor's micro-pipelined TP under
# sequence parallel (MEGATRON_BERT_ASYNC_TP=1), both together, and one rank of it with communication
# taken out (--fake-tp, one GPU: the difference is the collective time left exposed; session 18) — then
# TP=4 ± sequence parallel beside megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/tp_b.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile"
T2="env CUDA_VISIBLE_DEVICES=0,1 torchrun --standalone --nproc_per_node=2"
T4="torchrun --standalone --nproc_per_node=4"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
MEGATRON_BERT_COMPILE_TP=0 run 60 $T2 $A --tp 2 --tag tp2_epilogues_only
MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1 run 90 $T2 $A --tp 2 --cuda-graph --tag tp2_graphed
MEGATRON_BERT_ASYNC_TP=1 run 90 $T2 $A --tp 2 --sp --tag tp2_sp_async_tp
MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1 MEGATRON_BERT_ASYNC_TP=1 run 90 $T2 $A --tp 2 --sp --cuda-graph \
  --tag tp2_sp_async_tp_graphed
run 50 python3 $A --tp 2 --sp --fake-tp --cuda-graph --tag fake_tp2_sp
run 90 $T4 $A --tp 4 --tag tp4
run 90 $T4 $A --tp 4 --sp --tag tp4_sp
run 55 $T4 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|^### |rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
