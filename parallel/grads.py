"""Gradient synchronisation and TP-aware norms.

* DP: every data-parallel replica holds the same parameters, so gradients are averaged over the
  DP group (bucketed, one all-reduce per ~25M elements).
* SP: replicated parameters used inside sequence-parallel regions (LayerNorm, row-parallel bias)
  only saw this rank's share of the sequence, so their grads are summed over the TP group.
* Norm: TP-sharded params contribute their shard on every rank; replicated params are counted
  once (on TP rank 0), then one all-reduce over TP gives the global norm. ``whole_tensor_norms``
  does the same per tensor (LAMB's trust ratios).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from . import comm
from .init import is_tp_sharded
from .state import ParallelState

_BUCKET_ELEMS = 25_000_000


def _buckets(tensors: list[torch.Tensor]):
    """Group tensors by dtype/device into buckets of about _BUCKET_ELEMS elements."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        bucket, size = [], 0
        for t in ts:
            bucket.append(t)
            size += t.numel()
            if size >= _BUCKET_ELEMS:
                yield bucket
                bucket, size = [], 0
        if bucket:
            yield bucket


def _allreduce_coalesced(tensors: list[torch.Tensor], group, scale: float = 1.0,
                         dtype: torch.dtype | None = None) -> None:
    """Sum (then scale) in place over the group, bucketed; ``dtype``: the sum's (e.g. fp32 for 16-bit
    tensors: each result is rounded once, when copied back)."""
    for bucket in _buckets(tensors):
        flat = _flatten_dense_tensors(bucket)
        if dtype is not None:
            flat = flat.to(dtype)
        comm.all_reduce(flat, group)
        if scale != 1.0:
            flat.mul_(scale)
        torch._foreach_copy_(bucket, list(_unflatten_dense_tensors(flat, bucket)))  # one launch, any dtypes


def allreduce_data_parallel_grads(params: Iterable[torch.nn.Parameter], ps: ParallelState, average: bool = True) -> None:
    """Average (or, when each rank's loss is already normalised globally, sum) grads over DP."""
    if ps.dp_size == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    _allreduce_coalesced(grads, ps.dp_group, 1.0 / ps.dp_size if average else 1.0)


def allreduce_sequence_parallel_grads(params: Iterable[torch.nn.Parameter], ps: ParallelState,
                                      grads: list[torch.Tensor] | None = None) -> None:
    """Sum the partial grads of replicated params that live in sequence-parallel regions. ``grads``:
    one per param, to sum instead of ``p.grad`` (16-bit grads an optimizer reads in place): summed in
    fp32, each rounded once."""
    if ps.tp_size == 1:
        return
    pairs = zip(params, grads) if grads is not None else ((p, p.grad) for p in params)
    partial = [g for p, g in pairs if g is not None and getattr(p, "sequence_parallel", False)]
    if partial:
        _allreduce_coalesced(partial, ps.tp_group, dtype=torch.float32 if grads is not None else None)


