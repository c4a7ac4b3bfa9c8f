#!/usr/bin/env bash
# Session 15, call 2 (one H200): the residual epilogue kernels of this tree and of the session-14 tree
# (.bench/base = 61e0981; call 1 timed this tree's twice: bench_kernels.py read the package from the path),
# and the step of three trees: this one, session 14's with only the SFU logarithms of drop_bits
# (.bench/mix), and session 14's; megatron-core in the same call.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
BASE=$PWD/.bench/base
PYTHONPATH=$BASE:$PYTHONPATH run 60 python3 $BASE/bench/bench_kernels.py --residual-norm
run 60 python3 bench/bench_kernels.py --residual-norm
PYTHONPATH=$BASE:$PYTHONPATH run 60 python3 -c "import megatron_bert.model.residual_norm_kernels as r; print('BASEFILE', r.__file__)"
run 70 python3 bench/bench_pretrain.py $A --tag s15
run 50 python3 .bench/mix/bench/bench_pretrain.py $A --tag mix
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag s14tree
run 35 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s15b
run 45 python3 .bench/mix/bench/bench_pretrain.py $A --tag mixb
grep -E "^RESULT|^KERNEL|^BASEFILE|rc=|passed|failed|Error|FAIL" "$LOG" | grep -v "per_sm" | cut -c1-250
