#!/usr/bin/env bash
# Session 17, call 4 (one H200): the shared-GPU TP tests as they landed (two micro-batches a step,
# 0.5% tolerance) and the CLI at TP=2 + SP on the GPU checkpointing and resuming at TP=2 and TP=1.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 480 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "sharing_one_gpu or resumes_from_its_checkpoint"
grep -E "rc=|passed|failed|Error|FAIL|assert" "$LOG" | cut -c1-400
