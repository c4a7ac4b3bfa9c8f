#!/usr/bin/env bash
# Session 8, call 1 (one H200), code of commit 4958b4e (mlp_kernels.py, removed after this call): the
# MLP with the GeLU in its GEMM epilogues. Its GPU
# test and the graphed/compiled step tests; the kernels against cuBLAS + the GeLU kernels; seq 512 /
# batch 32 with and without it (MEGATRON_BERT_TRITON_MLP=0) and megatron-core in the same call.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "fused_mlp or compiled_graphed or step_matches_eager"
run 100 python3 bench/bench_kernels.py --mlp
run 80 python3 bench/bench_pretrain.py $A --profile --tag fused_mlp
run 55 env MEGATRON_BERT_TRITON_MLP=0 python3 bench/bench_pretrain.py $A --tag unfused
run 55 python3 bench/bench_pretrain.py $A --tag fused_mlp_again
run 55 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
grep -E "^RESULT|^PROFILE|^KERNEL|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
