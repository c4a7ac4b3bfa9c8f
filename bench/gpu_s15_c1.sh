#!/usr/bin/env bash
# Session 15, call 1 (one H200): the attention dropout mask's logarithms on the SFU (drop_bits) and the
# residual epilogue's mask from 16-bit halves (eight elements per Philox call), kernel by kernel and in
# the step, beside the session-14 tree (.bench/base = 61e0981) and megatron-core in the same call; then
# the GPU tests of the kernels touched and the graphed step.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/c1.log
A="--model 345m --seq 512 --batch 32 --compile --cuda-graph"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$LOG"
MASK='import torch, triton.testing as tt
from megatron_bert.model import drop_mask_kernels as dm
seed = torch.tensor([5], dtype=torch.int64, device="cuda")
out = torch.empty(16, 32 * 16 * 512, dtype=torch.int32, device="cuda")
f = lambda: dm.drop_bits(seed, 32 * 16 * 512, 512, 0.1, 0, out=out)
f(); torch.cuda.synchronize()
print("MASKBITS", dm.__file__, round(tt.do_bench(f, warmup=50, rep=300) * 1e3, 1), "us")'
for tree in . .bench/base; do
  (cd $tree && run 60 python3 -c "$MASK" && run 60 python3 bench/bench_kernels.py --residual-norm)
done
run 70 python3 bench/bench_pretrain.py $A --tag s15
run 50 python3 .bench/base/bench/bench_pretrain.py $A --tag s14tree
run 35 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 45 python3 bench/bench_pretrain.py $A --tag s15b
run 45 python3 .bench/base/bench/bench_pretrain.py $A --tag s14treeb
run 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "dropout or residual or triton_attention or cuda_graph"
grep -E "^RESULT|^KERNEL|^MASKBITS|rc=|passed|failed|Error|FAIL" "$LOG" | cut -c1-250
