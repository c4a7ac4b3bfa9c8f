#!/usr/bin/env bash
# Session 20, call 3 (one H200): after the review refactor of the grad fold shared by MasterWeightsOptimizer and
# DistributedOptimizer: the flat AdamW GPU tests (deferred copy, graphs, trainer runs) and the distributed
# optimizer's GPU test.
source bench/gpu_env.sh
LOG=$OUT/c3.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
# (ran as test_gpu.py -k "... distributed_optimizer ..." before that test moved to its own file)
run 420 python3 -m pytest -q tests/test_gpu_flat_adamw.py tests/test_gpu_distributed_optimizer.py -rA
grep -E "passed|failed|PASSED|FAILED|rc=" "$LOG"
