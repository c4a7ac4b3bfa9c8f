#!/usr/bin/env bash
# Session 11, call 2 (one H200): where the step's time goes with the last layer pruned (kernel profile
# of the graphed, compiled step), and the step again.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 bench/bench_pretrain.py $A --tag prune --profile
grep -E "^RESULT|^PROFILE|^ +[0-9.]+ ms|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
