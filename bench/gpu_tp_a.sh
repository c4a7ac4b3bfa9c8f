#!/usr/bin/env bash
# For a machine with 4 GPUs (not yet lent; written in session 10), call A of three: the 2-GPU test
# (TP=2 vs TP=1, eager and compiled), then seq 512 / global batch 32 at TP=1 and TP=2, ± sequence
# parallel, beside megatron-core at the same TP. At TP>1 the layers now compile with their
# collectives inside (session 10).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/tp_a.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile"
T2="torchrun --standalone --nproc_per_node=2"
export CUDA_VISIBLE_DEVICES=0,1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k two_gpus
run 60 python3 $A --cuda-graph --tag tp1
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 90 $T2 $A --tp 2 --tag tp2
run 90 $T2 $A --tp 2 --sp --tag tp2_sp
run 55 $T2 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|^### |rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
