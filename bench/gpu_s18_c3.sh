#!/usr/bin/env bash
# Session 18, call 3 (one GPU): after the deferred grad copy under SP and our attention kernels taking
# the QKV projection at TP>1 - TP=1 and one rank of fake TP=2/4 (± SP) at 345M, the GPU tests of those
# paths (shared-GPU TP=2 + SP vs TP=1, compiled; the capture tests), then one rank of the 3.9B model
# at fake TP=4 ± SP (the ceiling of the 40%-MFU target).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/s18c3.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph"
G="bench/bench_pretrain.py --model 3.9b --seq 512 --batch 32 --compile --cuda-graph --tp 4 --fake-tp --iters 5"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 90 python3 $A --tag tp1
run 90 python3 $A --tp 2 --sp --fake-tp --profile --tag fake_tp2_sp
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "tp_rank_step or (sharing_one_gpu and 2)"
run 70 python3 $A --tp 4 --sp --fake-tp --tag fake_tp4_sp
run 60 python3 $A --tp 2 --fake-tp --tag fake_tp2
run 100 python3 $G --sp --tag 3.9b_fake_tp4_sp
run 90 python3 $G --tag 3.9b_fake_tp4
grep -E "rc=|passed|failed|Error" "$LOG" | cut -c1-300
grep "^RESULT" "$LOG" | python3 -c "
import json, sys
for ln in sys.stdin:
    r = json.loads(ln[7:]); print(r['tag'], r['step_ms'], r['seq_per_s'], r['mfu_989'], r['mem_gib'], r['warmup_s'])"
