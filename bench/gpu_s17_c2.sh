#!/usr/bin/env bash
# Session 17, call 2: which gloo collectives take CUDA tensors (bench/probe_gloo_cuda.py, one process
# pair per op and dtype), then the shared-GPU TP=2 check with faulthandler on (call 1: SIGSEGV).
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
for dt in float32 bfloat16; do for op in all_reduce f_all_reduce all_gather_into f_all_gather reduce_scatter f_reduce_scatter; do
  run 60 python3 -m torch.distributed.run --standalone --nproc_per_node=2 bench/probe_gloo_cuda.py $op $dt
done; done
cd tests && PYTHONFAULTHANDLER=1 timeout 300 python3 -m torch.distributed.run --standalone --nproc_per_node=2 gpu_tp_check.py --tp=2 --shared-gpu >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
cd .. ; grep -E "^OK|rc=|Error|error" "$LOG" | cut -c1-300 | head -60
