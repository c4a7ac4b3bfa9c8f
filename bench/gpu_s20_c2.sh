#!/usr/bin/env bash
# Session 20, call 2 (one H200): regression check after the session's trainer changes (best checkpoint, early
# stop, LR schedules, the optimizer switch): the trainer-level GPU tests, then the 345M seq 512 b32 CLI run of
# session 19's c3 (compile + CUDA graph, 4 workers) for its samples/s.
source bench/gpu_env.sh
LOG=$OUT/c2.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 330 python3 -m pytest -q tests/test_gpu.py tests/test_gpu_flat_adamw.py -rA -k \
  "cuda_graph_run_saves or tp2_gpu_run_resumes or pruned_last_layer or compiled_graphed_steps or trainer_losses_with"
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.cuda_graph=true train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32
  train.log_interval=10 train.eval_interval=1000 checkpoint.dir=null"
run 220 python3 -m megatron_bert.train $COMMON data=quickstart data.cache_dir=/tmp/qs run_dir=/tmp/plain
python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/plain/metrics.jsonl')]
print('SPEED', json.dumps([{k: r.get(k) for k in ('step','samples_per_s','data_wait_fraction','mfu','mem_gib')} for r in rows if 'data_wait_fraction' in r]))" >> "$LOG" 2>&1
grep -E "passed|failed|PASSED|FAILED|SPEED|rc=" "$LOG"
