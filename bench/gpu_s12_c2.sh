#!/usr/bin/env bash
# A record of the call: its MEGATRON_BERT_MASKS_AHEAD / MEGATRON_BERT_RESIDUAL_BITS switches and the
# multi-row mask shapes were removed after it (bench/NOTES.md, session 12).
# Session 12, call 2 (one H200): the residual epilogues' masks drawn apart as bits (drop_bits, rows of 128
# elements) and read by the residual + LayerNorm kernel instead of its in-kernel Philox draw
# (MEGATRON_BERT_RESIDUAL_BITS: 1 bits kept for the backward, the default; 2 kept as bytes; 0 the old
# draw), the position embeddings as a slice and the token types as a select (no sort in the backward),
# beside the session-11 tree (.bench/base = 639357a) and megatron-core in the same call; then the GPU
# tests the changes touch.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c2.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 80 python3 .bench/base/bench/bench_pretrain.py $A --tag base
run 80 python3 bench/bench_pretrain.py $A --tag bits1
run 50 env MEGATRON_BERT_RESIDUAL_BITS=2 python3 bench/bench_pretrain.py $A --tag bits2
run 50 env MEGATRON_BERT_RESIDUAL_BITS=0 python3 bench/bench_pretrain.py $A --tag bits0
run 45 python3 bench/bench_pretrain.py $A --tag bits1b
run 45 python3 .bench/base/bench/bench_pretrain.py $A --tag base2
run 40 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 60 python3 bench/bench_pretrain.py $A --tag bits1-profile --profile
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "residual_layer_norm or cuda_graph_replays or pruned_last_layer_steps or compiled_graphed"
grep -E "^RESULT|^PROFILE|^ +[0-9.]+ ms|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
