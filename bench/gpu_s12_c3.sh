#!/usr/bin/env bash
# Session 12, call 3 (one H200): the session's tree (mask seeds drawn once per forward, attention
# bias-grad partials without a zero-fill, position rows as a slice and token-type grads as a one-hot
# GEMM) beside megatron-core and the session-11 tree (.bench/base = 639357a) in the same call; then the
# GPU tests of the step paths the changes touch.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 80 python3 bench/bench_pretrain.py $A --tag s12
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s12b
run 80 python3 .bench/base/bench/bench_pretrain.py $A --tag base
run 45 python3 bench/bench_pretrain.py $A --tag s12c
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "cuda_graph_step_matches or residual_layer_norm or saves_in_the_background or pruned_last_layer_steps"
grep -E "^RESULT|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
