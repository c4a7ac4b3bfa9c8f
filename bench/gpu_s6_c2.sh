#!/usr/bin/env bash
# Session 6, call 2 (one H200): the residual + LayerNorm kernels without per-block layout conversions
# (2-D tiles for the vectors, byte masks, column sums folded once, next block prefetched): kernel
# timings and backward program counts (bench_kernels --residual-norm), the GPU kernel test, then seq 512 /
# batch 32 with the fused path on (profiled) and off.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 90 python3 bench/bench_kernels.py --residual-norm
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k residual_layer_norm
run 90 python3 bench/bench_pretrain.py $A --profile --tag new
run 45 env MEGATRON_BERT_TRITON_RESIDUAL_NORM=0 python3 bench/bench_pretrain.py $A --tag new_rn_off
run 45 python3 bench/bench_pretrain.py $A --tag new_again
grep -E "^KERNEL|^RESULT|^PROFILE|rc=|passed|failed|Error|FAIL|OK cuda" "$LOG" | cut -c1-300
