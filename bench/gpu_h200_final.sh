#!/usr/bin/env bash
# Final call on one H200 (BENCHMARKS.md, 2026-12-01): ours (whole-step CUDA graph, per-layer compile
# with multi-kernel reductions, autotuned Triton bias+GeLU, compiled cross-entropy) at seq 512 and
# 128 beside megatron-core in the same call; the one-GPU tests. (Call 5's commands, with the
# multi-kernel A/B and HF, are the "###" lines of bench/results/2026-12-01-h200/5_final.log.)
# Table: python bench/report.py $OUT/final.log
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/final.log
O="bench/bench_pretrain.py --model 345m"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not tp2 and not background"
run 150 python3 $O --seq 512 --batch 32 --compile --cuda-graph --profile --tag graph
run 70 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 120 python3 $O --seq 128 --batch 64 --compile --cuda-graph --tag seq128_graph
run 60 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
grep -E "^RESULT|^PROFILE|rc=|passed|failed|Error" "$LOG"
