#!/usr/bin/env bash
# Session 9, call 4 (one H200): word-major dropout bits (coalesced mask stores), the QKV bias grad folded
# into the attention backward; kernels, then the step A/B: our attention against cuDNN's.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 300 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64
run 150 python3 bench/bench_pretrain.py $A --tag flash --profile
MEGATRON_BERT_TRITON_ATTENTION=0 run 100 python3 bench/bench_pretrain.py $A --tag cudnn
run 60 python3 bench/bench_pretrain.py $A --tag flash_again
grep -E "^ACCURACY|^KERNEL|^BEST|PARTS|^RESULT|rc=|Error|error" "$LOG" | cut -c1-700
