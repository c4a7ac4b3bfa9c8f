#!/usr/bin/env bash
# Session 20, call 5 (one H200): optim.grad_reduce_dtype=param (grads accumulated and reduce-scattered in bf16, no
# fp32 copy) against the fp32 reduction, both with the distributed optimizer: memory per rank as in call 1
# (345M seq 512 bf16, DP=2 = two processes on the one GPU over gloo, micro-batch 8: two per rank and step, 6 steps).
source bench/gpu_env.sh
LOG=$OUT/c5.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
COMMON="model=345m data=quickstart data.cache_dir=/tmp/qs data.seq_length=512 train.precision=bf16
  train.max_steps=6 train.global_batch_size=32 train.micro_batch_size=8 train.log_interval=1
  train.eval_interval=1000 checkpoint.dir=null train.device=cuda optim.distributed_optimizer=true"
SHARED="python3 -m torch.distributed.run --standalone --nproc_per_node=2 tests/shared_gpu_train.py"
run 240 $SHARED $COMMON run_dir=/tmp/zero_fp32 optim.grad_reduce_dtype=fp32
run 200 $SHARED $COMMON run_dir=/tmp/zero_param optim.grad_reduce_dtype=param
for r in zero_fp32 zero_param; do python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/$r/metrics.jsonl')]
print('MEM $r', json.dumps([{k: r.get(k) for k in ('step','loss','grad_norm','mem_gib')} for r in rows]))" >> "$LOG" 2>&1; done
grep -E "passed|failed|distributed optimizer|MEM|rc=|Error|error" "$LOG" | head -40
