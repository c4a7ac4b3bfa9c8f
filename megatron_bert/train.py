"""Entry point: ``torchrun --nproc_per_node=N -m megatron_bert.train [key=value ...]``.

Plain ``python -m megatron_bert.train`` runs one process. Errors print one line (``error: ...``) and
exit non-zero; set ``HYDRA_FULL_ERROR=1`` or ``MEGATRON_BERT_DEBUG=1`` for the traceback.
"""
from __future__ import annotations

import os
import sys


def build_task(cfg, ps, log):
    if cfg.task.name == "pretrain":
        from .training.pretrain import PretrainTask

        return PretrainTask(cfg, ps, log)
    from .training.finetune import FinetuneTask

    return FinetuneTask(cfg, ps, log)


def _known_errors() -> tuple:
    from parallel import ParallelConfigError

    from .checkpoint import CheckpointError
    from .config import ModelConfigError
    from .training.config import ConfigError
    from .training.trainer import TrainingStopped

    errors = [ConfigError, ModelConfigError, ParallelConfigError, CheckpointError, TrainingStopped,
              ValueError, OSError, KeyboardInterrupt]
    try:
        from .tasks import TaskDataError

        errors.append(TaskDataError)
    except ImportError:
        pass
    return tuple(errors)


# Errors that every rank hits identically: only rank 0 needs to say them.
_CONSISTENT = ("ConfigError", "ModelConfigError", "ParallelConfigError", "CheckpointError", "TaskDataError")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("MEGATRON_BERT_DEBUG") == "1"
    rank = int(os.environ.get("RANK", "0"))
    ps = None
    try:
        from parallel import ParallelState

        from .training.config import ConfigError, compose, validate
        from .training.trainer import Trainer, TrainingStopped

        cfg = compose(argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process-group work
        ps = ParallelState.from_env(cfg.parallel.tensor, cfg.train.device, cfg.train.dist_timeout)
        trainer = Trainer(cfg, ps, None, argv)
        trainer.task = build_task(cfg, ps, trainer.log)
        if cfg.task.mode != "train" and not hasattr(trainer.task, "run_mode"):
            raise ConfigError(f"task.mode={cfg.task.mode} is for fine-tuning tasks (task=glue|ner|squad|race)")
        trainer.setup()
        if cfg.task.mode != "train":  # evaluate / predict with the loaded weights, no training
            return trainer.task.run_mode(trainer)
        return trainer.run()
    except _known_errors() as e:
        if debug:
            raise
        if rank == 0 or type(e).__name__ not in _CONSISTENT:
            prefix = "" if rank == 0 else f"[rank {rank}] "
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"{prefix}error: {msg}", file=sys.stderr, flush=True)
        return 3 if type(e).__name__ == "TrainingStopped" else 2
    finally:
        if ps is not None:
            ps.destroy()


if __name__ == "__main__":
    sys.exit(main())
