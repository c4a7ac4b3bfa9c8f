#!/usr/bin/env bash
# Session 11, call 5 (one H200, the machine of call 4, 145 s of device time left): the step and
# megatron-core once each. Run as one inline command; "[p]ytest" keeps pkill from matching this shell.
set -u
pkill -9 -f "[p]ytest"; sleep 1; nvidia-smi --query-gpu=memory.used --format=csv,noheader
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c5.log
run 62 python3 bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --cuda-graph --tag final
run 38 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|rc=" "$LOG" | cut -c1-420
