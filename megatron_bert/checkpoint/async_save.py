"""``checkpoint.async_save=true``: copy the state to CPU, write it in a background thread.

Training stalls only for the copy (pinned buffers + one synchronize on GPU). The write is a plain
``dcp.save`` of the staged copy, run in a thread on a dedicated gloo process group so its
collectives never interleave with the training collectives on the world group.

Completion needs no extra coordination: DCP's final step gathers every rank's write results on
rank 0 before rank 0 writes ``.metadata`` and returns, so when rank 0's ``dcp.save`` returns, all
ranks have finished writing (and wrote their RNG file before entering it). Rank 0's writer thread
then writes ``meta.json``, renames ``.step_<N>.tmp`` → ``step_<N>`` and updates ``latest``; until
then ``latest`` keeps pointing at the previous complete checkpoint.

At most one save is in flight: the next save (and the end of training) first waits for the
pending one and re-raises its error, if any, on every rank (DCP reports a failure on any rank to
all of them).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import torch.distributed as dist

from parallel import ParallelState

from .manager import agree, begin_save, finalize_save, full_meta, save_rng
from .sharded import CheckpointError, build_state_dict, stage_state_dict, write_state


class AsyncCheckpointSaver:
    def __init__(self, ps: ParallelState, log=print):
        self.ps = ps
        self.log = log
        self._group = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending: Path | None = None

    @property
    def pending(self) -> Path | None:
        """The step directory being written, or None."""
        return self._pending if self._thread is not None and self._thread.is_alive() else None

    def _process_group(self):
        if self._group is None and self.ps.distributed:
            # Collective (every rank creates it at the same save). gloo: the staged copy lives on CPU.
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, root, step: int, model, optimizer, meta: dict, rng_state: dict | None = None,
             keep: int = 0) -> tuple[Path, float]:
        """Collective. Returns (the step directory it will become, seconds the training loop was held)."""
        t0 = time.perf_counter()
        self.wait()
        group = self._process_group()
        tmp, final = begin_save(root, step, self.ps)
        staged = stage_state_dict(build_state_dict(model, optimizer, self.ps),
                                  pin_memory=self.ps.device.type == "cuda")
        error = None
        try:
            save_rng(tmp, self.ps.rank, rng_state)
        except OSError as e:  # e.g. disk full: every rank must learn of it, not hang in the writer
            error = e
        agree(self.ps, error, step, tmp)
        meta = full_meta(meta, step, self.ps)
        self._error = None
        self._pending = final
        self._thread = threading.Thread(target=self._write, args=(staged, tmp, final, meta, keep, group),
                                        name=f"checkpoint-step_{step}", daemon=True)
        self._thread.start()
        return final, time.perf_counter() - t0

    def _write(self, staged, tmp: Path, final: Path, meta: dict, keep: int, group) -> None:
        t0 = time.perf_counter()
        try:
            write_state(staged, tmp, self.ps, process_group=group)
            if self.ps.is_main:
                finalize_save(tmp, final, meta, keep)
                self.log(f"saved checkpoint {final} (async, written in {time.perf_counter() - t0:.1f} s)")
        except BaseException as e:  # re-raised by wait() on the training thread
            self._error = e

    def wait(self) -> None:
        """Block until the pending save (if any) is complete; raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._pending = None
        if self._error is not None:
            e, self._error = self._error, None
            if isinstance(e, CheckpointError):
                raise e
            raise CheckpointError(f"background checkpoint save failed: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            try:
                dist.destroy_process_group(self._group)
            except Exception:
                pass
            self._group = None
