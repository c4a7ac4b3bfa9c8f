#!/usr/bin/env bash
# Session 6, call 1 (one H200): the fused residual epilogue + LayerNorm kernels (residual_norm_kernels.py)
# checked on the GPU, then seq 512 / batch 32 (graphed, profiled) against session-5 code (.ab_old) and
# with the fused path switched off in this tree, megatron-core beside them, then the GPU tests.
# .ab_old (git-ignored, carried): mkdir .ab_old && git archive 23ab07b megatron_bert parallel \
#   bench/bench_pretrain.py bench/profile_summary.py | tar -x -C .ab_old
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 120 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k residual_layer_norm
run 90 python3 bench/bench_pretrain.py $A --profile --tag new
run 80 python3 .ab_old/bench/bench_pretrain.py $A --tag old
run 45 env MEGATRON_BERT_TRITON_RESIDUAL_NORM=0 python3 bench/bench_pretrain.py $A --tag new_rn_off
run 45 python3 bench/bench_pretrain.py $A --tag new_again
run 50 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_gpu_flat_adamw.py -k "not tp2 and not residual_layer_norm"
grep -E "^KERNEL|^RESULT|^PROFILE|rc=|passed|failed|Error|FAIL|OK cuda" "$LOG" | cut -c1-400
