#!/usr/bin/env bash
# Session 4, call 2 (one H200): A/B of the Inductor-side changes at seq 512 / batch 32, graphed.
#   old     : the session-3 code (snapshot of HEAD in .ab_old, carried)
#   new     : embeddings looked up in [s, b] order (contiguous residual stream)
#   splitN  : + mix-order LayerNorm-backward reduction split into N-row chunks (Inductor default 16
#             on 132 SMs, whose 1024 x 1024 partial sums then take an eager 8.5 us sum each)
#   reads0  : + no cap on the reads of a mix-order kernel (lets the recomputed fp32 LN input fuse in)
# .ab_old (git-ignored, carried): mkdir .ab_old && git archive 183276a megatron_bert parallel \
#   bench/bench_pretrain.py bench/profile_summary.py | tar -x -C .ab_old
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/ab.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
W="python3 bench/with_inductor.py"
S=triton.mix_order_reduction_split_size
R=triton.mix_order_reduction_max_reads
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 120 python3 .ab_old/bench/bench_pretrain.py $A --tag old
run 100 python3 bench/bench_pretrain.py $A --tag new
run 100 $W $S=64 -- bench/bench_pretrain.py $A --tag split64
run 100 $W $S=128 -- bench/bench_pretrain.py $A --tag split128
run 100 $W $R=0 -- bench/bench_pretrain.py $A --tag reads0
run 100 $W $S=64 $R=0 -- bench/bench_pretrain.py $A --tag split64_reads0
run 60 python3 .ab_old/bench/bench_pretrain.py $A --tag old_again
grep -E "^RESULT|rc=|Error|inductor config" "$LOG" | cut -c1-400
