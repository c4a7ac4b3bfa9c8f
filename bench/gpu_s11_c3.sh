#!/usr/bin/env bash
# Session 11, call 3 (one H200): more attention tiles for the autotuner (stages 4 and 5 for the backward's
# 64 x 64 tiles, 4 stages for the forward's 128 x 64), the bias-grad partials zeroed between candidates.
# The attention GPU test (its first call autotunes), the kernels' per-tile timings, then the step twice
# beside megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention"
run 120 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 75 python3 bench/bench_pretrain.py $A --tag tiles
run 75 python3 bench/bench_pretrain.py $A --tag tiles2
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|^KERNEL|^BEST|^TILE|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-330
