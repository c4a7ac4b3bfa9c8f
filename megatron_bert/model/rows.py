"""Row bookkeeping of the pruned last layer (TransformerLayer.forward_rows*): the layer computes its
queries, output projection, MLP and LayerNorms only at the positions ``rows [b, n]`` of each sample
([CLS] and the MLM targets), its keys and values still at every position."""
from __future__ import annotations

import torch

from parallel import ParallelState
from parallel.mappings import reduce_scatter_to_sp


def row_index(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Positions ``rows [b, n]`` → indices into an ``[s, b, ...]`` tensor flattened over (s, b), slot
    by slot: taking them gives ``[n, b, ...]``."""
    return (rows.t() * batch + torch.arange(batch, device=rows.device)).reshape(-1)


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    # [s, b, h] → [n, b, h]
    return x.reshape(-1, x.shape[-1]).index_select(0, index).view(-1, x.shape[1], x.shape[-1])


def rows_of_shards(x: torch.Tensor, rows: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Sequence parallel: ``x [s/tp, b, h]`` is this rank's shard of the sequence, ``rows [b, n]``
    positions in the whole of it (``n`` a multiple of tp) → this rank's chunk ``[n/tp, b, h]`` of the
    rows. Each rank takes the rows that fall in its shard (zeros for the rest) and one reduce-scatter
    sums them into place: ``[n, b, h]`` of traffic, where gathering ``x`` would move ``[s, b, h]``."""
    s_local, b, _ = x.shape
    local = rows - ps.tp_rank * s_local  # [b, n]
    owned = (local >= 0) & (local < s_local)
    taken = take_rows(x, row_index(local.clamp(0, s_local - 1), b))  # [n, b, h]
    return reduce_scatter_to_sp(taken.masked_fill(~owned.t().unsqueeze(-1), 0.0), ps.tp_group)
