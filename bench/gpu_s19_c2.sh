#!/usr/bin/env bash
# Session 19, call 2 (one H200): the data loader with a blend of corpora (data.prefix=[0.7,P,0.3,P], the
# second member on its own random stream) beside the plain corpus, 345M seq 512 batch 32 through the CLI
# (compile + CUDA graph, 4 workers); the blend run also profiles steps 38-39.
source bench/gpu_env.sh
LOG=$OUT/c2.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.cuda_graph=true train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32
  train.log_interval=10 train.eval_interval=1000 checkpoint.dir=null"
run 260 python3 -m megatron_bert.train $COMMON data=quickstart data.cache_dir=/tmp/qs run_dir=/tmp/plain
run 220 python3 -m megatron_bert.train $COMMON data=bert "data.prefix=[0.7,/tmp/qs/stdlib_docs,0.3,/tmp/qs/stdlib_docs]" \
  data.tokenizer=/tmp/qs/spm.model data.cache_dir=/tmp/qs run_dir=/tmp/blend "train.profile_steps=[38,39]"
for r in plain blend; do python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/$r/metrics.jsonl')]
print('LOADER $r', json.dumps([{k: r.get(k) for k in ('step','samples_per_s','data_wait_fraction','mfu','mem_gib')} for r in rows if 'data_wait_fraction' in r]))" >> "$LOG" 2>&1; done
ls -la /tmp/blend/profile >> "$LOG" 2>&1; head -25 /tmp/blend/profile/rank_0_ops.txt >> "$LOG" 2>&1
grep -E "^data:|blend|LOADER|profile of|rc=" "$LOG"
