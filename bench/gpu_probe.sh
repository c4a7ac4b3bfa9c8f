#!/usr/bin/env bash
# Session-2 probe on one H200: kernel floors, where our step's GPU time goes (profiled, compiled and
# eager, seq 512 and 128), and megatron-core at the same shapes, in one call.
set -u
source bench/gpu_env.sh
LOG=${OUT:-/tmp}/probe.log
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader | tee -a "$LOG"
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())" | tee -a "$LOG"
O="bench/bench_pretrain.py --model 345m"
run 90 python3 bench/bench_kernels.py
run 150 python3 $O --seq 512 --batch 32 --compile --profile --tag tp1_compiled
run 100 python3 $O --seq 128 --batch 64 --compile --profile --tag seq128_compiled
run 80 python3 $O --seq 512 --batch 32 --profile --tag tp1_eager
run 80 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 32
run 60 torchrun --standalone --nproc_per_node=1 .bench/anchors.py mcore --batch 64 --seq 128
grep -E "^RESULT|^PROFILE|rc=|Error" "$LOG"
