#!/usr/bin/env bash
# Session 21, call 6 (one H200): LAMB under train.cuda_graph (the capturable LAMB). Its GPU tests (graphed
# steps vs eager ones, the CUDA step vs the CPU step, a bf16 trainer run), then 345M seq 512 b32 bf16 with
# compile + CUDA graph, AdamW then LAMB, 40 steps each: samples/s at steps 20-40.
source bench/gpu_env.sh
LOG=$OUT/c6.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q tests/test_gpu_lamb.py -rA
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.cuda_graph=true train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32
  train.log_interval=10 train.eval_interval=1000 checkpoint.dir=null data=quickstart data.cache_dir=/tmp/qs
  train.lr=1e-3"
for run in adamw lamb; do
  run 150 python3 -m megatron_bert.train $COMMON run_dir=/tmp/$run optim=$run
done
python3 -c "
import json
for run in ('adamw', 'lamb'):
    rows = [json.loads(l) for l in open(f'/tmp/{run}/metrics.jsonl')]
    print('SPEED', run, json.dumps([{k: round(r[k], 4) for k in ('step', 'loss', 'samples_per_s', 'mem_gib') if k in r}
          for r in rows if r.get('split', 'train') == 'train']))" >> "$LOG" 2>&1
grep -E "passed|failed|PASSED|FAILED|SPEED|rc=|error|captured" "$LOG"
