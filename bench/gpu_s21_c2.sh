#!/usr/bin/env bash
# Session 21, call 2 (one H200): optim=lamb on the GPU. The LAMB GPU tests (CUDA step vs CPU step, a bf16
# trainer run), then the 345M seq 512 b32 CLI (bf16, compiled layers, 4 workers, no CUDA graph: LAMB is not
# capturable) with AdamW and with LAMB in the same call: samples/s (the optimizer step's cost) and peak memory.
source bench/gpu_env.sh
LOG=$OUT/${NAME:-c2}.log; : > "$LOG"  # NAME=c3: the same call after the host-side fixes
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q tests/test_gpu_lamb.py -rA
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32 train.log_interval=10
  train.eval_interval=1000 checkpoint.dir=null data=quickstart data.cache_dir=/tmp/qs"
run 200 python3 -m megatron_bert.train $COMMON run_dir=/tmp/adamw
run 200 python3 -m megatron_bert.train $COMMON run_dir=/tmp/lamb optim=lamb train.lr=1e-3
python3 -c "
import json
for run in ('adamw', 'lamb'):
    rows = [json.loads(l) for l in open(f'/tmp/{run}/metrics.jsonl')]
    print('SPEED', run, json.dumps([{k: r.get(k) for k in ('step', 'loss', 'samples_per_s', 'data_wait_fraction',
          'mfu', 'mem_gib') if k in r} for r in rows if r.get('split', 'train') == 'train']))" >> "$LOG" 2>&1
grep -E "passed|failed|PASSED|FAILED|SPEED|rc=|error" "$LOG"
