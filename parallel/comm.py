"""Raw (non-autograd) collectives along one tensor dimension, for gloo and nccl alike.

gloo has no reduce-scatter, so on CPU we all-reduce and keep our chunk: the same numbers,
more bytes, which only matters on the GPU path where nccl does the real thing.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: dist.ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _is_nccl(group) -> bool:
    return dist.get_backend(group) == "nccl"


def all_reduce(x: torch.Tensor, group, async_op: bool = False):
    """Sum in place over the group. Returns the work handle when async_op."""
    if group_size(group) == 1:
        return None
    if not x.is_contiguous():
        raise ValueError("all_reduce works in place on a contiguous tensor (nccl requires it)")
    return dist.all_reduce(x, group=group, async_op=async_op)


def split_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Keep this rank's contiguous chunk of ``x`` along ``dim``."""
    world = group_size(group)
    if world == 1:
        return x
    size = x.shape[dim]
    if size % world != 0:
        raise ValueError(f"dimension {dim} of size {size} cannot be split evenly over {world} ranks")
    return x.narrow(dim, group_rank(group) * (size // world), size // world).contiguous()


def all_gather_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order)."""
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    if dim == 0 and _is_nccl(group):
        out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def reduce_scatter_along_dim(x: torch.Tensor, group, dim: int) -> torch.Tensor:
    """Sum over the group, then keep this rank's chunk along ``dim``."""
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world != 0:
        raise ValueError(f"dimension {dim} of size {x.shape[dim]} cannot be split evenly over {world} ranks")
    if dim == 0 and _is_nccl(group):
        x = x.contiguous()
        out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.reduce_scatter_tensor(out, x, group=group)
        return out
    summed = x.clone()
    dist.all_reduce(summed, group=group)
    return split_along_dim(summed, group, dim)
