#!/usr/bin/env bash
# Session 9, call 6 (one H200): the session's final tree. GPU tests (our attention kernels' test
# included), then seq 512 / batch 32 twice beside megatron-core and the cuDNN-attention path (A/B in
# the same call), and seq 128 / batch 64.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c6.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 280 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
run 75 python3 bench/bench_pretrain.py $A --tag final
run 40 python3 bench/bench_pretrain.py $A --tag final_again
MEGATRON_BERT_TRITON_ATTENTION=0 run 40 python3 bench/bench_pretrain.py $A --tag cudnn_attention
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 50 python3 bench/bench_pretrain.py --model 345m --seq 128 --batch 64 --compile --cuda-graph --tag seq128
grep -E "^RESULT|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
