"""Entry point: ``torchrun --nproc_per_node=N -m megatron_bert.train [key=value ...]``.

Plain ``python -m megatron_bert.train`` runs one process; ``--help`` lists the config groups and keys,
``--cfg job [key=value ...]`` prints the resolved config without running. Errors print one line (``error: ...``) and
exit non-zero; set ``HYDRA_FULL_ERROR=1`` or ``MEGATRON_BERT_DEBUG=1`` for the traceback.
Exit codes: 2 bad config / data / checkpoint (or a failed save), 3 training stopped (non-finite steps),
4 a collective timed out or lost its peer (the line names the rank, phase and step). RELIABILITY.md.
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
    """Errors printed as one line: bad config, data or checkpoint (the config and data errors are
    ValueErrors), a failed save, training stopped. The two RuntimeError kinds come from their modules
    only once those are imported: an error of a module that never loaded was not raised, and importing
    the trainer (torch.distributed.checkpoint, ~1 s) just to name them slowed every bad-config exit."""
    errors = [ValueError, OSError, KeyboardInterrupt]
    for module, name in (("checkpoint.sharded", "CheckpointError"), ("training.trainer", "TrainingStopped")):
        cls = getattr(sys.modules.get(f"{__package__}.{module}"), name, None)
        if cls is not None:
            errors.append(cls)
    return tuple(errors)


# Errors that every rank hits identically: only rank 0 needs to say them. (Checkpoint save failures are
# agreed on by all ranks; the non-finite decision that raises TrainingStopped is the same on every rank.)
_CONSISTENT = ("ConfigError", "ModelConfigError", "ParallelConfigError", "CheckpointError", "TaskDataError",
               "TrainingStopped")


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, OSError) and e.filename and e.strerror:  # e.g. "No such file or directory: /x/docs.idx"
        text = f"{e.strerror}: {e.filename}"
    return text.splitlines()[0] if text else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = os.environ.get("HYDRA_FULL_ERROR") == "1" or os.environ.get("MEGATRON_BERT_DEBUG") == "1"
    rank = int(os.environ.get("RANK", "0"))
    ps = trainer = cfg = None
    try:
        from parallel import ParallelState

        from .training import faults
        from .training.config import ConfigError, compose, validate

        faults.install()  # test-only fault hooks from the environment (nothing when unset)
        from .training.cli_help import handle_flags

        world = os.environ.get("WORLD_SIZE")
        text = handle_flags(argv, int(world) if world else None)  # --help, --cfg job
        if text is not None:
            if rank == 0:
                print(text, end="")
            return 0
        cfg = compose(argv)
        validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process-group work
        from .training.trainer import Trainer  # after validate: a bad config exits without its imports
        faults.apply_dist_timeout(cfg.train.dist_timeout)  # also for groups torch creates (device mesh)
        ps = ParallelState.from_env(cfg.parallel.tensor, cfg.train.device, cfg.train.dist_timeout)
        trainer = Trainer(cfg, ps, None, argv)
        trainer.task = build_task(cfg, ps, trainer.log)
        if faults.restart_warning():
            trainer.log(faults.restart_warning())
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
            print(f"{prefix}error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 3 if type(e).__name__ == "TrainingStopped" else 2
    except RuntimeError as e:  # a collective timed out or lost its peer: say where, on this rank's line
        from .training import faults

        phase, step = (trainer.phase, trainer.phase_step) if trainer is not None else ("process-group start-up", 0)
        err = faults.explain(e, rank, phase, step, cfg.train.dist_timeout if cfg is not None else 0)
        if debug or err is None:
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 4
    finally:
        if ps is not None:
            ps.destroy()


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Everything is saved, flushed and the process group destroyed. Interpreter teardown can still
        # abort on torch's collective threads ("terminate called without an active exception", seen
        # rarely with gloo after a clean run), turning success into a crash: leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
