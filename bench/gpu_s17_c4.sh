#!/usr/bin/env bash
# Session 17, call 4 (one H200): the shared-GPU TP tests as they landed (two micro-batches a step,
# 0.5% tolerance) and the CLI at TP=2 + SP on the GPU checkpointing and resuming at TP=2 and TP=1;
# then one rank's step at TP=2 and TP=4 with no communication (bench_pretrain.py --fake-tp) beside
# the TP=1 step: the compute ceiling of strong scaling at global batch 32.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "sharing_one_gpu or resumes_from_its_checkpoint"
run 75 python3 $A --tag tp1
run 75 python3 $A --tp 2 --sp --fake-tp --tag fake_tp2_sp
run 75 python3 $A --tp 4 --sp --fake-tp --tag fake_tp4_sp
run 75 python3 $A --tp 2 --fake-tp --tag fake_tp2
run 75 python3 $A --tp 4 --fake-tp --tag fake_tp4
grep -E "rc=|passed|failed|Error|FAIL|assert" "$LOG" | cut -c1-400
grep "^RESULT" "$LOG" | python3 -c "
import json, sys
for ln in sys.stdin:
    r = json.loads(ln[7:]); print(r['tag'], r['step_ms'], r['seq_per_s'], r['mfu_989'], r['mem_gib'])"
