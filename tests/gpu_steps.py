"""Trainer steps on synthetic batches on GPU, for tests/test_gpu.py (and tests/gpu_tp_check.py)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from bench_pretrain import SyntheticPretrainTask  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from megatron_bert.training.config import Schema  # noqa: E402
from megatron_bert.training.trainer import Trainer  # noqa: E402
from parallel import ParallelState  # noqa: E402

VOCAB = 5000


def small_config(steps: int, **train):
    """A 4-layer h512 model, seq 256, bf16 on CUDA; ``train`` overrides train.* keys."""
    cfg = OmegaConf.structured(Schema)
    cfg.run_dir = "/tmp/gpu_steps"
    cfg.model.update(name="custom", num_layers=4, hidden_size=512, num_attention_heads=8, vocab_size=VOCAB)
    cfg.data.update(seq_length=256)
    cfg.train.update({"precision": "bf16", "device": "cuda", "max_steps": steps, "lr": 1e-4,
                      "log_interval": 10**9, "eval_interval": 10**9, **train})
    cfg.checkpoint.update(dir=None, resume="none")
    return cfg


def run_steps(cfg, ps: ParallelState, steps: int, pad: bool = True,
              record: list | None = None) -> tuple[list[float], Trainer]:
    """Losses of ``steps`` train steps; the synthetic stream alternates two batches. ``record``: gets
    each step's statistics (train_step's dict)."""
    trainer = Trainer(cfg, ps, None)
    trainer.writer.enabled = False
    trainer.task = SyntheticPretrainTask(cfg, ps, trainer.log, VOCAB, pad=pad)
    trainer.setup()
    batches = trainer.task.train_batches(0)
    out = []
    for _ in range(steps):
        stats = trainer.train_step(next(batches))
        out.append(stats["loss"])
        if record is not None:
            record.append(stats)
        trainer.step += 1
    return out, trainer


def step_losses(cuda_graph: bool, dropout: float, lr: float = 1e-4, steps: int = 7, pad: bool = True,
                compile: bool = False, micro_batches: int = 2, prune: bool = True):
    """One GPU, eager or with the step captured as a CUDA graph (``compile``: train.compile, the GPU
    kernels of the fused elementwise path); a global batch of 16 in ``micro_batches`` micro-batches;
    ``prune``: train.prune_last_layer."""
    cfg = small_config(steps, global_batch_size=16, micro_batch_size=16 // micro_batches, lr=lr,
                       cuda_graph=cuda_graph, compile=compile, prune_last_layer=prune)
    cfg.model.update(hidden_dropout=dropout, attention_dropout=dropout)
    cfg.optim.update(warmup_steps=0, lr_schedule="constant")
    return run_steps(cfg, ParallelState.single(torch.device("cuda", 0)), steps, pad)
