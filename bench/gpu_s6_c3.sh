#!/usr/bin/env bash
# Session 6, call 3 (one H200): + the flat AdamW reading the bf16 grads in place (one micro-batch: no
# grad copy, norm over bf16). GPU tests of it first, then seq 512 / batch 32 (graphed, profiled) with it
# on and off, session-5 code (.ab_old) and megatron-core beside, seq 128 / batch 64, the other GPU tests.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py -k "deferred or replays_like or compiled_graphed"
run 80 python3 bench/bench_pretrain.py $A --profile --tag new
run 45 env MEGATRON_BERT_DEFER_GRAD_COPY=0 python3 bench/bench_pretrain.py $A --tag new_copy
run 45 python3 .ab_old/bench/bench_pretrain.py $A --tag old
run 45 python3 bench/bench_pretrain.py $A --tag new_again
run 50 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py --model 345m --seq 128 --batch 64 --compile --cuda-graph --tag seq128_new
run 45 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_flat_adamw.py -k "not tp2 and not deferred and not replays_like and not compiled_graphed"
grep -E "^RESULT|^PROFILE|rc=|passed|failed|Error|FAIL|OK cuda" "$LOG" | cut -c1-330
