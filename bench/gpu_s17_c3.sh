#!/usr/bin/env bash
# Session 17, call 3: the functional all-gather on gloo + CUDA (call 2: SIGSEGV) — its _out variant,
# eager and compiled, without and with tests/gloo_cuda_shim.py; then the shared-GPU TP=2 check, and
# the shared-GPU test at TP=4.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
for c in f_ag_out compiled_ag f_ag_patched compiled_ag_patched; do
  run 90 python3 -m torch.distributed.run --standalone --nproc_per_node=2 bench/probe_gloo_cuda2.py $c
done
cd tests && PYTHONFAULTHANDLER=1 timeout 240 python3 -m torch.distributed.run --standalone --nproc_per_node=2 gpu_tp_check.py --tp=2 --shared-gpu >> "$LOG" 2>&1; echo "rc=$?" >> "$LOG"
cd ..
run 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "sharing_one_gpu and 4"
grep -E "^OK|^RESULT|rc=|Error|error" "$LOG" | cut -c1-400 | head -60
