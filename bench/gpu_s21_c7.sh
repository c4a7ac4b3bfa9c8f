#!/usr/bin/env bash
# Session 21, call 7 (one H200): c6 after the capturable LAMB stopped using single-tensor scalar overloads
# (c6: "operation not permitted when stream is capturing" in torch._foreach_add_(steps, device_scalar)).
# The LAMB GPU tests, then the 345M seq 512 b32 bf16 compile + CUDA graph run with LAMB (c6 has AdamW's).
source bench/gpu_env.sh
LOG=$OUT/c7.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 120 python3 -m pytest -q tests/test_gpu_lamb.py -rA
run 110 python3 -m megatron_bert.train model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 \
  train.compile=true train.cuda_graph=true train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32 \
  train.log_interval=10 train.eval_interval=1000 checkpoint.dir=null data=quickstart data.cache_dir=/tmp/qs \
  train.lr=1e-3 run_dir=/tmp/lamb optim=lamb
python3 -c "
import json
rows = [json.loads(l) for l in open('/tmp/lamb/metrics.jsonl')]
print('SPEED lamb', json.dumps([{k: round(r[k], 4) for k in ('step', 'loss', 'samples_per_s', 'mem_gib') if k in r}
      for r in rows if r.get('split', 'train') == 'train']))" >> "$LOG" 2>&1
grep -E "passed|failed|PASSED|FAILED|SPEED|rc=|Error|captured" "$LOG"
