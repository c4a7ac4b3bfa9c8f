"""Run under torchrun on 2 GPUs (see test_gpu.py): TP=2 vs TP=1 in bf16 through the trainer's step."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))

from bench_pretrain import SyntheticPretrainTask  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from megatron_bert.training.config import Schema  # noqa: E402
from megatron_bert.training.trainer import Trainer  # noqa: E402
from parallel import ParallelState  # noqa: E402


def losses(tp, ps, steps=5):
    cfg = OmegaConf.structured(Schema)
    cfg.run_dir = "/tmp/gpu_tp_check"
    cfg.model.update(name="custom", num_layers=4, hidden_size=512, num_attention_heads=8, vocab_size=5000)
    cfg.parallel.update(tensor=tp, sequence_parallel=tp > 1, dropout_impl="keyed")
    cfg.data.update(seq_length=256)
    cfg.train.update(global_batch_size=8, micro_batch_size=8, precision="bf16", device="cuda", max_steps=steps,
                     lr=1e-4, log_interval=10**9, eval_interval=10**9)
    cfg.checkpoint.update(dir=None, resume="none")
    trainer = Trainer(cfg, ps, None)
    trainer.writer.enabled = False
    trainer.task = SyntheticPretrainTask(cfg, ps, trainer.log, 5000, pad=True)
    trainer.setup()
    batches = trainer.task.train_batches(0)
    out = []
    for _ in range(steps):
        out.append(trainer.train_step(next(batches))["loss"])
        trainer.step += 1
    return out


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    ps = ParallelState.from_env(2, "cuda")
    tp2 = losses(2, ps)
    single = ParallelState.single(torch.device("cuda", ps.local_rank))
    tp1 = losses(1, single)
    if ps.is_main:
        print("RESULT", json.dumps({"tp1": tp1, "tp2": tp2}), flush=True)
    ps.destroy()
