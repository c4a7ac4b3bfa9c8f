#!/usr/bin/env bash
# Session 14, call 3 (one H200): the attention kernels' dropout selects made in fp32 through inline PTX
# (zero_dropped: LLVM had moved tl.where past the bf16 cast onto packed pairs, sm90 SASS loops -18 to
# -22% instructions), with call 1's scale fold and dk/dv key select, beside the session-13 tree
# (.bench/base = 84b5d75) and megatron-core in the same call; then the GPU tests of the attention
# kernels and the graphed step.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c3.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 100 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 80 python3 bench/bench_pretrain.py $A --tag s14
run 60 python3 .bench/base/bench/bench_pretrain.py $A --tag base
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 50 python3 bench/bench_pretrain.py $A --tag s14b
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag base2
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention or cuda_graph_step_matches"
grep -E "^RESULT|^KERNEL|^BEST|^ACCURACY|PARTS|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-250
