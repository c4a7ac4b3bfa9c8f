"""Column- and row-parallel linear layers and the vocab-parallel embedding.

Shapes use the sequence-first convention ``[s, b, h]``, but the linear layers work on any leading
dims. With ``sequence_parallel`` the input of a column-parallel layer is the sequence shard
``[s/tp, b, h]`` and the output of a row-parallel layer is reduce-scattered back to it.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import comm
from .init import InitMethod, init_sharded, set_tp_metadata, zeros_init
from .mappings import gather_from_tp, reduce_from_tp, reduce_scatter_to_sp, scatter_to_tp
from .state import ParallelState, check_divisible


class _ColumnParallelMatmul(torch.autograd.Function):
    """``y = gather_or_copy(x) @ Wᵀ + b`` with the input-gradient collective overlapped with the
    weight-gradient GEMM (the async all-reduce of Megatron's column-parallel backward).

    Without sequence parallel the entry is "copy" (bwd all-reduce of dL/dx); with it the entry is an
    all-gather of the sequence (bwd reduce-scatter). Under SP only the local shard is saved and the
    full input is re-gathered in backward, behind the input-grad GEMM, so activation memory stays 1/tp.
    The collectives are comm.py's functional ones: under torch.compile the backward is traced with
    them, in this order.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, group, sequence_parallel):
        ctx.group, ctx.sequence_parallel = group, sequence_parallel
        ctx.has_bias = bias is not None
        # Apply autocast by hand: backward runs outside autocast, and its GEMMs must see the
        # same dtypes the forward used.
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            x, weight = x.to(dt), weight.to(dt)
            bias = None if bias is None else bias.to(dt)
        total = comm.all_gather_along_dim(x, group, 0) if sequence_parallel else x  # [s, b, in]
        ctx.save_for_backward(x, weight)
        with torch.autocast(dev, enabled=False):
            return F.linear(total, weight, bias)  # [s, b, out/tp]

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_in, grad_w, grad_b = column_parallel_grads(grad_out, x, weight, ctx.group, ctx.sequence_parallel,
                                                        ctx.has_bias)
        return grad_in, grad_w, grad_b, None, None


def column_parallel_grads(grad_out, x, weight, group, sequence_parallel: bool, bias_grad: bool = True):
    """The backward of ``y = gather_or_copy(x) @ Wᵀ + b`` from ``grad_out [s, b, out/tp]`` and the saved
    input (under SP this rank's shard ``[s/tp, b, in]``, re-gathered here behind the input-grad GEMM):
    ``(grad_in, grad_w, grad_b or None)``, the input-grad collective running during the weight-grad
    GEMM. For autograd Functions that fuse more into the column-parallel projection."""
    total = comm.all_gather_along_dim(x, group, 0, wait=False) if sequence_parallel else x
    grad_in = grad_out.matmul(weight)  # [s, b, in], partial over the TP ranks
    if sequence_parallel:
        total = comm.wait(total)
        grad_in = comm.reduce_scatter_along_dim(grad_in, group, 0, wait=False)  # → [s/tp, b, in]
    else:
        grad_in = comm.sum_across(grad_in, group, wait=False)
    # Weight/bias gradients while the collective runs.
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    grad_w = g2.t().matmul(total.reshape(-1, total.shape[-1]))
    grad_b = g2.sum(0) if bias_grad else None
    return comm.wait(grad_in), grad_w, grad_b


def column_parallel_linear(x, weight, bias, group, sequence_parallel: bool = False) -> torch.Tensor:
    """Functional form, e.g. for logits against a vocab-parallel embedding table (tied weights)."""
    if comm.group_size(group) == 1:
        return F.linear(x, weight, bias)
    return _ColumnParallelMatmul.apply(x, weight, bias, group, sequence_parallel)


