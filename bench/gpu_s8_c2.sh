#!/usr/bin/env bash
# Session 8, call 2 (one H200): the session's final tree (product code as session 7's 4f1623d, the
# CPU test harness sped up). All GPU tests; seq 512 / batch 32 twice beside megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py
run 60 python3 bench/bench_pretrain.py $A --tag final
run 45 python3 bench/bench_pretrain.py $A --tag final_again
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
