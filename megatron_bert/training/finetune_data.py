"""Deterministic, resumable sampling of a fine-tuning train set.

The global sample stream is an endless sequence of positions p = 0, 1, 2, ...; position p lies in
epoch e = p // N (N = len(train set)) and names the example ``perm_e[p % N]``, where ``perm_e`` is
a permutation of the train set seeded by (train.seed, e). A step k covers positions
[c, c + G) with c = consumed_samples, split over DP ranks and micro-batches exactly as in
pretraining (`data.loader.micro_batch_sample_ids`). So a step's samples are a function of
``consumed_samples`` alone: resuming, or changing the DP size, continues the same stream.

Every sample carries ``sample_id = e * N + index`` (unique across epochs), the key of its dropout
masks: an example seen again in a later epoch gets fresh masks, yet the masks of a given step do
not depend on the TP/DP layout.
"""
from __future__ import annotations

import numpy as np

from ..data.loader import collate, micro_batch_sample_ids


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the train set in ``epoch`` (same on every rank, every run)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class SampleStream:
    """Global stream position → (dataset index, sample id); keeps the last epoch's permutation."""

    def __init__(self, n: int, seed: int):
        if n <= 0:
            raise ValueError("the train set is empty")
        self.n, self.seed = int(n), int(seed)
        self._epoch, self._perm = -1, None

    def __call__(self, position: int) -> tuple[int, int]:
        epoch, offset = divmod(int(position), self.n)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.n)
        index = int(self._perm[offset])
        return index, epoch * self.n + index


class FinetuneLoader:
    """Iterate steps from ``consumed_samples`` on: each item is this DP rank's list of collated
    micro-batches. Infinite (wraps around epochs); the trainer decides when to stop."""

    def __init__(self, dataset, global_batch_size: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, consumed_samples: int = 0):
        self.dataset = dataset
        self.args = (global_batch_size, micro_batch_size, dp_rank, dp_size)
        self.stream = SampleStream(len(dataset), seed)
        self.consumed_samples = int(consumed_samples)

    def step_samples(self, consumed_samples: int) -> list[list[tuple[int, int]]]:
        """(dataset index, sample id) of each micro-batch of this rank for the step at ``consumed_samples``."""
        return [[self.stream(p) for p in mb] for mb in micro_batch_sample_ids(consumed_samples, *self.args)]

    def __iter__(self):
        while True:
            step = []
            for mb in self.step_samples(self.consumed_samples):
                samples = []
                for index, sample_id in mb:
                    s = self.dataset[index]
                    s["sample_id"] = np.asarray(sample_id, dtype=np.int64)
                    samples.append(s)
                step.append(collate(samples))
            self.consumed_samples += self.args[0]
            yield step
