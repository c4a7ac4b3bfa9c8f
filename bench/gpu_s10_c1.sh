#!/usr/bin/env bash
# Session 10, call 1 (one H200, lent late in the session): the tree after the functional TP collectives
# and the compile-setup move. GPU tests (the 2-GPU one skips), then seq 512 / batch 32 beside megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
run 75 python3 bench/bench_pretrain.py $A --tag s10
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
