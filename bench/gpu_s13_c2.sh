#!/usr/bin/env bash
# A record of the call: the fused backward and its MEGATRON_BERT_ATTENTION_BACKWARD switch were removed
# after it (bench/NOTES.md, session 13, describes the kernel; its tree was not committed).
# Session 13, call 2 (one H200): variants of the fused attention backward as autotune candidates
# (DQ_T: the dq scratch transposed, dqᵀ += kᵀ dSᵀ; PREFETCH: its tile loaded before the block pair's
# products), timed beside the split kernels; the step (fused against split) only if a fused
# candidate beats the split pair.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 150 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
ms() { grep "ours bwd $1 p=0.1" "$LOG" | tail -1 | sed 's/.*"ms": \([0-9.]*\).*/\1/'; }
if python3 -c "import sys; sys.exit(0 if float('$(ms fused)') < float('$(ms split)') else 1)"; then
  run 80 python3 bench/bench_pretrain.py $A --tag fused
  run 50 env MEGATRON_BERT_ATTENTION_BACKWARD=split python3 bench/bench_pretrain.py $A --tag split
  run 45 python3 bench/bench_pretrain.py $A --tag fused2
fi
grep -E "^RESULT|^KERNEL|^BEST|^TILE|^FUSED|rc=|passed|failed|Error|FAIL" "$LOG" | grep -v drop_bits | cut -c1-300
