#!/usr/bin/env bash
# Session 18, call 2 (one GPU): the compiled vocab-parallel cross-entropy at TP>1 and the last layer
# pruned under sequence parallel, on one rank of fake TP=2/4 (± SP) beside TP=1; then the GPU tests
# that run those paths (shared-GPU TP=2/4 + SP vs TP=1, compiled; the SP capture test).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/s18c2.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 90 python3 $A --tag tp1
run 90 python3 $A --tp 2 --sp --fake-tp --profile --tag fake_tp2_sp
run 90 python3 $A --tp 4 --sp --fake-tp --tag fake_tp4_sp
run 90 python3 $A --tp 2 --fake-tp --tag fake_tp2
run 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "(tp_rank_step and True) or sharing_one_gpu or compiled_cross_entropy"
grep -E "rc=|passed|failed|Error" "$LOG" | cut -c1-300
grep "^RESULT" "$LOG" | python3 -c "
import json, sys
for ln in sys.stdin:
    r = json.loads(ln[7:]); print(r['tag'], r['step_ms'], r['seq_per_s'], r['mfu_989'], r['mem_gib'])"
