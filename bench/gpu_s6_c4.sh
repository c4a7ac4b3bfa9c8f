#!/usr/bin/env bash
# Session 6, call 4 (one H200): the bf16-grads-in-place AdamW with its pointer table uploaded from a pinned
# buffer readied before the capture (call 3: torch refuses pageable copies inside a capture). Its GPU
# tests, then seq 512 / batch 32 (graphed, profiled) with it on and off, megatron-core beside, seq 128.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py -k "deferred or replays_like or compiled_graphed or warm_inductor"
run 80 python3 bench/bench_pretrain.py $A --profile --tag new
run 45 env MEGATRON_BERT_DEFER_GRAD_COPY=0 python3 bench/bench_pretrain.py $A --tag new_copy
run 45 python3 bench/bench_pretrain.py $A --tag new_again
run 50 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py --model 345m --seq 128 --batch 64 --compile --cuda-graph --tag seq128_new
run 45 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
grep -E "^RESULT|^PROFILE|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-330
