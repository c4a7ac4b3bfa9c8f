#!/usr/bin/env bash
# Session 21, call 4 (one H200): LAMB's step cost against AdamW's, interleaved (AdamW, LAMB, AdamW, LAMB)
# because calls 2 and 3 disagreed (0.74x and 1.13x): this eager path (compiled layers, no CUDA graph) is
# host-bound and its speed moves between machines and runs. 345M seq 512 b32 bf16, 50 steps each.
source bench/gpu_env.sh
LOG=$OUT/c4.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.max_steps=50 train.global_batch_size=32 train.micro_batch_size=32 train.log_interval=10
  train.eval_interval=1000 checkpoint.dir=null data=quickstart data.cache_dir=/tmp/qs train.lr=1e-3"
for run in adamw_1 lamb_1 adamw_2 lamb_2; do
  run 150 python3 -m megatron_bert.train $COMMON run_dir=/tmp/$run optim=${run%_*}
done
python3 -c "
import json
for run in ('adamw_1', 'lamb_1', 'adamw_2', 'lamb_2'):
    rows = [json.loads(l) for l in open(f'/tmp/{run}/metrics.jsonl')]
    print('SPEED', run, json.dumps([{k: round(r[k], 4) for k in ('step', 'samples_per_s', 'mem_gib') if k in r}
          for r in rows if r.get('split', 'train') == 'train']))" >> "$LOG" 2>&1
grep -E "SPEED|rc=|error" "$LOG"
