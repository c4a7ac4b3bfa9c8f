"""Checkpoint directories: ``<root>/step_<N>/`` written atomically, ``<root>/latest`` written last.

A save goes to ``<root>/.step_<N>.tmp``; only when every rank has finished writing does rank 0
write ``meta.json`` into it, rename it to ``step_<N>`` and then replace ``latest`` (write temp +
rename). A crash at any point leaves the previous checkpoint and pointer intact; leftover
``.step_*.tmp`` / ``.step_*.old`` directories are never read (resume only looks at ``step_<N>``
directories that hold ``meta.json``) and are removed by the next save. ``<root>/best`` (written with
``latest`` when the trainer saves the best evaluation's step, checkpoint.best_metric) names a checkpoint
that ``keep`` never prunes; both pointer files are accepted wherever a checkpoint path is.

A failure on any rank (disk full, permission denied, a dead shard writer) is agreed on by every rank
(:func:`agree`, an all-reduced flag where a barrier used to be): all of them raise the same
``CheckpointError``, rank 0 removes the partial ``.step_<N>.tmp``, and ``latest`` and the earlier
checkpoints stay as they were. What happens next (retry or stop) is the trainer's
``checkpoint.on_error``.

Test hook (used by tests/test_checkpoint*.py only): ``MEGATRON_BERT_TEST_SAVE_PAUSE=STEP:SECONDS``
makes rank 0 sleep when the save of step STEP has written everything into ``.step_STEP.tmp`` but
not yet renamed it — the window a crash (``kill -9``) must survive. With async saves the sleep is
in the background writer, so training visibly goes on while the checkpoint is pending.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from parallel import ParallelState

from ..training import faults
from .sharded import CheckpointError, load_state, read_full_state, save_state, write_full_state

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"
BEST_FILE = "best"  # names the step_<N> of the best evaluation (checkpoint.best_metric); never pruned
PAUSE_ENV = "MEGATRON_BERT_TEST_SAVE_PAUSE"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    faults.check_write(tmp)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step_{step}"


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``root`` (``step_<N>`` directories holding ``meta.json``), by step."""
    root = Path(root)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith("step_") and d.is_dir() and (d / META_FILE).exists():
                try:
                    found.append((int(d.name[5:]), d))
                except ValueError:
                    pass
    return sorted(found)


def _pointed_at(pointer: Path) -> Path | None:
    """The complete ``step_<N>`` sibling a pointer file (``latest``, ``best``) names, or None."""
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    target = pointer.parent / name
    if name.startswith("step_") and "/" not in name and (target / META_FILE).exists():
        return target
    return None


