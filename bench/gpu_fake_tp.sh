#!/usr/bin/env bash
# For a one-GPU machine (written in session 17): where one TP rank's step stops shrinking. Kernel
# profiles of the graphed, compiled 345M step at TP=1 and of one rank of TP=2 / TP=4 ± SP on torch's
# fake process group (bench_pretrain.py --fake-tp: communication taken out), then the GPU tests that
# session 17 could not run after its last change (the fake-TP capture test with SP, the shared-GPU TP
# checks; eager full layers now keep SDPA's dropout at TP>1).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/fake_tp.log
A="bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph --profile"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 90 python3 $A --tag tp1
run 90 python3 $A --tp 2 --fake-tp --tag fake_tp2
run 90 python3 $A --tp 2 --sp --fake-tp --tag fake_tp2_sp
run 90 python3 $A --tp 4 --fake-tp --tag fake_tp4
run 90 python3 $A --tp 4 --sp --fake-tp --tag fake_tp4_sp
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "tp_rank_step or sharing_one_gpu or resumes_from_its_checkpoint"
grep -E "rc=|passed|failed|Error" "$LOG" | cut -c1-300
python3 bench/report.py "$LOG"
