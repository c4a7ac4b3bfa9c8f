#!/usr/bin/env bash
# Session 19, call 1 (one H200): the profiler over a CUDA-graph run (new GPU test) beside an existing
# CUDA-graph CLI test, both through pytest.
source bench/gpu_env.sh
LOG=$OUT/c1.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 400 python3 -m pytest -q -x tests/test_gpu.py -k "profiled_cuda_graph or cuda_graph_run_saves" -rA
tail -30 "$LOG"
