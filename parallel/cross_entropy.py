"""Cross-entropy over logits split along the vocabulary, without ever gathering the vocabulary.

Per token we need three global quantities, each one all-reduce of a scalar per token:
the max logit (for a stable softmax), the target's logit (only one rank owns it) and the sum of
exponentials. Label smoothing adds the sum of all logits.
"""
from __future__ import annotations

import functools

import torch

from . import comm
from .mappings import reduce_from_tp


def _shifted_and_target(logits, target, group, ignore_index: int):
    """fp32 logits ``[..., V/tp]`` less each token's max over the whole vocabulary (a constant shift: no
    gradient through it), and per token: the target's shifted logit where this rank holds the target
    (else 0), its index in this rank's slice (0 where outside), ``outside`` and ``ignored``."""
    logits = logits.float()
    part = logits.shape[-1]
    shifted = logits - comm.max_across(logits.detach().amax(dim=-1), group).unsqueeze(-1)
    ignored = target == ignore_index
    local = target - comm.group_rank(group) * part
    outside = (local < 0) | (local >= part) | ignored
    local = local.masked_fill(outside, 0)
    target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
    return shifted, target_logit, local, outside, ignored


def _loss(sums, vocab_size: int, label_smoothing: float, ignored):
    """The loss from the all-reduced per-token sums ``[target logit, sum of exps(, sum of logits)]``."""
    log_z = sums[1].log()
    loss = log_z - sums[0]
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * (sums[2] / vocab_size - log_z)
    return loss.masked_fill(ignored, 0.0)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, ignore_index, label_smoothing):
        # logits: [..., V/tp] (any dtype; computed in fp32)   target: [...]
        vocab_size = logits.shape[-1] * comm.group_size(group)
        shifted, target_logit, local_target, outside, ignored = _shifted_and_target(logits, target, group, ignore_index)
        exp = shifted.exp()
        sums = [target_logit, exp.sum(dim=-1)] + ([shifted.sum(dim=-1)] if label_smoothing > 0 else [])
        stats = torch.stack(sums, dim=0)
        comm.all_reduce(stats, group)  # one collective for all per-token sums
        loss = _loss(stats, vocab_size, label_smoothing, ignored)

        softmax = exp.div_(stats[1].unsqueeze(-1))
        ctx.save_for_backward(softmax, local_target, outside, ignored)
        ctx.label_smoothing, ctx.vocab_size = label_smoothing, vocab_size
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_target, outside, ignored = ctx.saved_tensors
        eps = ctx.label_smoothing
        grad = softmax  # reused in place: backward runs once
        owns = (~outside).to(grad.dtype)
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -(1.0 - eps) * owns.unsqueeze(-1))
        if eps > 0:
            grad.sub_(eps / ctx.vocab_size)
        grad.mul_((grad_loss * (~ignored).to(grad.dtype)).unsqueeze(-1))
        return grad, None, None, None, None


def _local_cross_entropy(logits, target, ignore_index: int, label_smoothing: float):
    """The same loss for an unsplit vocabulary in plain torch ops (autograd derives the backward)."""
    logits = logits.float()
    log_z = torch.logsumexp(logits, dim=-1)
    ignored = target == ignore_index
    target_logit = logits.gather(-1, target.masked_fill(ignored, 0).unsqueeze(-1)).squeeze(-1)
    loss = log_z - target_logit
    if label_smoothing > 0:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * (logits.mean(dim=-1) - log_z)
    return loss.masked_fill(ignored, 0.0)


def _split_cross_entropy(logits, target, group, ignore_index: int, label_smoothing: float):
    """The vocab-parallel loss in plain torch ops for torch.compile at TP > 1: the per-token sums cross
    the ranks through ``reduce_from_tp`` (backward: identity, as every rank's loss is the same), so
    autograd derives the Function's backward."""
    shifted, target_logit, _, _, ignored = _shifted_and_target(logits, target, group, ignore_index)
    sums = [target_logit, shifted.exp().sum(dim=-1)] + ([shifted.sum(dim=-1)] if label_smoothing > 0 else [])
    sums = reduce_from_tp(torch.stack(sums), group)  # one collective for all per-token sums
    return _loss(sums, logits.shape[-1] * comm.group_size(group), label_smoothing, ignored)


@functools.lru_cache(maxsize=None)
def _compiled(split: bool):
    # Inductor turns the fp32 passes over [tokens, V/tp] (upcast, max, exp, sum, softmax grad) into
    # one reduction forward and one pointwise kernel backward, and keeps no fp32 softmax for backward.
    return torch.compile(_split_cross_entropy if split else _local_cross_entropy)


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    group=None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    compiled: bool = False,
) -> torch.Tensor:
    """Per-token loss ``[...]`` (0 at ignored positions) from vocab-parallel logits ``[..., V/tp]``.

    The returned gradient has the logits' dtype cast by autograd; math is fp32 throughout.
    ``compiled``: on GPU, the same loss as torch.compile'd plain torch ops instead (ignored on CPU,
    where Inductor would need a C++ toolchain and buys nothing).
    """
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    if compiled and logits.is_cuda:
        if comm.group_size(group) == 1:
            return _compiled(False)(logits, target, ignore_index, label_smoothing)
        return _compiled(True)(logits, target, group, ignore_index, label_smoothing)
    return _VocabParallelCrossEntropy.apply(logits, target, group, ignore_index, label_smoothing)
