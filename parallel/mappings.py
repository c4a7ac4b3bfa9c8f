"""Autograd-aware moves between the replicated region and the tensor-parallel region.

Each pair below is a forward and its adjoint. ``f`` marks the entry to a TP block and ``g`` the
exit (Megatron paper, fig. 3):

    replicated x ──copy_to_tp (f)──► [column-parallel ... row-parallel] ──reduce_from_tp (g)──► x

With sequence parallelism the replicated region is instead split along the sequence
(dim 0 of ``[s, b, h]``), and f / g become all-gather / reduce-scatter. The collectives are
comm.py's functional ones, so torch.compile traces through every pair.
"""
from __future__ import annotations

import torch

from . import comm


class _CopyToTP(torch.autograd.Function):
    """fwd: identity; bwd: all-reduce (every rank's branch contributed to dL/dx)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return comm.sum_across(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """fwd: all-reduce partial sums; bwd: identity."""

    @staticmethod
    def forward(ctx, x, group):
        return comm.sum_across(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    """fwd: keep my chunk of the last dim; bwd: all-gather the last dim."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split_along_dim(x, group, x.dim() - 1)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along_dim(grad, ctx.group, grad.dim() - 1), None


class _GatherFromTP(torch.autograd.Function):
    """fwd: all-gather the last dim; bwd: keep my chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_gather_along_dim(x, group, x.dim() - 1)

    @staticmethod
    def backward(ctx, grad):
        return comm.split_along_dim(grad, ctx.group, grad.dim() - 1), None


# --------------------------------------------------------------------------- sequence parallel
class _ScatterToSP(torch.autograd.Function):
    """fwd: keep my chunk of the sequence (dim 0); bwd: all-gather the sequence."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.split_along_dim(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along_dim(grad, ctx.group, 0), None


class _GatherFromSP(torch.autograd.Function):
    """fwd: all-gather the sequence; bwd: reduce-scatter (the consumer is a TP block, each rank
    holds a partial gradient of the full sequence) or plain split (the consumer is replicated)."""

    @staticmethod
    def forward(ctx, x, group, grad_is_partial):
        ctx.group = group
        ctx.grad_is_partial = grad_is_partial
        return comm.all_gather_along_dim(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        if ctx.grad_is_partial:
            return comm.reduce_scatter_along_dim(grad, ctx.group, 0), None, None
        return comm.split_along_dim(grad, ctx.group, 0), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """fwd: reduce-scatter partial sums along the sequence; bwd: all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.reduce_scatter_along_dim(x, group, 0)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_along_dim(grad, ctx.group, 0), None


def _trivial(group) -> bool:
    return comm.group_size(group) == 1


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _GatherFromTP.apply(x, group)


def scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ScatterToSP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group, grad_is_partial: bool = True) -> torch.Tensor:
    return x if _trivial(group) else _GatherFromSP.apply(x, group, grad_is_partial)


def reduce_scatter_to_sp(x: torch.Tensor, group) -> torch.Tensor:
    return x if _trivial(group) else _ReduceScatterToSP.apply(x, group)
