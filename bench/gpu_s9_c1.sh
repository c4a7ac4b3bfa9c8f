#!/usr/bin/env bash
# Session 9, call 1 (one H200): our Triton attention (attention_kernels.py) against cuDNN's, the
# layer's shape of BERT-345M at seq 512 / batch 32, accuracy first.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 400 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64
grep -E "^ACCURACY|^KERNEL|^BEST|PARTS|rc=|Error|error" "$LOG" | cut -c1-600