def latest_checkpoint(root) -> Path | None:
    """The checkpoint ``latest`` names; falls back to the newest complete step directory."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.exists():
        target = _pointed_at(pointer)
        if target is not None:
            return target
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def best_checkpoint(root) -> Path | None:
    """The checkpoint ``best`` names (checkpoint.best_metric), if any."""
    pointer = Path(root) / BEST_FILE
    return _pointed_at(pointer) if pointer.exists() else None


def resolve_checkpoint(path) -> Path:
    """A step directory, a root holding ``latest``, or a pointer file (``latest``, ``best``) → the step
    directory. Clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist: check checkpoint.resume / task.pretrained")
    if p.is_file() and p.name in (LATEST_FILE, BEST_FILE):  # a pointer: the step directory it names
        target = _pointed_at(p)
        if target is None:
            raise CheckpointError(f"{p} does not name a complete step_<N> directory next to it: "
                                  f"point at a step_<N> directory of {p.parent}")
        return target
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is not a directory: point at a step_<N> directory or its parent")
    if p.name.startswith(".step_") and p.name.endswith((".tmp", ".old")):
        raise CheckpointError(f"{p} is the temporary directory of an interrupted save, not a checkpoint: "
                              f"use a step_<N> directory of {p.parent}")
    if (p / META_FILE).exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p} holds no complete checkpoint (no step_<N>/{META_FILE}): "
                              "point at a step_<N> directory")
    return latest


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((Path(ckpt) / META_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{Path(ckpt) / META_FILE} is unreadable ({e.__class__.__name__}): the checkpoint is corrupt") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        version = meta.get("format_version") if isinstance(meta, dict) else None
        raise CheckpointError(f"{ckpt} has checkpoint format {version!r}, expected {FORMAT_VERSION}")
    return meta


def _rng_file(ckpt: Path, rank: int) -> Path:
    return Path(ckpt) / "rng" / f"rank_{rank:05d}.pt"


# --------------------------------------------------------------------------- save protocol
def _clean_stale(root: Path) -> None:
    """Remove what interrupted saves / prunes left behind (rank 0, while no save is in flight)."""
    for d in root.iterdir():
        if d.name.startswith(".step_") and (d.name.endswith(".tmp") or d.name.endswith(".old")):
            shutil.rmtree(d, ignore_errors=True)


def begin_save(root, step: int, ps: ParallelState) -> tuple[Path, Path]:
    """Collective: rank 0 prepares an empty ``.step_<N>.tmp``; returns (tmp, final)."""
    root = Path(root)
    tmp, final = root / f".step_{step}.tmp", step_dir(root, step)
    error = None
    if ps.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            _clean_stale(root)
            (tmp / "rng").mkdir(parents=True)
        except OSError as e:
            error = e
    agree(ps, error, step, tmp)
    return tmp, final


def save_rng(tmp: Path, rank: int, rng_state: dict | None) -> None:
    if rng_state is not None:
        faults.check_write(_rng_file(tmp, rank))
        torch.save(rng_state, _rng_file(tmp, rank))


def _why(e: BaseException, rank: int) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, CheckpointError):  # DCP's own agreement already names the failing rank
        return text.split(": ", 1)[1] if text.startswith("could not write checkpoint") and ": " in text else text
    return f"rank {rank}: {type(e).__name__}: {text}"


def agree(ps: ParallelState, error: BaseException | None, step: int, tmp: Path | None = None) -> None:
    """Collective, in place of a barrier: if any rank failed (``error`` not None there), every rank raises
    the same CheckpointError naming the first failure; rank 0 removes the partial ``tmp`` directory."""
    failed = error is not None
    if ps.distributed:
        flag = torch.tensor([1.0 if failed else 0.0], device=ps.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return
        reasons = [None] * ps.world_size
        dist.all_gather_object(reasons, _why(error, ps.rank) if failed else None)
    elif not failed:
        return
    else:
        reasons = [_why(error, ps.rank)]
    if tmp is not None and ps.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    raise CheckpointError(f"could not save checkpoint step_{step}: {next(r for r in reasons if r)}")


def _test_pause(step: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        at, _, secs = spec.partition(":")
        if int(at) == step:
            time.sleep(float(secs or 60))


def finalize_save(tmp: Path, final: Path, meta: dict, keep: int = 0, best: bool = False) -> Path:
    """Rank 0, once every rank has written its shards into ``tmp``: meta.json, rename, ``latest`` (and
    ``best`` when this is the best evaluation's checkpoint), prune (never what ``best`` names)."""
    root = final.parent
    write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=1, default=str))
    _test_pause(int(meta["step"]))
    old = None
    if final.exists():  # an older save of the same step (e.g. a re-run): move it aside, never delete first
        old = root / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:
            os.replace(old, final)
        raise
    _fsync_dir(root)
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    if best:
        write_text_atomic(root / BEST_FILE, final.name + "\n")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    if keep > 0:
        protected = {final, best_checkpoint(root)}  # the best evaluation's checkpoint is kept too
        others = [d for _, d in list_checkpoints(root) if d not in protected]
        for d in others[:max(0, len(others) - (keep - 1))]:
            trash = root / f".{d.name}.old"  # rename first: a half-deleted step_<N> is never left behind
            try:
                os.replace(d, trash)
            except OSError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
    return final


def full_meta(meta: dict, step: int, ps: ParallelState) -> dict:
    return {**meta, "format_version": FORMAT_VERSION, "step": step, "saved_tp": ps.tp_size, "saved_dp": ps.dp_size}


def save_checkpoint(root, step: int, model, optimizer, ps: ParallelState, meta: dict,
                    rng_state: dict | None = None, keep: int = 0, best: bool = False) -> Path:
    """Collective, synchronous: every rank calls it. Returns the final step directory. ``best``: also
    point ``<root>/best`` at it (the best evaluation so far, checkpoint.best_metric).

    A failure on any rank raises the same CheckpointError on every rank (see :func:`agree`)."""
    tmp, final = begin_save(root, step, ps)
    error = None
    try:
        save_state(tmp, model, optimizer, ps)  # DCP: returns on every rank once all shards + .metadata are written
        save_rng(tmp, ps.rank, rng_state)
    except (CheckpointError, OSError) as e:  # DCP fails on every rank together; the rng write is this rank's
        error = e
    agree(ps, error, step, tmp)
    if ps.is_main:
        try:
            finalize_save(tmp, final, full_meta(meta, step, ps), keep, best)
        except OSError as e:
            error = e
    agree(ps, error, step, tmp)
    return final


def load_checkpoint(path, model, optimizer, ps: ParallelState, strict: bool = True,
                    load_optimizer: bool = True) -> tuple[Path, dict, dict | None]:
    """Load at the current layout. Returns (step dir, meta, this rank's RNG state if saved at the same layout).

    ``load_optimizer=False``: weights only (e.g. fine-tuning from a pretraining checkpoint); the
    optimizer is still passed so that mixed-precision fp32 masters receive the weights."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    load_state(ckpt, model, optimizer, ps, strict=strict, load_optimizer=load_optimizer and optimizer is not None)
    rng = None
    f = _rng_file(ckpt, ps.rank)
    if meta.get("saved_tp") == ps.tp_size and meta.get("saved_dp") == ps.dp_size and f.exists():
        try:
            rng = torch.load(f, weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{f} is unreadable ({type(e).__name__}): the checkpoint is corrupt") from None
    return ckpt, meta, rng


# --------------------------------------------------------------------------- whole-model helpers
def read_model_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Single process: (full model tensors keyed by parameter name, meta) of any checkpoint."""
    from .sharded import tensor_index

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    full = read_full_state(ckpt, keys={k for k in tensor_index(ckpt) if k.startswith("model.")})
    state = {k[len("model."):]: v for k, v in full.items()}
    return state, meta


def write_model_checkpoint(root, state: dict[str, torch.Tensor], meta: dict, step: int = 0) -> Path:
    """Single process: write full model tensors as a checkpoint any TP size can load."""
    root = Path(root)
    tmp, final = begin_save(root, step, ParallelState.single())
    write_full_state(tmp, {f"model.{k}": v for k, v in state.items()})
    full = {**meta, "format_version": FORMAT_VERSION, "step": step, "saved_tp": 1, "saved_dp": 1}
    return finalize_save(tmp, final, full)
