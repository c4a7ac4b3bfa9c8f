#!/usr/bin/env bash
# A record of the call: its MEGATRON_BERT_MASKS_AHEAD / MEGATRON_BERT_RESIDUAL_BITS switches and the
# multi-row mask shapes were removed after it (bench/NOTES.md, session 12).
# Session 12, call 1 (one H200): the mask seeds drawn once per forward, the attention bias-grad
# partials without a zero-fill, drop_bits lanes drawing several rows in turn (PASSES, autotuned), and
# the masks drawn ahead on a side stream (MEGATRON_BERT_MASKS_AHEAD=1, off by default). The step against
# the session-11 tree (.bench/base = 639357a) in the same call, which ops launch the small kernels
# (an eager profile), the attention kernels' tiles, then the GPU tests touched.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
run 80 python3 .bench/base/bench/bench_pretrain.py $A --tag base
run 75 python3 bench/bench_pretrain.py $A --tag s12
run 50 env MEGATRON_BERT_MASKS_AHEAD=1 python3 bench/bench_pretrain.py $A --tag ahead
run 45 python3 bench/bench_pretrain.py $A --tag s12b
run 45 python3 .bench/base/bench/bench_pretrain.py $A --tag base2
run 70 python3 bench/bench_pretrain.py --model 345m --seq 512 --batch 32 --compile --tag launches --profile \
  --profile-launches 'Memset|Fill|distribution|randint|fill'
run 60 python3 bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64 --no-baseline
run 200 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "triton_attention or masks_drawn_ahead or pruned_last_layer_steps or cuda_graph_replays"
grep -E "^RESULT|^PROFILE|^LAUNCH|^KERNEL|^BEST|^TILE|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-300
