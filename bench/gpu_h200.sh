#!/usr/bin/env bash
# One call on one H200 (BENCHMARKS.md, 2026-12-01): ours (whole-step CUDA graph, per-layer compile,
# Triton bias+GeLU) and its A/B variants, megatron-core and HF at the same shapes, the GPU tests, and
# the trainer CLI on real data (data-loader wait). Table: python bench/report.py $OUT/h200.log
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/h200.log
O="bench/bench_pretrain.py --model 345m"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not tp2"
run 100 python3 $O --seq 512 --batch 32 --compile --cuda-graph --profile --tag graph
run 70 env MEGATRON_BERT_TRITON_GELU=0 python3 $O --seq 512 --batch 32 --compile --cuda-graph --tag graph_inductor_gelu
run 90 python3 $O --seq 128 --batch 64 --compile --cuda-graph --profile --tag seq128_graph
run 70 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 60 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
timeout 150 python3 -m megatron_bert.train model=345m data=quickstart data.cache_dir=/tmp/qs \
  data.seq_length=512 data.num_workers=4 train.precision=bf16 train.compile=true train.cuda_graph=true \
  train.max_steps=40 train.global_batch_size=32 train.micro_batch_size=32 train.log_interval=10 \
  train.eval_interval=1000 checkpoint.dir=null run_dir=/tmp/dl >> "$LOG" 2>&1; echo "rc=$? (cli)" >> "$LOG"
python3 -c "
import json; rows=[json.loads(l) for l in open('/tmp/dl/metrics.jsonl')]
print('LOADER', json.dumps([{k: r.get(k) for k in ('step','samples_per_s','data_wait_fraction','mfu','mem_gib')} for r in rows if 'data_wait_fraction' in r]))" >> "$LOG" 2>&1
run 60 python3 .bench/anchors.py hf --batch 32
run 60 python3 $O --seq 512 --batch 32 --compile --tag eager_compiled
run 120 env TORCHINDUCTOR_COORDINATE_DESCENT_TUNING=1 python3 $O --seq 512 --batch 32 --compile --cuda-graph --tag graph_cdt
grep -E "^RESULT|^PROFILE|^LOADER|rc=|passed|failed|cuda_graph|Error" "$LOG"
