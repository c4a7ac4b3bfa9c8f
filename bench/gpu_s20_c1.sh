#!/usr/bin/env bash
# Session 20, call 1 (one H200): the distributed optimizer (optim.distributed_optimizer, ZeRO-1) on the GPU.
# 1. its GPU test (DP=2 ranks sharing the GPU over gloo vs the replicated optimizer; resume unsharded);
# 2. memory per rank, 345M seq 512 bf16, DP=2 (two processes on the one GPU, gloo: the step time is not a
#    speed measurement, the peak memory of each process is), micro-batch 16, replicated vs sharded.
source bench/gpu_env.sh
LOG=$OUT/c1.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
# (ran as tests/test_gpu.py -k distributed_optimizer before the test moved to its own file)
run 300 python3 -m pytest -q -x tests/test_gpu_distributed_optimizer.py -rA
COMMON="model=345m data=quickstart data.cache_dir=/tmp/qs data.seq_length=512 train.precision=bf16
  train.max_steps=6 train.global_batch_size=32 train.micro_batch_size=16 train.log_interval=1
  train.eval_interval=1000 checkpoint.dir=null train.device=cuda"
SHARED="python3 -m torch.distributed.run --standalone --nproc_per_node=2 tests/shared_gpu_train.py"
run 240 $SHARED $COMMON run_dir=/tmp/plain
run 200 $SHARED $COMMON run_dir=/tmp/zero optim.distributed_optimizer=true
for r in plain zero; do python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/$r/metrics.jsonl')]
print('MEM $r', json.dumps([{k: r.get(k) for k in ('step','loss','grad_norm','mem_gib')} for r in rows]))" >> "$LOG" 2>&1; done
grep -E "passed|failed|distributed optimizer|MEM|rc=|Error|error" "$LOG" | head -40
