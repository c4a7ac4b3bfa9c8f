#!/usr/bin/env bash
# Session 7, call 3 (one H200): final code. All GPU tests; the GeLU kernels (one-shot forward tiles
# with the tile-shaped bias, backward walking 128 rows); seq 512 / batch 32 against HEAD's code
# (.ab_old) and megatron-core in the same call; seq 128 / batch 64 beside megatron-core.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_flat_adamw.py tests/test_gpu.py
run 30 python3 bench/bench_kernels.py --gelu
run 50 python3 bench/bench_pretrain.py $A --profile --tag new
run 40 env PYTHONPATH=$PWD/.ab_old:$PYTHONPATH python3 .ab_old/bench/bench_pretrain.py $A --tag old
run 40 python3 bench/bench_pretrain.py $A --tag new_again
run 45 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 40 python3 bench/bench_pretrain.py --model 345m --seq 128 --batch 64 --compile --cuda-graph --tag seq128_new
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
grep -E "^RESULT|^PROFILE|^KERNEL|rc=|passed|failed|Error|FAIL|_adamw|_fwd_kernel|_bwd_kernel" "$LOG" | cut -c1-300
