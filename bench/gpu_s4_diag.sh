#!/usr/bin/env bash
# Session 4, call 1 (one H200): where the non-GEMM time goes, by aten op and input shape (eager
# compiled step, no CUDA graph), the Inductor code of the compiled layer, and the SDPA grad layouts.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/diag.log
O="bench/bench_pretrain.py --model 345m"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 bench/probe_sdpa_layout.py
run 150 python3 $O --seq 512 --batch 32 --compile --profile --profile-ops 70 --iters 4 --tag eager_ops
TORCH_LOGS=output_code timeout 120 python3 $O --seq 512 --batch 32 --compile --warmup 2 --iters 1 --tag code > "${OUT:-/tmp}/code.log" 2>&1
echo "code rc=$?" >> "$LOG"
grep -E "^RESULT|^PROFILE|^PROBE|rc=|Error" "$LOG"
