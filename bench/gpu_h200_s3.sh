#!/usr/bin/env bash
# Session 3 on one H200: the Triton dropout keep-mask and the one-pass flat AdamW, A/B in one call
# beside megatron-core; the one-GPU tests first, then the warm-cache restart test with the trainer's
# workaround overridden (TORCHINDUCTOR_FX_GRAPH_CACHE=1: expected to FAIL, showing the test can).
# Table: python bench/report.py $OUT/s3.log
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/s3.log
O="bench/bench_pretrain.py --model 345m"
OFF="env MEGATRON_BERT_TRITON_DROPOUT=0 MEGATRON_BERT_FLAT_ADAMW=0"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 300 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_flat_adamw.py -k "not tp2"
run 120 env TORCHINDUCTOR_FX_GRAPH_CACHE=1 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k warm_inductor
run 120 python3 $O --seq 512 --batch 32 --compile --cuda-graph --profile --tag graph
run 70 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 100 $OFF python3 $O --seq 512 --batch 32 --compile --cuda-graph --tag graph_session2_code
run 100 python3 $O --seq 512 --batch 32 --compile --cuda-graph --tag graph_again
run 90 python3 $O --seq 128 --batch 64 --compile --cuda-graph --tag seq128_graph
run 60 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
grep -E "^RESULT|^PROFILE|^KERNEL|rc=|passed|failed|Error" "$LOG"
