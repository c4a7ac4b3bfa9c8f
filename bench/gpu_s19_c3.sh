#!/usr/bin/env bash
# Session 19, call 3 (one H200): as call 2, with the model inputs now made in the loader workers; the data loader with a blend of corpora (data.prefix=[0.7,P,0.3,P], the
# second member on its own random stream) beside the plain corpus, 345M seq 512 batch 32 through the CLI
# (compile + CUDA graph, 4 workers); then the two CUDA-graph CLI tests.
source bench/gpu_env.sh
LOG=$OUT/c3.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.cuda_graph=true train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32
  train.log_interval=10 train.eval_interval=1000 checkpoint.dir=null"
run 260 python3 -m megatron_bert.train $COMMON data=quickstart data.cache_dir=/tmp/qs run_dir=/tmp/plain
run 220 python3 -m megatron_bert.train $COMMON data=bert "data.prefix=[0.7,/tmp/qs/stdlib_docs,0.3,/tmp/qs/stdlib_docs]" \
  data.tokenizer=/tmp/qs/spm.model data.cache_dir=/tmp/qs run_dir=/tmp/blend
for r in plain blend; do python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/$r/metrics.jsonl')]
print('LOADER $r', json.dumps([{k: r.get(k) for k in ('step','samples_per_s','data_wait_fraction','mfu','mem_gib')} for r in rows if 'data_wait_fraction' in r]))" >> "$LOG" 2>&1; done
grep -E "^data:|blend|LOADER|profile of|rc=" "$LOG"
run 300 python3 -m pytest -q -x tests/test_gpu.py -k "profiled_cuda_graph or cuda_graph_run_saves or pruned_last_layer_steps" -rA
tail -8 "$LOG"
