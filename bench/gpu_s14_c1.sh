#!/usr/bin/env bash
# A record of the call: the SLACK forward candidates were removed after it (bench/NOTES.md, session 14).
# Session 14, call 1 (one H200): the attention kernels with the score scale folded into the
# exponent's FFMA (forward), no key select where every key is valid (dk/dv), and forward candidates
# that rescale the accumulator only past a growth of 2^8 (SLACK), beside the session-13 tree
# (.bench/base = 84b5d75) and megatron-core in the same call.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 120 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 80 python3 .bench/base/bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 80 python3 bench/bench_pretrain.py $A --tag s14
run 60 python3 .bench/base/bench/bench_pretrain.py $A --tag base
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 50 python3 bench/bench_pretrain.py $A --tag s14b
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag base2
grep -E "^RESULT|^KERNEL|^TILE|^BEST|^ACCURACY|PARTS|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
