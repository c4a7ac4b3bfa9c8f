#!/usr/bin/env bash
# Session 6, call 5 (one H200): the table AdamW kernel with 4 blocks per program (call 4: 3.27 ms with
# one, against 2.6 ms for the flat kernel: its dependent table lookups come before any data moves).
# Its GPU tests, then seq 512 / batch 32 (graphed, profiled) with the in-place grads on and off.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c5.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py -k "deferred or replays_like or compiled_graphed or bit_for_bit"
run 80 python3 bench/bench_pretrain.py $A --profile --tag new
run 45 env MEGATRON_BERT_DEFER_GRAD_COPY=0 python3 bench/bench_pretrain.py $A --tag new_copy
run 45 python3 bench/bench_pretrain.py $A --tag new_again
grep -E "^RESULT|^PROFILE|rc=|passed|failed|Error|FAIL|_adamw" "$LOG" | cut -c1-330
