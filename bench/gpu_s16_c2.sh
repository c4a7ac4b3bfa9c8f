#!/usr/bin/env bash
# Session 16, call 2 (one H200): the embedding backward's sort with 16-bit keys (and torch.sort's time by
# key width), its GPU test with torch's comparison on the 345M shape only; the step beside the
# session-15 tree (.bench/base = 254f7c8) again; the 3.9B model at TP=1 without micro-batches, graphed.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 bench/bench_kernels.py --embedding
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "embedding"
run 50 python3 bench/bench_pretrain.py $A --tag s16c
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag s15treec
run 45 python3 bench/bench_pretrain.py $A --tag s16d
run 45 python3 .bench/base/bench/bench_pretrain.py $A --tag s15treed
run 180 python3 bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --compile --cuda-graph --iters 4 --tag 3.9b_tp1_graphed
grep -E "^RESULT|^KERNEL|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
