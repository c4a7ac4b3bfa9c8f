"""Randomness under tensor parallelism.

Two tools:

* ``RNGTracker`` — the classic model-parallel scheme. The default generator is seeded identically
  on every TP rank (dropout in replicated regions must match), while a named "model-parallel"
  stream is seeded per TP rank (dropout on a rank's own heads must differ) and is entered with
  ``tracker.fork()``. States can be saved for checkpoints and replayed for recompute.

* ``keyed_dropout`` — counter-based dropout: the keep/drop decision for an element is a hash of
  (key, element index). With keys derived from (seed, site, global sample id) and indices taken in
  the *global* tensor, the mask does not depend on how the tensor is split across ranks,
  micro-batches or recompute passes. This is what lets a TP=4 run reproduce a TP=1 run exactly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.utils.checkpoint

_M32 = 0xFFFFFFFF
MODEL_PARALLEL_STREAM = "model-parallel"
_TP_SEED_OFFSET = 2718


# --------------------------------------------------------------------------- classic tracker
class RNGTracker:
    """Named generator states that can be swapped in for a region of code."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def _get(self) -> torch.Tensor:
        if self.device.type == "cuda":
            return torch.cuda.get_rng_state(self.device)
        return torch.get_rng_state()

    def _set(self, state: torch.Tensor) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def add(self, name: str, seed: int) -> None:
        if name in self._states:
            raise ValueError(f"RNG stream {name!r} already exists")
        outer = self._get()
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        else:
            torch.manual_seed(seed)
        self._states[name] = self._get()
        self._set(outer)

    @contextlib.contextmanager
    def fork(self, name: str = MODEL_PARALLEL_STREAM):
        """Run the block on stream ``name``; the outer stream is left untouched."""
        if name not in self._states:
            raise KeyError(f"RNG stream {name!r} was never added")
        outer = self._get()
        self._set(self._states[name])
        try:
            yield
        finally:
            self._states[name] = self._get()
            self._set(outer)

    def get_states(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {k: v.clone() for k, v in states.items()}


def seed_everything(seed: int, tp_rank: int, device: torch.device | str = "cpu") -> RNGTracker:
    """Seed the default generators (same on all TP ranks) and return a tracker whose
    model-parallel stream differs per TP rank."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    tracker = RNGTracker(device)
    tracker.add(MODEL_PARALLEL_STREAM, seed + _TP_SEED_OFFSET + tp_rank)
    return tracker


@contextlib.contextmanager
def _swapped_states(tracker: RNGTracker, states: dict[str, torch.Tensor]):
    current = tracker.get_states()
    tracker.set_states(states)
    try:
        yield
    finally:
        tracker.set_states(current)


def checkpoint(function, tracker: RNGTracker | None, *args, **kwargs):
    """Activation recompute that replays *all* randomness: torch's default generators (by
    ``preserve_rng_state``) and the tracker's named streams (restored for the recompute pass)."""
    if tracker is None:
        ctx = lambda: (contextlib.nullcontext(), contextlib.nullcontext())  # noqa: E731
    else:
        saved = tracker.get_states()
        ctx = lambda: (contextlib.nullcontext(), _swapped_states(tracker, saved))  # noqa: E731
    return torch.utils.checkpoint.checkpoint(
        function, *args, use_reentrant=False, preserve_rng_state=True, context_fn=ctx, **kwargs
    )


# --------------------------------------------------------------------------- keyed dropout
def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """(h * c) mod 2**32 for 0 <= h < 2**32 without int64 overflow (split c in 16-bit halves)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (h * lo + (((h * hi) & 0xFFFF) << 16)) & _M32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (xor-shift / multiply rounds); int64 tensors holding 32-bit values."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def dropout_keys(seed: int, site: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per sample for dropout site ``site`` (int64 tensor, same shape as sample_ids)."""
    base = _fmix32(torch.tensor([(seed * 0x9E3779B1 + site * 0x632BE5AB) & _M32], dtype=torch.int64))
    ids = sample_ids.to(torch.int64)
    h = _fmix32((ids & _M32) ^ base.to(ids.device))
    return _fmix32(h ^ ((ids >> 32) & _M32))


def slice_index(global_shape, offsets, local_shape, device) -> torch.Tensor:
    """Row-major linear index in ``global_shape`` of every element of a local block that starts at
    ``offsets``; broadcastable int64 tensor of ``local_shape``."""
    index = torch.zeros((), dtype=torch.int64, device=device)
    ndim = len(global_shape)
    stride = 1
    for d in reversed(range(ndim)):
        shape = [1] * ndim
        shape[d] = local_shape[d]
        coord = torch.arange(offsets[d], offsets[d] + local_shape[d], dtype=torch.int64, device=device)
        index = index + coord.view(shape) * stride
        stride *= global_shape[d]
    if stride > 2**32:
        raise ValueError(f"keyed dropout indexes at most 2**32 elements per sample, got {stride}")
    return index


def keyed_keep_mask(keys: torch.Tensor, index: torch.Tensor, p: float) -> torch.Tensor:
    """Boolean keep-mask: element kept iff hash(key, index) >= p * 2**32.

    ``keys`` and ``index`` broadcast against each other to the mask's shape.
    """
    h = _fmix32(_mul32(index, 0x9E3779B9) ^ keys)
    h = _fmix32(h ^ (keys >> 7))
    return h >= int(p * 2**32)


def keyed_dropout(x: torch.Tensor, p: float, keys: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Inverted dropout with a keyed, layout-independent mask."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    keep = keyed_keep_mask(keys, index, p)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
