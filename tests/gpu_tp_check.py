"""Run under torchrun on 2 GPUs (see test_gpu.py): TP=2 vs TP=1 in bf16 through the trainer's step."""
import json
import os

import torch

from gpu_steps import run_steps, small_config
from parallel import ParallelState


def losses(tp, ps, steps=5):
    cfg = small_config(steps, global_batch_size=8, micro_batch_size=8)
    cfg.parallel.update(tensor=tp, sequence_parallel=tp > 1, dropout_impl="keyed")
    return run_steps(cfg, ps, steps, pad=True)[0]


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ps = ParallelState.from_env(2, "cuda")
    tp2 = losses(2, ps)
    single = ParallelState.single(torch.device("cuda", ps.local_rank))
    tp1 = losses(1, single)
    if ps.is_main:
        print("RESULT", json.dumps({"tp1": tp1, "tp2": tp2}), flush=True)
    ps.destroy()
