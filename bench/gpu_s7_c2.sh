#!/usr/bin/env bash
# Session 7, call 2 (one H200): the bias + GeLU kernels walking 128 rows per program with the next
# sub-block prefetched (call 1: forward 78 µs, backward 122 µs against ~65 and ~98 of traffic), and the
# table AdamW with two levels of lookups instead of three. GPU tests of both; the kernels and the
# seq 512 / batch 32 step against HEAD's code (.ab_old), interleaved.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py -k "gelu or flat or deferred or replays_like or compiled_graphed or bit_for_bit"
run 40 python3 bench/bench_kernels.py --gelu
run 40 env PYTHONPATH=$PWD/.ab_old:$PYTHONPATH python3 .ab_old/bench/bench_kernels.py --gelu
run 60 python3 bench/bench_pretrain.py $A --profile --tag new
run 45 env PYTHONPATH=$PWD/.ab_old:$PYTHONPATH python3 .ab_old/bench/bench_pretrain.py $A --tag old
run 45 python3 bench/bench_pretrain.py $A --tag new_again
run 45 env PYTHONPATH=$PWD/.ab_old:$PYTHONPATH python3 .ab_old/bench/bench_pretrain.py $A --tag old_again
grep -E "^RESULT|^PROFILE|^KERNEL|rc=|passed|failed|Error|FAIL|_adamw|_fwd_kernel|_bwd_kernel" "$LOG" | cut -c1-300
