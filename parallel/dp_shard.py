"""Optimizer state sharded over the data-parallel group (ZeRO stage 1, Megatron's distributed optimizer).

Every DP replica holds the whole (TP-local) model and computes whole gradients, but each replica only
*updates* one slice of every parameter: its fp32 master copy and AdamW moments exist for that slice
alone, so that state (12 bytes per parameter) shrinks by the DP size. Per step:

    full grads ──reduce-scatter over DP──▶ the sum of this rank's slice ──AdamW──▶ new slice
    new slices ──all-gather over DP──▶ every replica's full parameters again

The slice of a parameter is a block of rows along one dimension, cut the way DTensor cuts
``Shard(dim)`` (chunks of ceil(n / dp), trailing ones possibly empty). That dimension is never the
TP partition dimension (the largest other one), so a slice is a rectangle of the global tensor and a
checkpoint presents it as a DTensor on the (dp, tp) mesh, ``[Shard(dp_dim), Shard(tp_dim)]``: DCP then
reshards it to any TP size, DP size or unsharded run. Parameters with no other dimension (1-D
TP-sharded biases, ~0.1% of a model) keep whole, DP-replicated state and an all-reduced gradient.

Collectives run per bucket of ~25M elements, on rank-major flat buffers: rank k's segment holds the
k-th slice of each parameter in the bucket, padded to the longest segment.
"""
from __future__ import annotations

import math

import torch

from .grads import _allreduce_coalesced
from .state import ParallelState

_functional = torch.ops._c10d_functional
_BUCKET_ELEMS = 25_000_000


def chunk_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """(start, length) of chunk ``index`` when ``size`` rows are cut into ``parts`` like DTensor's Shard:
    ceil(size / parts) rows each, the last ones shorter or empty."""
    step = math.ceil(size / parts) if size else 0
    start = min(size, step * index)
    return start, min(size, start + step) - start


def shard_dim(param: torch.Tensor) -> int | None:
    """The dimension a parameter's DP slices are cut along: its largest one other than the TP partition
    dimension (the first of equals), or None when it has no other dimension."""
    tp_dim = param.partition_dim if getattr(param, "tensor_parallel", False) else None
    dims = [d for d in range(param.ndim) if d != tp_dim]
    if not dims:
        return None
    return max(dims, key=lambda d: (param.shape[d], -d))


