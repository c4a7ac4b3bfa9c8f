#!/usr/bin/env bash
# The main job on the built-in default: pretrain a tiny Megatron BERT with tensor parallelism 2 on
# CPU (two gloo processes) on the English prose that ships with Python itself (stdlib docstrings and
# pydoc topics). Installs what is missing, builds corpus + tokenizer + dataset on first use (cached
# in data_cache/quickstart), trains, and prints where the metrics and checkpoint are.
#
#   bash launch/quickstart.sh                      # defaults below
#   bash launch/quickstart.sh train.max_steps=50   # any Hydra override
set -euo pipefail
cd "$(dirname "$0")/.."

python -c "import torch" 2>/dev/null || pip install torch==2.13.0
(cd /tmp && python -c "import megatron_bert.train, hydra, sentencepiece, regex, numpy") 2>/dev/null || pip install -e .

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
RUN_DIR="${RUN_DIR:-runs/quickstart-$(date +%Y%m%d-%H%M%S)}"  # one value for both ranks

torchrun --standalone --nproc_per_node=2 -m megatron_bert.train \
    model=tiny parallel.tensor=2 train.device=cpu data=quickstart \
    train.max_steps=150 train.global_batch_size=32 train.micro_batch_size=16 train.lr=1e-3 \
    optim.warmup_steps=10 train.log_interval=10 train.eval_interval=50 train.eval_iters=2 \
    checkpoint.save_interval=50 run_dir="$RUN_DIR" "$@"

echo
echo "metrics:     $RUN_DIR/metrics.jsonl"
echo "checkpoints: $RUN_DIR/checkpoints (latest: $(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null || echo none))"
echo "config:      $RUN_DIR/.hydra/config.yaml"
