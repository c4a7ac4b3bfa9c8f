#!/usr/bin/env bash
# Session 16, call 3 (one H200): the embedding backward timed from CUDA graphs (ours whole and by piece,
# torch's), its carry pass reading 16 chunks at once; its GPU test and the graphed-step tests; the step
# beside the session-15 tree (.bench/base = 254f7c8) and megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 bench/bench_kernels.py --embedding
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "embedding or cuda_graph_replays or cuda_graph_step_matches"
run 60 python3 bench/bench_pretrain.py $A --tag s16e
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag s15treee
run 35 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s16f
run 45 python3 .bench/base/bench/bench_pretrain.py $A --tag s15treef
grep -E "^RESULT|^KERNEL|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
