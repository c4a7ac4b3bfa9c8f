#!/usr/bin/env bash
# Session 16, call 1 (one H200): the word embeddings' backward as sorted segment sums in Triton
# (embedding_kernels.py) against torch's, alone and in the step beside the session-15 tree
# (.bench/base = 254f7c8) and megatron-core in the same call; the GPU tests of the new kernel and of
# the graphed step; then the 3.9B model at TP=1 (micro-batch 8) as a pre-check of its per-GPU rate.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 bench/bench_kernels.py --embedding
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "embedding or cuda_graph_replays or cuda_graph_step_matches"
run 70 python3 bench/bench_pretrain.py $A --tag s16
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag s15tree
run 35 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s16b
run 45 python3 .bench/base/bench/bench_pretrain.py $A --tag s15treeb
run 150 python3 bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --micro-batch 8 --compile --iters 4 --tag 3.9b_tp1
grep -E "^RESULT|^KERNEL|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
