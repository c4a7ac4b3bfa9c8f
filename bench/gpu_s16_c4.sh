#!/usr/bin/env bash
# Session 16, call 4 (one H200): the embedding backward timed from CUDA graphs again, torch's captured on
# the stream its forward ran on (call 3's capture of it on another stream failed), and by piece.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 bench/bench_kernels.py --embedding
grep -E "^KERNEL|rc=|Error|FAIL" "$LOG" | cut -c1-300
