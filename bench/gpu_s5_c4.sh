#!/usr/bin/env bash
# Session 5, call 4 (one H200): GeLU tile shapes (autotuner timings), GPU tests, then A/B at seq 512 /
# batch 32 (graphed) beside megatron-core: session-4 code (.ab_old) and this tree (GeLU without
# libdevice's erf and with 8-32 elements per thread, LayerNorm forward kernel, one-shot column sums);
# seq 128 / batch 64 beside megatron-core.
# Table: python bench/report.py $OUT/c4.log
# .ab_old (git-ignored, carried): mkdir .ab_old && git archive 753a99d megatron_bert parallel \
#   bench/bench_pretrain.py bench/profile_summary.py | tar -x -C .ab_old
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c4.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 60 python3 bench/bench_kernels.py --gelu
run 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_flat_adamw.py -k "not tp2"
run 80 python3 .ab_old/bench/bench_pretrain.py $A --tag old
run 80 python3 bench/bench_pretrain.py $A --profile --tag new
run 50 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag new_again
run 45 python3 .ab_old/bench/bench_pretrain.py $A --tag old_again
run 45 python3 bench/bench_pretrain.py --model 345m --seq 128 --batch 64 --compile --cuda-graph --tag seq128_new
run 45 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
grep -E "^KERNEL|^RESULT|^PROFILE|rc=|passed|failed|Error" "$LOG" | cut -c1-330
