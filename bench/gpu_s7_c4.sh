#!/usr/bin/env bash
# Session 7, call 4 (one H200): the AdamW kernels compute their fp64 bias corrections once per program
# (the table kernel did it per block: 74 registers, 3 programs per SM; now 64, 4). Their GPU tests, then
# seq 512 / batch 32 against the previous commit's code (.ab_old), interleaved, profiled once each.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py
run 50 python3 bench/bench_pretrain.py $A --profile --tag new
run 50 env PYTHONPATH=$PWD/.ab_old:$PYTHONPATH python3 .ab_old/bench/bench_pretrain.py $A --profile --tag old
run 40 python3 bench/bench_pretrain.py $A --tag new_again
run 40 env PYTHONPATH=$PWD/.ab_old:$PYTHONPATH python3 .ab_old/bench/bench_pretrain.py $A --tag old_again
grep -E "^RESULT|^PROFILE|rc=|passed|failed|Error|FAIL|_adamw" "$LOG" | cut -c1-300