class ColumnParallelLinear(nn.Module):
    """``Y = X Aᵀ`` with A split by rows (output features): each rank computes its slice of Y.

    Weight: ``[output_size / tp, input_size]``, ``partition_dim = 0``.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ps: ParallelState,
        *,
        init_method: InitMethod,
        bias: bool = True,
        gather_output: bool = False,
        sequence_parallel: bool = False,
        skip_bias_add: bool = False,
        stride: int = 1,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_divisible(output_size, ps.tp_size, "output size of a column-parallel layer",
                        "choose parallel.tensor dividing the layer width")
        if gather_output and sequence_parallel:
            raise ValueError("gather_output and sequence_parallel cannot be combined")
        self.ps = ps
        self.input_size, self.output_size = input_size, output_size
        self.gather_output, self.sequence_parallel = gather_output, sequence_parallel
        self.skip_bias_add = skip_bias_add
        weight = init_sharded((output_size, input_size), init_method, 0, ps.tp_rank, ps.tp_size, stride, dtype,
                              ps.device)
        self.weight = nn.Parameter(weight.to(ps.device))
        set_tp_metadata(self.weight, 0, stride)
        if bias:
            b = init_sharded((output_size,), zeros_init, 0, ps.tp_rank, ps.tp_size, stride, dtype, ps.device)
            self.bias = nn.Parameter(b.to(ps.device))
            set_tp_metadata(self.bias, 0, stride)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [s, b, in] (or [s/tp, b, in] under SP) → y: [s, b, out/tp]
        bias = None if self.skip_bias_add else self.bias
        y = column_parallel_linear(x, self.weight, bias, self.ps.tp_group, self.sequence_parallel)
        return gather_from_tp(y, self.ps.tp_group) if self.gather_output else y

    def extra_repr(self) -> str:
        return f"in={self.input_size}, out={self.output_size} (/{self.ps.tp_size}), sp={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """``Y = X Aᵀ`` with A split by columns (input features): partial sums reduced across TP.

    Weight: ``[output_size, input_size / tp]``, ``partition_dim = 1``. The bias is replicated and
    added after the reduction.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        ps: ParallelState,
        *,
        init_method: InitMethod,
        bias: bool = True,
        input_is_parallel: bool = True,
        sequence_parallel: bool = False,
        skip_bias_add: bool = False,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        check_divisible(input_size, ps.tp_size, "input size of a row-parallel layer",
                        "choose parallel.tensor dividing the layer width")
        if sequence_parallel and not input_is_parallel:
            raise ValueError("sequence_parallel needs input_is_parallel=True")
        self.ps = ps
        self.input_size, self.output_size = input_size, output_size
        self.input_is_parallel, self.sequence_parallel = input_is_parallel, sequence_parallel
        self.skip_bias_add = skip_bias_add
        weight = init_sharded((output_size, input_size), init_method, 1, ps.tp_rank, ps.tp_size, 1, dtype, ps.device)
        self.weight = nn.Parameter(weight.to(ps.device))
        set_tp_metadata(self.weight, 1)
        if bias:
            self.bias = nn.Parameter(torch.zeros(output_size, dtype=dtype, device=ps.device))
            # Under SP the bias is added to the sequence shard: its grad is partial per rank.
            self.bias.sequence_parallel = sequence_parallel
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [s, b, in/tp] → y: [s, b, out] (or [s/tp, b, out] under SP)
        group = self.ps.tp_group
        if not self.input_is_parallel:
            x = scatter_to_tp(x, group)
        y = F.linear(x, self.weight)
        y = reduce_scatter_to_sp(y, group) if self.sequence_parallel else reduce_from_tp(y, group)
        if self.bias is not None and not self.skip_bias_add:
            y = y + self.bias
        return y

    def extra_repr(self) -> str:
        return f"in={self.input_size} (/{self.ps.tp_size}), out={self.output_size}, sp={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary: ``[V / tp, h]`` per rank.

    Each rank looks up the ids that fall in its range, zeros the rest, and the partial results
    are summed across TP (``reduce_output=False`` leaves that to the caller, e.g. to reduce-scatter
    straight into a sequence-parallel region). ``lookup(ids, weight)`` is the table lookup itself:
    ``F.embedding`` unless the caller has one with another backward (the same values).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        ps: ParallelState,
        *,
        init_method: InitMethod,
        reduce_output: bool = True,
        dtype: torch.dtype = torch.float32,
        lookup: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.embedding,
    ):
        super().__init__()
        self.lookup = lookup
        check_divisible(num_embeddings, ps.tp_size, "vocabulary size",
                        "pad the vocabulary to a multiple of parallel.tensor")
        self.ps = ps
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.reduce_output = reduce_output
        per_rank = num_embeddings // ps.tp_size
        self.vocab_start, self.vocab_end = ps.tp_rank * per_rank, (ps.tp_rank + 1) * per_rank
        weight = init_sharded((num_embeddings, embedding_dim), init_method, 0, ps.tp_rank, ps.tp_size, 1, dtype,
                              ps.device)
        self.weight = nn.Parameter(weight.to(ps.device))
        set_tp_metadata(self.weight, 0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.ps.tp_size == 1:
            return self.lookup(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        out = self.lookup(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp(out, self.ps.tp_group) if self.reduce_output else out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings} (/{self.ps.tp_size}), {self.embedding_dim}"
