#!/usr/bin/env bash
# TP re-measure after the nccl-contiguity fix: eager layers (compile applies at TP=1 only), with and
# without sequence parallel, and the 3.9B model at TP=4; a CPU-time profile of TP=2.
set -u
source bench/gpu_env.sh
O="bench/bench_pretrain.py --model 345m --seq 512 --batch 32"
g2="env CUDA_VISIBLE_DEVICES=0,1"
run() { local t=$1; shift; timeout "$t" "$@" > /tmp/run.log 2>&1; grep -E "^RESULT|Error:|error:" /tmp/run.log | tail -2; }
run 70 $g2 torchrun --standalone --nproc_per_node=2 $O --tp 2 --tag tp2
run 70 $g2 torchrun --standalone --nproc_per_node=2 $O --tp 2 --sp --tag tp2_sp
run 70 torchrun --standalone --nproc_per_node=4 $O --tp 4 --tag tp4
run 70 torchrun --standalone --nproc_per_node=4 $O --tp 4 --sp --tag tp4_sp
run 120 torchrun --standalone --nproc_per_node=4 bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --tp 4 --sp --iters 5 --tag 3.9b_tp4_sp
run 120 torchrun --standalone --nproc_per_node=4 bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --tp 4 --iters 5 --tag 3.9b_tp4
