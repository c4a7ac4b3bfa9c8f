#!/usr/bin/env bash
# Session 11, call 1 (one H200): the last layer pruned to [CLS] + the MLM targets (train.prune_last_layer).
# The GPU tests that cover it (its encoder path, the pruned vs full graphed steps, the graphed/compiled
# steps that now run it), then seq 512 / batch 32 pruned and full, alternated, beside megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "pruned or residual_layer_norm or compiled_graphed or cuda_graph_step_matches"
run 75 python3 bench/bench_pretrain.py $A --tag prune
run 75 python3 bench/bench_pretrain.py $A --no-prune --tag full
run 75 python3 bench/bench_pretrain.py $A --tag prune2
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-400
