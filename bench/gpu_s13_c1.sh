#!/usr/bin/env bash
# A record of the call: the fused backward and its MEGATRON_BERT_ATTENTION_BACKWARD switch were removed
# after it (bench/NOTES.md, session 13, describes the kernel; its tree was not committed).
# Session 13, call 1 (one H200): the fused attention backward (one program per (sample, head): five
# tile products per block pair, dq added up in an fp32 scratch) against the split one (seven), as
# kernels (bench_attention.py, both paths' grads compared) and in the step
# (MEGATRON_BERT_ATTENTION_BACKWARD=split), megatron-core in the same call; then the GPU tests of the
# attention kernels (both paths) and of the graphed step.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 90 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 80 python3 bench/bench_pretrain.py $A --tag fused
run 50 env MEGATRON_BERT_ATTENTION_BACKWARD=split python3 bench/bench_pretrain.py $A --tag split
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag fused2
run 45 env MEGATRON_BERT_ATTENTION_BACKWARD=split python3 bench/bench_pretrain.py $A --tag split2
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention or cuda_graph_step_matches"
grep -E "^RESULT|^KERNEL|^BEST|^TILE|^FUSED|^ACCURACY|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
