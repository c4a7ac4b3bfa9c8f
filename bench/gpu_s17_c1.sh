#!/usr/bin/env bash
# Session 17, call 1 (one H200): the embedding GPU test after the s16 review's import move, then the
# new TP=2 / TP=4 checks with every rank on cuda:0 over gloo (the GPU code paths at TP>1 on a one-GPU
# machine).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k embedding
run 420 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "sharing_one_gpu" -x
grep -E "rc=|passed|failed|Error|FAIL|assert" "$LOG" | cut -c1-300
