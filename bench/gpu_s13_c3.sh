#!/usr/bin/env bash
# Session 13, call 3 (one H200): the tree as landed (the attention backward kernels moved to
# attention_backward_kernels.py, unchanged; the fused backward removed): the step beside
# megatron-core in the same call, then the GPU tests of the attention kernels and the graphed step.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 80 python3 bench/bench_pretrain.py $A --tag s13
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s13b
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention or cuda_graph_step_matches"
grep -E "^RESULT|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
