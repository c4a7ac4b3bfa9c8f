#!/usr/bin/env bash
# Session 20, calls 4 and 5 (one H200): optim.grad_reduce_dtype=param (grads accumulated and reduce-scattered in
# bf16, no fp32 copy) against the fp32 reduction, both with the distributed optimizer: memory per rank as in
# call 1 (345M seq 512 bf16, DP=2 = two processes on the one GPU over gloo, 6 steps).
#   bash bench/gpu_s20_c4.sh            call 4: micro-batch 16 (one per rank and step), then the GPU test
#   bash bench/gpu_s20_c5.sh            call 5: micro-batch 8 (two per rank and step), no test
MICRO=${MICRO:-16}; NAME=${NAME:-c4}; WITH_TEST=${WITH_TEST:-1}
source bench/gpu_env.sh
LOG=$OUT/$NAME.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
COMMON="model=345m data=quickstart data.cache_dir=/tmp/qs data.seq_length=512 train.precision=bf16
  train.max_steps=6 train.global_batch_size=32 train.micro_batch_size=$MICRO train.log_interval=1
  train.eval_interval=1000 checkpoint.dir=null train.device=cuda optim.distributed_optimizer=true"
SHARED="python3 -m torch.distributed.run --standalone --nproc_per_node=2 tests/shared_gpu_train.py"
run 240 $SHARED $COMMON run_dir=/tmp/zero_fp32 optim.grad_reduce_dtype=fp32
run 200 $SHARED $COMMON run_dir=/tmp/zero_param optim.grad_reduce_dtype=param
for r in zero_fp32 zero_param; do python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/$r/metrics.jsonl')]
print('MEM $r', json.dumps([{k: r.get(k) for k in ('step','loss','grad_norm','mem_gib')} for r in rows]))" >> "$LOG" 2>&1; done
if [ "$WITH_TEST" = 1 ]; then run 200 python3 -m pytest -q -x tests/test_gpu_distributed_optimizer.py -rA; fi
grep -E "passed|failed|distributed optimizer|MEM|rc=|Error|error" "$LOG" | head -40
