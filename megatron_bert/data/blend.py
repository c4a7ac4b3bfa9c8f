"""Pretraining on several corpora at once: ``data.prefix=[0.7,/data/wiki,0.3,/data/books]``.

A blend draws sample ``i`` of the run from one member dataset, in fixed proportions. The order is
a pure function of the weights: each member ``k`` gets ``c_k`` slots of a period of ``P = Σ c_k``
samples (``c_k ∝ w_k``, at least 1), its ``n``-th slot placed at ``(n + ½) / c_k`` of the period, and
the period's slots sorted by that position. So every prefix of the run holds each member within one
sample of its share, member ``k`` is read in its own order ``0, 1, 2, ...`` (period ``e`` reads its
samples ``e·c_k ...``, and a member's own index wraps into its next epoch), and the global index alone
fixes the sample: resuming at any data-parallel size reads what an uninterrupted run reads.

Members without weights (``[/data/wiki,/data/books]``) are weighted by their samples per epoch, i.e.
as if the corpora had been concatenated.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np

DEFAULT_PERIOD = 1 << 20  # slots per period: shares exact to ~1e-6


class BlendError(ValueError):
    """``data.prefix`` does not describe a dataset or a blend; the message says how to write one."""


def parse_blend(value, key: str = "data.prefix") -> list[tuple[float | None, str]]:
    """``data.prefix`` (or ``key``, e.g. data.valid_prefix) → ``[(weight or None, prefix), ...]``. A string
    is one dataset; a list is either prefixes (weights by size: ``None``) or alternating ``weight, prefix``."""
    if isinstance(value, (str, os.PathLike, int, float)) and not isinstance(value, bool):
        return [(None, str(value))]  # a path (Hydra reads data.prefix=2024 as a number)
    how = f"give {key}=PATH, {key}=[PATH,PATH] or {key}=[WEIGHT,PATH,WEIGHT,PATH]"
    if not isinstance(value, Sequence) or isinstance(value, bytes):
        raise BlendError(f"{key}={value!r} is not a path or a list of them: {how}")
    if not len(value):
        raise BlendError(f"{key}=[] names no dataset: {how}")
    items = list(value)
    numeric = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in items]
    if not any(numeric):
        return [(None, str(v)) for v in items]
    if len(items) % 2 or not all(numeric[0::2]) or any(numeric[1::2]):
        raise BlendError(f"{key}={items} mixes weights and paths out of order: write "
                         f"{key}=[WEIGHT,PATH,WEIGHT,PATH,...] (a weight before every path) or paths only")
    pairs = [(float(w), str(p)) for w, p in zip(items[0::2], items[1::2])]
    for w, p in pairs:
        if not (math.isfinite(w) and w > 0):
            raise BlendError(f"{key}: the weight of {p} is {w}; weights must be finite and > 0 "
                             "(drop the dataset instead of giving it weight 0)")
    return pairs


def slot_counts(weights: Sequence[float], period: int = DEFAULT_PERIOD) -> np.ndarray:
    """Integer slots per member, proportional to ``weights`` (largest remainder), each at least 1."""
    w = np.asarray(weights, dtype=np.float64)
    share = w / w.sum() * period
    counts = np.floor(share).astype(np.int64)
    short = period - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:short]] += 1
    return np.maximum(counts, 1)


class BlendedDataset:
    """``ds[i]`` → the sample of the member that slot ``i`` belongs to, with ``sample_id = i``.
    ``len(ds)``: the members' samples per epoch together (a blend has no epoch of its own; any i >= 0
    is valid)."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], names: Sequence[str] | None = None,
                 period: int = DEFAULT_PERIOD):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("a blend needs one weight per dataset and at least one dataset")
        self.datasets = list(datasets)
        self.names = list(names) if names is not None else [str(k) for k in range(len(datasets))]
        self.counts = slot_counts(weights, period)
        self.period = int(self.counts.sum())
        self.weights = self.counts / self.period  # the shares the run really gets
        members = np.repeat(np.arange(len(datasets)), self.counts)
        nth = np.concatenate([np.arange(c) for c in self.counts])
        place = (nth + 0.5) / self.counts[members]
        order = np.lexsort((members, place))  # by place in the period, ties by member
        self._member = members[order].astype(np.int32)  # [P] which member each slot reads
        self._nth = nth[order].astype(np.int32)  # [P] the member's n-th slot in the period

    def __len__(self):
        return sum(len(d) for d in self.datasets)

    def locate(self, i: int) -> tuple[int, int]:
        """Global index → (member, the member's own index)."""
        epoch, pos = divmod(int(i), self.period)
        k = int(self._member[pos])
        return k, epoch * int(self.counts[k]) + int(self._nth[pos])

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        k, j = self.locate(i)
        sample = self.datasets[k][j]
        sample["sample_id"] = np.array(i, dtype=np.int64)
        return sample

    def describe(self) -> str:
        return ", ".join(f"{w:.3f} × {n} ({len(d)})" for w, n, d in zip(self.weights, self.names, self.datasets))


def build_blended_pretraining_datasets(blend, tokenizer, seq_length, seed, **kwargs):
    """(train_ds, valid_ds) over ``parse_blend(...)`` members; one member → its datasets unchanged (the
    same samples as ``data.prefix=PATH``). Member k > 0 draws its masking and sentence choices from its
    own random stream, so equal-length samples of two corpora are not masked alike. The valid split
    blends the members that have valid samples, with the same weights."""
    from .dataset import build_pretraining_datasets
    from .tokenizers import load_tokenizer

    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    if len(blend) == 1:
        return build_pretraining_datasets(blend[0][1], tokenizer, seq_length, seed, **kwargs)
    trains, valids = zip(*(build_pretraining_datasets(p, tokenizer, seq_length, seed, stream=k, **kwargs)
                           for k, (_, p) in enumerate(blend)))
    names = [p for _, p in blend]
    weights = [len(t) if w is None else w for (w, _), t in zip(blend, trains)]
    train = BlendedDataset(trains, weights, names)
    with_valid = [k for k, v in enumerate(valids) if len(v)]
    if not with_valid:
        return train, valids[0]  # empty: evaluation says so as for one dataset
    valid = BlendedDataset([valids[k] for k in with_valid], [weights[k] for k in with_valid],
                           [names[k] for k in with_valid])
    return train, valid
