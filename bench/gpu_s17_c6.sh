#!/usr/bin/env bash
# Session 17, call 6 (one H200, the machine still warm from call 5; the command was given inline):
# the fake-TP capture test without SP again, its assertion now on the RESULT's graph count (call 5 looked
# for a trainer log line that bench_pretrain.py does not print).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c6.log
run 60 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "tp_rank_step and False"
tail -3 "$LOG"
