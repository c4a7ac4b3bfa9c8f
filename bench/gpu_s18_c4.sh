#!/usr/bin/env bash
# Session 18, call 4 (one GPU): the tree as landed - the SP grad sum's copy-back as one multi-tensor
# launch - in the fake-TP capture test with SP (deferred bf16 grads summed inside the graph), then
# TP=1 and one rank of fake TP=2 + SP (profiled).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/s18c4.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "tp_rank_step and True"
run 80 python3 $A --tag tp1
run 80 python3 $A --tp 2 --sp --fake-tp --profile --tag fake_tp2_sp
grep -E "rc=|passed|failed|Error" "$LOG" | cut -c1-300
grep "^PROFILE" "$LOG" | cut -c1-330
grep -E "copy|multi_tensor|adamw" "$LOG" | cut -c1-120
grep "^RESULT" "$LOG" | python3 -c "
import json, sys
for ln in sys.stdin:
    r = json.loads(ln[7:]); print(r['tag'], r['step_ms'], r['seq_per_s'], r['mfu_989'], r['mem_gib'])"
