#!/usr/bin/env bash
# Session 21, call 1 (one H200): does span masking keep the data loader off the critical path? The 345M
# seq 512 b32 CLI run of session 20's c2 (compile + CUDA graph, 4 workers) with BERT's token masking, with
# whole-word 3-gram masking (Megatron-LM's) and with SpanBERT's geometric spans of up to 10 words:
# samples/s and data_wait_fraction (issue 9: < 2%). Then task.mode=evaluate of the first run's checkpoint
# on the GPU in bf16.
source bench/gpu_env.sh
LOG=$OUT/c1.log; : > "$LOG"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
COMMON="model=345m data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true
  train.cuda_graph=true train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32
  train.log_interval=10 train.eval_interval=40 train.eval_iters=4 data=quickstart data.cache_dir=/tmp/qs"
run 240 python3 -m megatron_bert.train $COMMON run_dir=/tmp/tokens checkpoint.save_interval=40
run 200 python3 -m megatron_bert.train $COMMON run_dir=/tmp/wwm3 checkpoint.dir=null \
  data.whole_word_masking=true data.max_ngrams=3
run 200 python3 -m megatron_bert.train $COMMON run_dir=/tmp/geo10 checkpoint.dir=null \
  data.whole_word_masking=true data.max_ngrams=10 data.ngram_distribution=geometric
run 150 python3 -m megatron_bert.train task.mode=evaluate task.pretrained=/tmp/tokens/checkpoints \
  data=quickstart data.cache_dir=/tmp/qs data.seq_length=512 train.precision=bf16 train.global_batch_size=32 \
  train.micro_batch_size=32 train.eval_iters=4 run_dir=/tmp/eval
python3 -c "
import json
for run in ('tokens', 'wwm3', 'geo10', 'eval'):
    rows = [json.loads(l) for l in open(f'/tmp/{run}/metrics.jsonl')]
    print('SPEED', run, json.dumps([{k: r.get(k) for k in ('step', 'split', 'samples_per_s', 'data_wait_fraction',
          'mfu', 'mem_gib', 'lm_loss', 'lm_accuracy', 'binary_loss') if k in r} for r in rows]))" >> "$LOG" 2>&1
grep -E "SPEED|rc=|error" "$LOG"
