"""Checkpoint directories: ``<root>/step_<N>/`` written atomically, ``<root>/latest`` written last.

A save goes to ``<root>/.step_<N>.tmp``; only when every rank has finished does rank 0 rename it
to ``step_<N>`` and then replace ``latest`` (write temp + rename). A crash at any point leaves the
previous checkpoint and pointer intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from parallel import ParallelState

from .sharded import CheckpointError, load_state, read_full_state, save_state, write_full_state

FORMAT_VERSION = 1
META_FILE = "meta.json"
LATEST_FILE = "latest"


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
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def step_dir(root, step: int) -> Path:
    return Path(root) / f"step_{step}"


def list_checkpoints(root) -> list[tuple[int, Path]]:
    root = Path(root)
    found = []
    if root.is_dir():
        for d in root.iterdir():
            if d.is_dir() and d.name.startswith("step_") and (d / META_FILE).exists():
                try:
                    found.append((int(d.name[5:]), d))
                except ValueError:
                    pass
    return sorted(found)


def latest_checkpoint(root) -> Path | None:
    """The checkpoint ``latest`` names; falls back to the newest complete step directory."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.exists():
        target = root / pointer.read_text().strip()
        if (target / META_FILE).exists():
            return target
    found = list_checkpoints(root)
    return found[-1][1] if found else None


def resolve_checkpoint(path) -> Path:
    """A step directory, or a root holding ``latest`` → the step directory. Clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist: check checkpoint.resume / task.pretrained")
    if (p / META_FILE).exists():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p} holds no complete checkpoint (no step_<N>/{META_FILE}): point at a step_<N> directory")
    return latest


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / META_FILE} is unreadable ({e.__class__.__name__}): the checkpoint is corrupt") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt} has checkpoint format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    return meta


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / "rng" / f"rank_{rank:05d}.pt"


def save_checkpoint(root, step: int, model, optimizer, ps: ParallelState, meta: dict,
                    rng_state: dict | None = None, keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final step directory."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".step_{step}.tmp"
    if ps.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "rng").mkdir(parents=True)
    ps.barrier()
    save_state(tmp, model, optimizer, ps)
    if rng_state is not None:
        torch.save(rng_state, _rng_file(tmp, ps.rank))
    ps.barrier()
    if ps.is_main:
        full_meta = {**meta, "format_version": FORMAT_VERSION, "step": step,
                     "saved_tp": ps.tp_size, "saved_dp": ps.dp_size}
        write_text_atomic(tmp / META_FILE, json.dumps(full_meta, indent=1, default=str))
        if final.exists():  # an older save of the same step (e.g. re-run): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_text_atomic(root / LATEST_FILE, final.name + "\n")
        if keep > 0:
            for _, old in list_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    ps.barrier()
    return final


def load_checkpoint(path, model, optimizer, ps: ParallelState, strict: bool = True) -> tuple[Path, dict, dict | None]:
    """Load at the current layout. Returns (step dir, meta, this rank's RNG state if saved at the same layout)."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    load_state(ckpt, model, optimizer, ps, strict=strict)
    rng = None
    f = _rng_file(ckpt, ps.rank)
    if meta.get("saved_tp") == ps.tp_size and meta.get("saved_dp") == ps.dp_size and f.exists():
        rng = torch.load(f, weights_only=True)
    return ckpt, meta, rng


# --------------------------------------------------------------------------- whole-model helpers
def read_model_state(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Single process: (full model tensors keyed by parameter name, meta) of any checkpoint."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    full = read_full_state(ckpt)
    state = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
    return state, meta


def write_model_checkpoint(root, state: dict[str, torch.Tensor], meta: dict, step: int = 0) -> Path:
    """Single process: write full model tensors as a checkpoint any TP size can load."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f".step_{step}.tmp"
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_full_state(tmp, {f"model.{k}": v for k, v in state.items()})
    full_meta = {**meta, "format_version": FORMAT_VERSION, "step": step, "saved_tp": 1, "saved_dp": 1}
    write_text_atomic(tmp / META_FILE, json.dumps(full_meta, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    write_text_atomic(root / LATEST_FILE, final.name + "\n")
    return final
