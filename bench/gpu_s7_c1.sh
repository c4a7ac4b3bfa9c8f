#!/usr/bin/env bash
# Session 7, call 1 (one H200): the GPU tests on the code edited after session 6's last call (the
# kernel move, the first LayerNorm through _norm, the deferral on the torch path); the layer's GEMMs
# under cuBLAS and cuBLASLt; seq 512 / batch 32 with the layers compiled in max-autotune (Inductor's
# Triton GEMM templates timed against the BLAS call) against the default mode.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 190 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py
run 40 python3 bench/bench_kernels.py --gemm-backends --no-autotune
run 50 python3 bench/bench_pretrain.py $A --tag base
run 270 python3 bench/bench_pretrain.py $A --compile-mode max-autotune-no-cudagraphs --profile --tag autotune
grep -E "^RESULT|^PROFILE|^KERNEL|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-330
