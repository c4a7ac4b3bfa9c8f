"""Dropout sites of the model and the per-forward context that drives them.

With ``dropout_impl="keyed"`` every dropout mask is a function of (seed, site, global sample id,
global element index) — see ``parallel/random.py`` — so TP size, DP size, micro-batching,
sequence-parallel sharding and recompute all give the same masks. ``native`` uses torch's RNG,
which is faster on GPU but not invariant. Inside TP regions (a rank's attention heads) the masks must
differ per rank: eager SDPA draws them from the tracker's model-parallel generator; compiled regions,
CUDA-graph captures and the pruned last layer cannot swap generators (torch.compile breaks a graph
there, a capture refuses a new seed), so there every rank draws the same seed from the default
generator and salts its mask with its heads' offset (``salted_dropout``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.random import RNGTracker, dropout_keys, keyed_dropout, keyed_keep_mask, slice_index

from . import dropout_kernels
from .dropout_kernels import draw_seed


def salted_dropout(x: torch.Tensor, p: float, seed: torch.Tensor, salt: int) -> torch.Tensor:
    """Inverted dropout with the mask a function of (``seed``: one int64 on x's device, ``salt``, element
    index): the Triton keep-mask kernel on GPU, the keyed hash of parallel/random.py elsewhere. Pure
    device work, so it compiles and replays in a CUDA graph."""
    if x.is_cuda and dropout_kernels.available():
        keep = dropout_kernels.keep_mask(seed, x.numel(), p, salt).view(x.shape)
    else:
        if x.numel() > 2**32:
            raise ValueError(f"salted dropout indexes at most 2**32 elements, got {x.numel()}")
        keys = (seed + salt * 0x9E3779B1) & 0xFFFFFFFF
        keep = keyed_keep_mask(keys, torch.arange(x.numel(), device=x.device).view(x.shape), p)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


# Site numbering: embeddings 0, then 3 sites per layer, heads far above.
SITE_EMBEDDINGS = 0
SITE_HEAD = 1_000_000


def layer_site(layer: int, which: int) -> int:
    """which: 0 attention probs, 1 attention output, 2 MLP output."""
    return 1 + 3 * layer + which


@dataclass
class DropoutContext:
    training: bool
    impl: str
    seed: int
    sample_ids: torch.Tensor | None  # [b] global sample ids (keyed mode)
    seq_len: int  # full sequence length
    seq_offset: int  # where this rank's sequence shard starts (sequence parallel), else 0
    # Set at TP > 1 (bert.py): a rank's native attention dropout (transformer.attention_core);
    # recompute restores its streams (parallel.random.checkpoint).
    tracker: RNGTracker | None = None
    # [b, n] positions of the rows a pruned layer computes (TransformerLayer.forward_rows): keyed
    # masks are then indexed by those positions, so the kept rows get the masks of the full layer.
    rows: torch.Tensor | None = None
    # [3] int64 on the device: one layer's seeds for the GPU kernels that draw their own masks
    # (0 attention probabilities, 1 attention output, 2 MLP output). The fused encoder draws every
    # layer's at once (one launch per forward, not one per site and compiled half); None: each site
    # draws its own.
    seeds: torch.Tensor | None = None

    def at_rows(self, rows: torch.Tensor) -> "DropoutContext":
        return dataclasses.replace(self, rows=rows)

    def with_seeds(self, seeds: torch.Tensor) -> "DropoutContext":
        return dataclasses.replace(self, seeds=seeds)

    def kernel_seed(self, which: int, device: torch.device, p: float) -> torch.Tensor:
        """Site ``which``'s seed for a mask-drawing kernel at drop rate ``p``: one int64 on the device
        (a zero the kernel never reads when ``p`` is 0)."""
        if p <= 0.0:
            return torch.zeros(1, dtype=torch.int64, device=device)
        if self.seeds is not None:
            return self.seeds[which:which + 1]
        return draw_seed(device)

    def active(self, p: float) -> bool:
        return self.training and p > 0.0

    def _keys(self, site: int) -> torch.Tensor:
        return dropout_keys(self.seed, site, self.sample_ids)

    def hidden(self, x: torch.Tensor, p: float, site: int) -> torch.Tensor:
        """Dropout on a replicated-region activation ``[s_local, b, h]``."""
        if not self.active(p):
            return x
        if self.impl == "native":
            return F.dropout(x, p, True)
        s_local, _, h = x.shape
        keys = self._keys(site).view(1, -1, 1)
        if self.rows is not None:  # x: [n, b, h] at the positions rows [b, n]
            index = self.rows.t().unsqueeze(-1) * h + torch.arange(h, device=x.device)
        else:
            index = slice_index((self.seq_len, h), (self.seq_offset, 0), (s_local, h), x.device).unsqueeze(1)
        return keyed_dropout(x, p, keys, index)

    def batch_first(self, x: torch.Tensor, p: float, site: int) -> torch.Tensor:
        """Dropout on a head input ``[b, ...]`` (replicated, full sequence)."""
        if not self.active(p):
            return x
        if self.impl == "native":
            return F.dropout(x, p, True)
        rest = tuple(x.shape[1:])
        keys = self._keys(site).view((-1,) + (1,) * len(rest))
        index = slice_index(rest, (0,) * len(rest), rest, x.device).unsqueeze(0)
        return keyed_dropout(x, p, keys, index)

    def attention_probs(self, probs: torch.Tensor, p: float, site: int, head_offset: int, num_heads: int):
        """Dropout on ``[b, heads_local, s, s]`` attention probabilities (a TP region: this rank's heads),
        or ``[b, heads_local, n, s]`` for the query rows of a pruned layer."""
        if not self.active(p):
            return probs
        if self.impl == "native":  # the seed is the same on every rank: the heads' offset tells them apart
            return salted_dropout(probs, p, self.kernel_seed(0, probs.device, p), head_offset)
        _, nh, sq, sk = probs.shape
        keys = self._keys(site).view(-1, 1, 1, 1)
        if self.rows is not None:  # query rows at positions rows [b, n] of a [num_heads, sk, sk] tensor
            heads = torch.arange(head_offset, head_offset + nh, device=probs.device).view(1, -1, 1, 1)
            query = self.rows.view(-1, 1, sq, 1)
            index = (heads * sk + query) * sk + torch.arange(sk, device=probs.device)
        else:
            index = slice_index((num_heads, sq, sk), (head_offset, 0, 0), (nh, sq, sk), probs.device).unsqueeze(0)
        return keyed_dropout(probs, p, keys, index)
