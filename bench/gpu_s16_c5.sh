#!/usr/bin/env bash
# Session 16, call 5 (one H200): the rest of the GPU tests (every training path now takes the Triton
# embedding backward) — all but those call 3 ran and the attention test (its kernels unchanged).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c5.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 400 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py \
  -k "not (embedding or cuda_graph_replays or cuda_graph_step_matches or triton_attention)"
grep -E "rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
