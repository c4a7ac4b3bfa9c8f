#!/usr/bin/env bash
# Session 17, call 5 (one H200): native attention dropout at TP>1 salted by rank instead of swapping
# generators (call 4: the graphed fake-TP step without SP failed its capture there): the new GPU
# test without SP, then the no-SP fake-TP step at TP=2 that call 4 could not time (the device time
# left allowed no more).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c5.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph"
run 100 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "tp_rank_step and False"
run 60 python3 $A --tp 2 --fake-tp --tag fake_tp2
grep -E "rc=|passed|failed|Error|FAIL|assert" "$LOG" | cut -c1-400
grep "^RESULT" "$LOG" | python3 -c "
import json, sys
for ln in sys.stdin:
    r = json.loads(ln[7:]); print(r['tag'], r['step_ms'], r['seq_per_s'], r['mfu_989'], r['mem_gib'])"
