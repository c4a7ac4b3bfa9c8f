"""Run under torchrun on 2 GPUs (see test_gpu.py): TP=2 vs TP=1 in bf16 through the trainer's step,
eager with keyed dropout, then under train.compile (each layer's halves compiled with the TP
collectives inside, our attention kernels on each rank's heads) with dropout off."""
import json
import os

import torch

from gpu_steps import run_steps, small_config
from parallel import ParallelState


def losses(tp, ps, compiled=False, steps=5):
    cfg = small_config(steps, global_batch_size=8, micro_batch_size=8, compile=compiled)
    cfg.parallel.update(tensor=tp, sequence_parallel=tp > 1, dropout_impl="native" if compiled else "keyed")
    if compiled:  # native masks differ with the layout: compare without dropout
        cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0)
    return run_steps(cfg, ps, steps, pad=True)[0]


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ps = ParallelState.from_env(2, "cuda")
    single = ParallelState.single(torch.device("cuda", ps.local_rank))
    result = {"tp2": losses(2, ps), "tp1": losses(1, single),
              "tp2_compiled": losses(2, ps, compiled=True), "tp1_compiled": losses(1, single, compiled=True)}
    if ps.is_main:
        print("RESULT", json.dumps(result), flush=True)
    ps.destroy()
