#!/usr/bin/env bash
# Session 15, call 3 (one H200): the GPU tests of the attention kernels on drop_bits' SFU logarithms
# (accuracy against float64 and cuDNN, the mask's Bernoulli statistics) and of the graphed step.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention or cuda_graph_replays or cuda_graph_step_matches"
grep -E "rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-250