class DPShardPlan:
    """Which slice of each parameter every DP rank owns, and the reduce-scatter / all-gather between
    whole tensors and slices. ``params`` must be in the same order, with the same shapes, on every rank
    of the DP group (they are: replicas of one model)."""

    def __init__(self, params: list[torch.Tensor], ps: ParallelState, bucket_elems: int = _BUCKET_ELEMS):
        self.ps, self.dp = ps, ps.dp_size
        self.dims = [shard_dim(p) for p in params]
        self.shapes = [tuple(p.shape) for p in params]
        # ranges[i][k]: (start, length) of rank k's slice of param i along dims[i]
        self.ranges = [[chunk_range(p.shape[d], self.dp, k) for k in range(self.dp)] if d is not None else None
                       for p, d in zip(params, self.dims)]
        self.sharded = [i for i, d in enumerate(self.dims) if d is not None]
        self.replicated = [i for i, d in enumerate(self.dims) if d is None]
        self.buckets: list[list[int]] = []
        bucket, size = [], 0
        for i in self.sharded:
            bucket.append(i)
            size += params[i].numel()
            if size >= bucket_elems:
                self.buckets.append(bucket)
                bucket, size = [], 0
        if bucket:
            self.buckets.append(bucket)
        self.layouts = [self._segments(b) for b in self.buckets]  # fixed: computed once, not per step

    def slice_of(self, t: torch.Tensor, i: int, rank: int | None = None) -> torch.Tensor:
        """The view of ``t`` (shaped like param ``i``) that DP rank ``rank`` (default: this one) owns."""
        d = self.dims[i]
        if d is None:
            return t
        start, length = self.ranges[i][self.ps.dp_rank if rank is None else rank]
        return t.narrow(d, start, length)

    def _segments(self, bucket: list[int]) -> tuple[list[list[tuple[int, int, tuple]]], int]:
        """Per rank, (offset, numel, shape) of each param's slice in that rank's segment; the segment length."""
        layout, longest = [], 0
        for k in range(self.dp):
            offset, rows = 0, []
            for i in bucket:
                shape = self.slice_shape(i, k)
                n = math.prod(shape)
                rows.append((offset, n, shape))
                offset += n
            layout.append(rows)
            longest = max(longest, offset)
        return layout, longest

    def slice_shape(self, i: int, rank: int | None = None) -> tuple[int, ...]:
        shape = list(self.shapes[i])
        if self.dims[i] is not None:
            shape[self.dims[i]] = self.ranges[i][self.ps.dp_rank if rank is None else rank][1]
        return tuple(shape)

    def reduce_scatter(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """The DP sum of each param's slice of ``grads`` (sharded params: views of one fresh buffer per
        bucket, nothing else allocated) or of the whole of ``grads[i]`` (the others: summed in place,
        returned as is). The sharded params' ``grads`` are left as they are."""
        group, out = self.ps.dp_group, [None] * len(grads)
        for bucket, (layout, longest) in zip(self.buckets, self.layouts):
            send = torch.empty(self.dp * longest, dtype=grads[bucket[0]].dtype, device=grads[bucket[0]].device)
            dst, src = [], []
            for k in range(self.dp):
                base = k * longest
                for i, (offset, n, shape) in zip(bucket, layout[k]):
                    if n:
                        dst.append(send[base + offset:base + offset + n].view(shape))
                        src.append(self.slice_of(grads[i], i, k))
            torch._foreach_copy_(dst, src)
            if self.dp > 1:
                mine = _functional.wait_tensor(
                    _functional.reduce_scatter_tensor(send, "sum", self.dp, group.group_name))
            else:
                mine = send[:longest]
            del send, dst, src
            for i, (o, n, shape) in zip(bucket, layout[self.ps.dp_rank]):
                out[i] = mine[o:o + n].view(shape)
        if self.replicated:
            rest = [grads[i] for i in self.replicated]
            if self.dp > 1:
                _allreduce_coalesced(rest, group)
            for i, g in zip(self.replicated, rest):
                out[i] = g
        return out

    def all_gather(self, slices: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """Write every rank's ``slices[i]`` into its place in ``params[i]`` (cast to the param's dtype)
        on every rank. Replicated params are simply copied from their (whole, identical) ``slices[i]``."""
        group = self.ps.dp_group
        with torch.no_grad():
            for bucket, (layout, longest) in zip(self.buckets, self.layouts):
                dtype, device = params[bucket[0]].dtype, params[bucket[0]].device
                send = torch.empty(longest, dtype=dtype, device=device)
                mine = [(send[o:o + n].view(shape), slices[i])
                        for i, (o, n, shape) in zip(bucket, layout[self.ps.dp_rank]) if n]
                if mine:
                    torch._foreach_copy_([m[0] for m in mine], [m[1] for m in mine])
                if self.dp > 1:
                    gathered = _functional.wait_tensor(
                        _functional.all_gather_into_tensor(send, self.dp, group.group_name))
                else:
                    gathered = send
                dst, src = [], []
                for k in range(self.dp):
                    base = k * longest
                    for i, (offset, n, shape) in zip(bucket, layout[k]):
                        if n:
                            dst.append(self.slice_of(params[i], i, k))
                            src.append(gathered[base + offset:base + offset + n].view(shape))
                torch._foreach_copy_(dst, src)
            rest = [(params[i], slices[i]) for i in self.replicated]
            if rest:
                torch._foreach_copy_([r[0] for r in rest], [r[1] for r in rest])
