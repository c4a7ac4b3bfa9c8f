#!/usr/bin/env bash
# Call A of BENCHMARKS.md, one call on a 4-GPU machine: ours at TP=1 and megatron-core at TP=1/2/4
# side by side (345M, seq 512, global batch 32, bf16), seq 128 batch 64 at TP=1, the 2-GPU bf16 TP
# check, and the data-loader wait on real data (ours at TP>1 and the 3.9B model: gpu_final_tp.sh).
# Table with ratios: bash bench/gpu_final.sh 2>&1 | tee run.log; python bench/report.py run.log
set -u
source bench/gpu_env.sh
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
O="bench/bench_pretrain.py --model 345m --seq 512 --batch 32"
g1="env CUDA_VISIBLE_DEVICES=0"; g2="env CUDA_VISIBLE_DEVICES=0,1"
run() { local t=$1; shift; timeout "$t" "$@" 2>&1 | grep -E "^RESULT|Error|error:" | tail -3; }
run 90 $g1 python3 $O --compile --tag tp1
# (TP>1 rows of call A were taken here with whole-layer compile; the trainer no longer compiles
# layers at TP>1 — bench/gpu_final_tp.sh has the eager TP>1 measurement.)
run 70 $g1 python3 bench/bench_pretrain.py --model 345m --seq 128 --batch 64 --compile --compile-mode reduce-overhead --tag seq128
run 70 $g1 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 70 $g2 torchrun --standalone --nproc_per_node=2 .bench/anchors.py mcore --batch 32
run 70 torchrun --standalone --nproc_per_node=4 .bench/anchors.py mcore --batch 32
run 60 $g1 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tail -3
# data loader on real data (built-in corpus, seq 512, 4 workers): fraction of step time waiting for data
timeout 150 env CUDA_VISIBLE_DEVICES=0 python3 -m megatron_bert.train model=345m data=quickstart data.cache_dir=/tmp/qs \
  data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true train.max_steps=40 \
  train.global_batch_size=32 train.micro_batch_size=32 train.log_interval=10 train.eval_interval=1000 \
  checkpoint.dir=null run_dir=/tmp/dl 2>&1 | grep -E "^step|error" | tail -4
python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/dl/metrics.jsonl')]
print('LOADER', json.dumps([{k: r.get(k) for k in ('step','samples_per_s','data_wait_fraction','mfu','mem_gib')} for r in rows if 'data_wait_fraction' in r]))" 2>&1 | tail -1
