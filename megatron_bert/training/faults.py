"""Surviving faults: phase labels, one-line collective errors, the heartbeat — and the test-only fault hooks.

Always on (cheap):

* The trainer keeps a label of what it is doing (``trainer.phase`` / ``trainer.phase_step``). When a
  collective times out or loses its peer, :func:`explain` turns torch's error into one line naming the
  rank, the phase and the step (``train.py`` prints it, exit code 4).
* :func:`apply_dist_timeout`: torch gives every ``dist.new_group()`` (TP/DP groups, the device mesh,
  the async-save group) the library default timeout (30 min gloo, 10 min nccl), not the one passed to
  ``init_process_group``; this makes ``train.dist_timeout`` the default for all of them.
* :class:`Heartbeat`: a daemon thread that every ``train.heartbeat_interval`` seconds rewrites
  ``<run_dir>/heartbeat/rank_<N>`` (JSON: step, phase, seconds since the last finished step) and, on
  rank 0, logs ``heartbeat: step N, last step X s ago (...)`` when no step finished in that time.
* :func:`all_finite`: all-reduced "are these tensors finite" (checked before every checkpoint save).

Test-only hooks: environment variables read once by :func:`install` at start-up. When none is set
nothing is patched and the trainer's only cost is an ``is None`` test per phase change.
``SPEC = STEP[xCOUNT][@RANK]``: step STEP and the COUNT-1 after it (default COUNT 1), on rank RANK
(default: every rank); several specs may be given, comma-separated.

=============================  =======================  ==============================================
variable                       value                    effect
=============================  =======================  ==============================================
MEGATRON_BERT_FAULT_NAN        SPEC                     the loss is NaN (so are the gradients from it)
MEGATRON_BERT_FAULT_KILL       STEP[@RANK]              the rank kills itself (SIGKILL) mid-step: after
                                                        forward/backward, before the gradient
                                                        all-reduce; first torchrun attempt only
                                                        (TORCHELASTIC_RESTART_COUNT=0), so a restarted
                                                        group runs through
MEGATRON_BERT_FAULT_HANG       SECONDS:SPEC             the rank sleeps SECONDS before the gradient
                                                        all-reduce of those steps
MEGATRON_BERT_FAULT_SAVE       ERRNO:SPEC[:FILE]        the save of step STEP fails on RANK: writing a
                                                        checkpoint file whose name contains FILE
                                                        (default: any — DCP shard, rng, meta.json)
                                                        raises OSError(ERRNO) (ENOSPC, EACCES, ...);
                                                        COUNT counts save attempts
MEGATRON_BERT_TEST_SAVE_PAUSE  STEP:SECONDS             (checkpoint/manager.py) rank 0 sleeps between
                                                        writing and renaming the save of STEP
=============================  =======================  ==============================================
"""
from __future__ import annotations

import errno
import json
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

GRAD_ALLREDUCE = "data-parallel gradient all-reduce"
ENV_NAN, ENV_KILL, ENV_HANG, ENV_SAVE = (f"MEGATRON_BERT_FAULT_{k}" for k in ("NAN", "KILL", "HANG", "SAVE"))
_FORMATS = {ENV_NAN: "STEP[xCOUNT][@RANK]", ENV_KILL: "STEP[@RANK]", ENV_HANG: "SECONDS:STEP[xCOUNT][@RANK]",
            ENV_SAVE: "ERRNO:STEP[xCOUNT][@RANK][:FILE]"}


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps, non-finite weights at a save); the message
    says why."""


class CommunicationError(RuntimeError):
    """A collective timed out or lost its peer; the message names the rank, the phase and the step."""


# --------------------------------------------------------------------------- collective errors
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "communicator was aborted",
              "nccl error")
_SHARED_STORE_HINT = "launch torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (RELIABILITY.md, elastic restarts)"


def _shared_store_restarts() -> bool:
    """Under torchrun with restarts and torch's shared rendezvous store (see RELIABILITY.md)."""
    return (os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0)


def restart_warning() -> str | None:
    if _shared_store_restarts() and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        return ("warning: torchrun --max-restarts with its shared rendezvous store: a restarted group can read the "
                f"previous attempt's addresses and fail to connect; {_SHARED_STORE_HINT}")
    return None


def explain(e: BaseException, rank: int, phase: str, step: int, timeout_s: float) -> CommunicationError | None:
    """One line for a torch.distributed failure (timeout / dead peer), or None if ``e`` is not one."""
    import torch.distributed as dist

    text = str(e)
    low = text.lower()
    if not (isinstance(e, getattr(dist, "DistError", ())) or any(k in low for k in ("gloo", "nccl", "c10d"))):
        return None
    where = f"{phase} (step {step})" if step else phase
    if "connectfullmesh" in low or "connection refused" in low:
        restarted = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0" and _shared_store_restarts()
        return CommunicationError(
            f"rank {rank}: could not connect to the other ranks in {where} — " + (
                f"this restarted attempt may have read the previous one's addresses: {_SHARED_STORE_HINT}"
                if restarted else "are they all running and reachable?"))
    if "timed out" in low or "timeout" in low:
        return CommunicationError(
            f"rank {rank}: timed out after {timeout_s:g} s in {where} — another rank is stuck or died; "
            "raise train.dist_timeout if steps are legitimately slow")
    if any(k in low for k in _PEER_LOST):
        return CommunicationError(
            f"rank {rank}: lost contact with another rank in {where} — it crashed or was killed (see its log); "
            "under torchrun --max-restarts=N the group restarts from the latest checkpoint")
    return None


