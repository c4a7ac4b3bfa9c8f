"""Step-wise batching: global batch k = samples [c, c + G) where c = consumed_samples (= k*G from scratch).

DP rank r takes the contiguous slice [c + r*G/dp, c + (r+1)*G/dp) and splits it into micro-batches.
The data position is therefore the single integer `consumed_samples`; resuming (or changing the DP size)
continues from the same global sample.
"""
from __future__ import annotations

import numpy as np
import torch


def _check_batch(global_batch_size, micro_batch_size, dp_rank, dp_size):
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                    ("dp_size", dp_size)):
        if int(v) != v or v <= 0:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank}")
    if global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(
            f"global_batch_size ({global_batch_size}) must be divisible by micro_batch_size "
            f"({micro_batch_size}) x data-parallel size ({dp_size}) = {micro_batch_size * dp_size}")


def micro_batch_sample_ids(consumed_samples, global_batch_size, micro_batch_size, dp_rank, dp_size):
    """Sample ids of this DP rank's micro-batches for the step starting at `consumed_samples`."""
    _check_batch(global_batch_size, micro_batch_size, dp_rank, dp_size)
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples must be >= 0, got {consumed_samples}")
    per_rank = global_batch_size // dp_size
    start = int(consumed_samples) + dp_rank * per_rank
    return [list(range(s, s + micro_batch_size)) for s in range(start, start + per_rank, micro_batch_size)]


def collate(samples):
    """List of sample dicts (numpy arrays) -> dict of stacked torch tensors: integer fields as int64,
    float fields (e.g. regression labels of fine-tuning tasks) as float32."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    out = {}
    for k in samples[0]:
        arr = np.stack([np.asarray(s[k]) for s in samples])
        arr = arr.astype(np.int64, copy=False) if arr.dtype.kind in "iub" else arr.astype(np.float32, copy=False)
        out[k] = torch.from_numpy(arr)
    return out


class _MicroBatchSampler:
    """Infinite stream of micro-batch id lists, step after step, for one DP rank."""

    def __init__(self, consumed_samples, global_batch_size, micro_batch_size, dp_rank, dp_size):
        self.args = (global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.consumed = consumed_samples

    def __iter__(self):
        c = self.consumed
        while True:
            yield from micro_batch_sample_ids(c, *self.args)
            c += self.args[0]


class _CollateThen:
    """collate, then ``transform`` (picklable: it runs in the worker processes)."""

    def __init__(self, transform=None):
        self.transform = transform

    def __call__(self, samples):
        batch = collate(samples)
        return batch if self.transform is None else self.transform(batch)


class PretrainingLoader:
    """Iterate steps; each item is the list of collated micro-batches (dicts of tensors) of this DP rank.

    With num_workers > 0 a torch DataLoader (worker processes, prefetching, optional pinned memory)
    produces micro-batches ahead of time, so the accelerator does not wait for data. `consumed_samples`
    advances by global_batch_size per yielded step; construct a new loader with the checkpoint's
    value to resume. The iterator is infinite (multi-epoch); the trainer decides when to stop.
    ``transform``: applied to each collated micro-batch, in the workers (e.g. turning it into model
    inputs, so the training process only receives them).
    """

    def __init__(self, dataset, global_batch_size, micro_batch_size, dp_rank=0, dp_size=1, consumed_samples=0,
                 num_workers=0, pin_memory=False, prefetch_factor=4, transform=None):
        _check_batch(global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.consumed_samples = int(consumed_samples)
        self.num_micro_batches = global_batch_size // (micro_batch_size * dp_size)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.collate = _CollateThen(transform)

    def _micro_batches(self):
        sampler = _MicroBatchSampler(self.consumed_samples, self.global_batch_size, self.micro_batch_size,
                                     self.dp_rank, self.dp_size)
        if self.num_workers <= 0 and not self.pin_memory:
            for ids in sampler:
                yield self.collate([self.dataset[i] for i in ids])
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=self.collate, num_workers=self.num_workers,
            pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            persistent_workers=False)
        yield from loader

    def __iter__(self):
        micro = self._micro_batches()
        while True:
            step = [next(micro) for _ in range(self.num_micro_batches)]
            self.consumed_samples += self.global_batch_size
            yield step
