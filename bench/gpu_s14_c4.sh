#!/usr/bin/env bash
# Session 14, call 4 (one H200): position masks that are constant True where blocks tile the sequence
# exactly (_in_range: the loads' masks fold away; dk/dv loop 456 -> 434 sm90 instructions), beside the
# tree of call 3 (.bench/base = 7bac8f5) and megatron-core in the same call; then the GPU tests of the
# attention kernels and the graphed step.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 90 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 70 python3 bench/bench_pretrain.py $A --tag s14r
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag c3tree
run 35 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s14rb
run 110 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention or cuda_graph_step_matches"
grep -E "^RESULT|^KERNEL|^TILE|^BEST|^ACCURACY|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-250
