#!/usr/bin/env bash
# Session 21, call 5 (one H200): regression check after the session's trainer changes (the optimizer is
# chosen by optim.name; the flat AdamW only for AdamW; the distributed optimizer's masters carry dp_sliced;
# pretraining evaluate mode): the trainer-level GPU tests of session 20's c2, the distributed optimizer's
# GPU test and the LAMB GPU tests.
source bench/gpu_env.sh
LOG=$OUT/c5.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 480 python3 -m pytest -q tests/test_gpu.py tests/test_gpu_flat_adamw.py tests/test_gpu_distributed_optimizer.py \
  tests/test_gpu_lamb.py -rA -k "cuda_graph_run_saves or tp2_gpu_run_resumes or pruned_last_layer or \
compiled_graphed_steps or trainer_losses_with or sharded or lamb or cuda_step"
grep -E "passed|failed|PASSED|FAILED|rc=" "$LOG"