def apply_dist_timeout(seconds: float) -> None:
    """Make ``seconds`` the timeout of every process group created from now on (see the module doc)."""
    import torch.distributed.distributed_c10d as c10d

    td = timedelta(seconds=seconds)
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if hasattr(c10d, name):
            setattr(c10d, name, td)


def all_finite(tensors, ps) -> bool:
    """True on every rank iff every rank's tensors are all finite (one fused norm + one all-reduce)."""
    import torch
    import torch.distributed as dist

    tensors = [t.detach() for t in tensors]
    bad = 0.0
    if tensors:
        total = torch.stack(torch._foreach_norm(tensors, 2.0, dtype=torch.float32)).sum()
        bad = 0.0 if bool(torch.isfinite(total)) else 1.0
    if ps.distributed:
        flag = torch.tensor([bad], device=ps.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        bad = float(flag.item())
    return bad == 0.0


# --------------------------------------------------------------------------- heartbeat
class Heartbeat(threading.Thread):
    """Liveness for humans and watchdogs; reads the trainer's fields without locks (plain attributes)."""

    def __init__(self, trainer, interval: float, run_dir, rank: int, log):
        super().__init__(name="heartbeat", daemon=True)
        self.trainer, self.interval, self.rank, self.log = trainer, interval, rank, log
        self.path = Path(run_dir) / "heartbeat" / f"rank_{rank}"
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.beat()

    def beat(self) -> None:
        t = self.trainer
        since = time.monotonic() - t.last_step_time
        rec = {"rank": self.rank, "pid": os.getpid(), "step": t.step, "phase": t.phase, "phase_step": t.phase_step,
               "last_step_s_ago": round(since, 1), "time": time.time()}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(rec) + "\n")
            os.replace(tmp, self.path)
        except OSError:
            pass  # a full disk must not kill the training thread's watchdog
        if self.rank == 0 and since >= self.interval:
            self.log(f"heartbeat: step {t.step}, last step {since:.0f} s ago "
                     f"(rank 0 in {t.phase}, step {t.phase_step})")

    def stop(self) -> None:
        self.done.set()


# --------------------------------------------------------------------------- test-only hooks
@dataclass
class _Spec:
    step: int
    count: int = 1
    rank: int | None = None
    arg: str = ""
    file: str = ""
    fired: int = 0

    def hits(self, step: int, rank: int) -> bool:
        return self.rank in (None, rank) and self.step <= step < self.step + self.count


def _parse(var: str, arg: bool = False, file: bool = False) -> list[_Spec]:
    text = os.environ.get(var, "").strip()
    specs = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":")
        try:
            a = parts.pop(0) if arg else ""
            core = parts.pop(0)
            f = parts.pop(0) if file and parts else ""
            if parts:
                raise ValueError
            core, _, rank = core.partition("@")
            step, _, count = core.partition("x")
            specs.append(_Spec(int(step), int(count or 1), int(rank) if rank else None, a, f))
        except (ValueError, IndexError):
            raise ValueError(f"{var}={text!r} is not {_FORMATS[var]}") from None
    return specs


class Faults:
    """The hooks that are set (see the module docstring)."""

    def __init__(self, rank: int):
        self.rank = rank
        self.nan = _parse(ENV_NAN)
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        self.kill = _parse(ENV_KILL) if first_attempt else []
        self.hang = _parse(ENV_HANG, arg=True)
        self.save = _parse(ENV_SAVE, arg=True, file=True)
        for s in self.hang:
            float(s.arg)
        for s in self.save:
            if not isinstance(getattr(errno, s.arg, None), int):
                raise ValueError(f"{ENV_SAVE}: unknown errno name {s.arg!r} (e.g. ENOSPC, EACCES)")

    def __bool__(self) -> bool:
        return bool(self.nan or self.kill or self.hang or self.save)

    def nan_loss(self, step: int) -> bool:
        return any(s.hits(step, self.rank) for s in self.nan)

    def at_phase(self, phase: str, step: int) -> None:
        if phase != GRAD_ALLREDUCE:
            return
        if any(s.hits(step, self.rank) for s in self.kill):
            os.kill(os.getpid(), signal.SIGKILL)
        for s in self.hang:
            if s.hits(step, self.rank):
                time.sleep(float(s.arg))

    def check_write(self, path) -> None:
        path = Path(path)
        for s in self.save:
            if (s.rank in (None, self.rank) and s.fired < s.count and f".step_{s.step}.tmp" in path.parts
                    and s.file in path.name):
                s.fired += 1
                code = getattr(errno, s.arg)
                raise OSError(code, f"{os.strerror(code)} (injected by {ENV_SAVE})", str(path))


ACTIVE: Faults | None = None
_dcp_patched = False


def install() -> Faults | None:
    """Read the hooks from the environment (every start, so in-process callers see changes)."""
    global ACTIVE
    faults = Faults(int(os.environ.get("RANK", "0")))
    ACTIVE = faults if faults else None
    if ACTIVE is not None and ACTIVE.save:
        _patch_dcp_writer()
    return ACTIVE


def check_write(path) -> None:
    """Called before each checkpoint file write: raises the injected OSError, if one is due."""
    if ACTIVE is not None and ACTIVE.save:
        ACTIVE.check_write(path)


def _patch_dcp_writer() -> None:
    """Route DCP's shard / .metadata writes through :func:`check_write` (only when a save fault is set)."""
    global _dcp_patched
    if _dcp_patched:
        return
    from torch.distributed.checkpoint import filesystem

    original = filesystem.FileSystem.create_stream

    @contextmanager
    def create_stream(self, path, mode):
        if "w" in mode or "a" in mode:
            check_write(path)
        with original(self, path, mode) as stream:
            yield stream

    filesystem.FileSystem.create_stream = create_stream
    _dcp_patched = True