def grad_norm(params: Iterable[torch.nn.Parameter], ps: ParallelState, norm_type: float = 2.0,
              grads: list[torch.Tensor] | None = None, dp_sharded: list[bool] | None = None) -> torch.Tensor:
    """Global gradient norm (fp32 scalar tensor), the same on every rank. ``grads``: one per param, to
    use instead of ``p.grad`` (e.g. 16-bit grads not yet copied into fp32 masters: the norm is
    computed in fp32 either way). ``dp_sharded``: one per param, for grads that are DP slices (ZeRO,
    dp_shard.py): the True ones are summed over DP too, the others (whole on every DP rank) count
    on DP rank 0 only."""
    params = list(params)
    pairs = list(zip(params, grads)) if grads is not None else [(p, p.grad) for p in params]
    shards = dp_sharded if dp_sharded is not None else [False] * len(pairs)
    triples = [(p, g, s) for (p, g), s in zip(pairs, shards) if g is not None]
    device = triples[0][1].device if triples else ps.device
    over_dp = dp_sharded is not None and ps.dp_size > 1
    if norm_type == float("inf"):
        local = torch.zeros((), dtype=torch.float32, device=device)
        for _, g, _ in triples:
            if g.numel():  # (a DP slice may be empty)
                local = torch.maximum(local, g.detach().abs().max().float())
        if ps.tp_size > 1:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=ps.tp_group)
        if over_dp:
            dist.all_reduce(local, op=dist.ReduceOp.MAX, group=ps.dp_group)
        return local
    # Replicated params count on TP rank 0 only (and, with DP slices, whole grads on DP rank 0 only).
    # Elsewhere they still enter the sum times 0, and 0 * NaN = NaN, so a non-finite replicated grad on
    # any rank poisons the global norm (skipped step). Two fused multi-tensor norms, no host→device
    # copy: the whole thing can be graph-captured.
    def counts_here(p, sharded):
        return (is_tp_sharded(p) or ps.tp_rank == 0) and (sharded or not over_dp or ps.dp_rank == 0)

    counted = [g.detach() for p, g, s in triples if counts_here(p, s)]
    poison_only = [g.detach() for p, g, s in triples if not counts_here(p, s)]
    total = torch.zeros((), dtype=torch.float32, device=device)
    if counted:
        total = total + torch.stack(torch._foreach_norm(counted, norm_type, dtype=torch.float32)).pow(norm_type).sum()
    if poison_only:
        total = total + torch.stack(torch._foreach_norm(poison_only, norm_type, dtype=torch.float32)).sum() * 0.0
    comm.all_reduce(total, ps.tp_group)
    if over_dp:
        comm.all_reduce(total, ps.dp_group)
    return total ** (1.0 / norm_type)


def whole_tensor_norms(tensors: list[torch.Tensor], ps: ParallelState, tp_sharded, dp_sliced=None) -> torch.Tensor:
    """L2 norm of each whole (logical) tensor, one fp32 entry per tensor, the same on every rank.

    ``tensors[i]`` is this rank's part of tensor i: its TP shard where ``tp_sharded[i]`` (else the whole,
    replicated over TP), further cut to this rank's DP slice where ``dp_sliced[i]`` (ZeRO, dp_shard.py;
    else whole on every DP rank). Both are bool sequences or bool tensors on the tensors' device (pass
    tensors to keep the call free of host→device copies). One fused multi-tensor norm, then one
    all-reduce of the n squares over TP and (with ``dp_sliced``) one over DP; parts held whole count
    on rank 0 of that group only (elsewhere times 0, so a NaN still poisons every rank's result)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32, device=ps.device)
    device = tensors[0].device
    squares = torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float32)).square()

    def summed(over: torch.Tensor, group, rank: int) -> torch.Tensor:
        counted = torch.as_tensor(over, dtype=torch.bool, device=device) | (rank == 0)
        out = torch.where(counted, squares, squares * 0.0)
        comm.all_reduce(out, group)
        return out

    if ps.tp_size > 1:
        squares = summed(tp_sharded, ps.tp_group, ps.tp_rank)
    if dp_sliced is not None and ps.dp_size > 1:
        squares = summed(dp_sliced, ps.dp_group, ps.dp_rank)
    return squares.sqrt()


def clip_coefficient(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor that brings grads of global norm ``norm`` down to ``max_norm`` (never above 1; 1 when
    the norm is non-finite or clipping is off), as a device tensor: no host synchronisation."""
    if max_norm <= 0:
        return torch.ones_like(norm)
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter], max_norm: float, ps: ParallelState, norm_type: float = 2.0
) -> torch.Tensor:
    """Scale grads so the global norm is at most ``max_norm``; returns the norm before clipping.

    A non-finite norm is returned unchanged and grads are left alone, so callers can skip the step.
    """
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params, ps, norm_type)
    if max_norm > 0 and params:
        torch._foreach_mul_([p.grad for p in params], clip_coefficient(norm, max_norm))
    return norm
