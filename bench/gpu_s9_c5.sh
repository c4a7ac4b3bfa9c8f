#!/usr/bin/env bash
# Session 9, call 5 (one H200): the mask drawn in the forward kernel's prologue, dropout selects with
# the scale folded into FFMAs; kernels (dropout only), then the step A/B against cuDNN's attention.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c5.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 300 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 150 python3 bench/bench_pretrain.py $A --tag flash --profile
MEGATRON_BERT_TRITON_ATTENTION=0 run 100 python3 bench/bench_pretrain.py $A --tag cudnn
run 60 python3 bench/bench_pretrain.py $A --tag flash_again
grep -E "^ACCURACY|^KERNEL|^BEST|PARTS|^RESULT|rc=|Error|error" "$LOG" | cut -c1-700
