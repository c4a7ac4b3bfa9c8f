"""Collectives along one tensor dimension, for gloo and nccl alike.

The tensor-parallel path (mappings.py, layers.py) uses torch's functional c10d ops: out-of-place, and
traceable by torch.compile, so a layer with TP collectives inside compiles to one graph. Overlap is a
pending tensor: ``wait=False`` returns one still being reduced or gathered, to hand to ``wait`` once
the work meant to run beside the collective has been issued, eagerly as under compile (the work
handles of ``torch.distributed``'s ``async_op=True``, which the column-parallel backward used for
that, break a compiled graph). The in-place ``all_reduce`` is for flat gradient buffers outside the
model (grads.py) and the other one-off reductions.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

_functional = torch.ops._c10d_functional


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_reduce(x: torch.Tensor, group, async_op: bool = False):
    """Sum in place over the group. Returns the work handle when async_op."""
    if group_size(group) == 1:
        return None
    if not x.is_contiguous():
        raise ValueError("all_reduce works in place on a contiguous tensor (nccl requires it)")
    return dist.all_reduce(x, group=group, async_op=async_op)


def wait(x: torch.Tensor) -> torch.Tensor:
    """The result of a collective started with ``wait=False``."""
    return _functional.wait_tensor(x)


def _done(x: torch.Tensor, wait_now: bool) -> torch.Tensor:
    return _functional.wait_tensor(x) if wait_now else x


def sum_across(x: torch.Tensor, group, wait: bool = True) -> torch.Tensor:
    """The sum of every rank's ``x``: a new contiguous tensor, ``x`` left alone (one rank: ``x`` itself)."""
    if group_size(group) == 1:
        return x
    return _done(_functional.all_reduce(x, "sum", group.group_name), wait)


def max_across(x: torch.Tensor, group) -> torch.Tensor:
    """The elementwise max of every rank's ``x`` (no autograd: for constants like a softmax shift)."""
    if group_size(group) == 1:
        return x
    return _functional.wait_tensor(_functional.all_reduce(x, "max", group.group_name))


def split_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Keep this rank's contiguous chunk of ``x`` along ``dim``."""
    world = group_size(group)
    if world == 1:
        return x
    size = x.shape[dim]
    if size % world != 0:
        raise ValueError(f"dimension {dim} of size {size} cannot be split evenly over {world} ranks")
    return x.narrow(dim, group_rank(group) * (size // world), size // world).contiguous()


def all_gather_along_dim(x: torch.Tensor, group, dim: int, wait: bool = True) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order). ``wait=False`` only for ``dim=0``."""
    world = group_size(group)
    if world == 1:
        return x
    out = _functional.all_gather_into_tensor(x.contiguous(), world, group.group_name)  # ranks stacked on dim 0
    if dim == 0:
        return _done(out, wait)
    if not wait:
        raise ValueError("an all-gather along a dimension other than 0 cannot be left pending")
    return torch.cat(_functional.wait_tensor(out).chunk(world, 0), dim=dim)


def reduce_scatter_along_dim(x: torch.Tensor, group, dim: int, wait: bool = True) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk along ``dim``. ``wait=False`` only for ``dim=0``."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} cannot be split evenly over {world} ranks")
    if dim != 0:
        if not wait:
            raise ValueError("a reduce-scatter along a dimension other than 0 cannot be left pending")
        return reduce_scatter_along_dim(x.movedim(dim, 0), group, 0).movedim(0, dim).contiguous()
    return _done(_functional.reduce_scatter_tensor(x.contiguous(), "sum", world, group.group_name), wait)
