"""The fused QKV projection with a one-pass backward (GPU, one TP rank).

Forward: ``mixed = x Wᵀ + b`` (one GEMM, bias in its epilogue), viewed as q, k, v
``[b, heads, s, hd]`` without a copy (layout ``[s, b, heads, 3, hd]``, Megatron's per-head order).
Backward: the attention kernel hands back dq, dk, dv as three tensors, and the GEMMs need them
interleaved as one ``[s·b, 3h]`` gradient. Left to Inductor that is two passes over 96 MB per layer
at seq 512 / batch 32 (an interleaving copy, then a column sum for the bias grad that reads it all
again; 77 µs on H200). Here one Triton kernel writes the interleaved gradient and folds the bias
grad into per-block partial sums as it goes (the scheme of gelu_kernels.py), so the tensor is read
once.

``available()`` is False without Triton or a GPU (or with ``MEGATRON_BERT_TRITON_QKV=0``); the model
then keeps the plain linear layer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..triton_support import column_sum, tl, triton, usable

_ROWS = 64  # tokens per program (one row of bias-grad partial sums per block of tokens)


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_QKV`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_QKV")


if triton is not None:
    @triton.jit
    def _pack_kernel(q_ptr, k_ptr, v_ptr, out_ptr, partial_ptr, n_tokens, batch,
                     sb_q, sh_q, ss_q, sb_k, sh_k, ss_k, sb_v, sh_v, ss_v,
                     HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr):
        # Program (token block, head, which of q/k/v): ROWS tokens × HEAD_DIM columns.
        pid_r, head, which = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if which == 0:
            src, sb, sh, ss = q_ptr, sb_q, sh_q, ss_q
        elif which == 1:
            src, sb, sh, ss = k_ptr, sb_k, sh_k, ss_k
        else:
            src, sb, sh, ss = v_ptr, sb_v, sh_v, ss_v
        tokens = pid_r.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # token = seq_pos · batch + sample
        ok = tokens < n_tokens
        d = tl.arange(0, HEAD_DIM)
        src_row = (tokens % batch) * sb + (tokens // batch) * ss + head * sh
        g = tl.load(src + src_row[:, None] + d[None, :], mask=ok[:, None], other=0.0)
        col = (head * 3 + which) * HEAD_DIM + d  # column of the [tokens, heads · 3 · hd] gradient
        width = HEADS * 3 * HEAD_DIM
        tl.store(out_ptr + tokens[:, None] * width + col[None, :], g, mask=ok[:, None])
        tl.store(partial_ptr + pid_r * width + col, tl.sum(g.to(tl.float32), axis=0))


@torch.library.custom_op("megatron_bert::qkv_grad_pack", mutates_args=())
def qkv_grad_pack(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dq, dk, dv ``[b, heads, s, hd]`` (any strides with a unit last stride) → the interleaved
    gradient ``[s, b, heads · 3 · hd]`` and its column sum (the bias grad, in ``bias``'s dtype)."""
    b, heads, s, hd = dq.shape
    grads = [t if t.stride(-1) == 1 else t.contiguous() for t in (dq, dk, dv)]
    out = torch.empty(s, b, heads * 3 * hd, dtype=dq.dtype, device=dq.device)
    n_tokens = s * b
    blocks = triton.cdiv(n_tokens, _ROWS)
    width = heads * 3 * hd
    partial = torch.empty(blocks, width, dtype=torch.float32, device=dq.device)
    strides = [x for t in grads for x in (t.stride(0), t.stride(1), t.stride(2))]
    _pack_kernel[(blocks, heads, 3)](*grads, out, partial, n_tokens, b, *strides,
                                     HEADS=heads, HEAD_DIM=hd, ROWS=_ROWS, num_warps=4)
    return out, column_sum(partial, bias.dtype)


@qkv_grad_pack.register_fake
def _(dq, dk, dv, bias):
    b, heads, s, hd = dq.shape
    return dq.new_empty(s, b, heads * 3 * hd), torch.empty_like(bias)


def projection_grads(dmixed: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """The input and weight grads of ``mixed = x Wᵀ + b`` (``x [s, b, h]``) from ``dmixed``: two GEMMs."""
    g2 = dmixed.view(-1, dmixed.shape[-1])
    return g2.matmul(weight).view(x.shape), g2.t().matmul(x.reshape(-1, x.shape[-1]))


class _ProjectQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, heads: int, head_dim: int):
        ctx.save_for_backward(x, weight, bias)
        s, b, _ = x.shape
        ctx.grad_shape = (b, heads, s, head_dim)
        mixed = F.linear(x, weight, bias)  # [s, b, heads · 3 · hd]
        return mixed.view(s, b, heads, 3, head_dim).permute(3, 1, 2, 0, 4).unbind(0)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, weight, bias = ctx.saved_tensors
        dq, dk, dv = (x.new_zeros(ctx.grad_shape) if g is None else g for g in (dq, dk, dv))
        dmixed, dbias = qkv_grad_pack(dq, dk, dv, bias)  # [s, b, 3h], [3h]
        dx, dweight = projection_grads(dmixed, x, weight)
        return dx, dweight, dbias, None, None


def project_qkv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int, head_dim: int):
    """q, k, v ``[b, heads, s, hd]`` of ``x [s, b, h]`` (one TP rank, GPU; ``head_dim`` a power of two)."""
    return _ProjectQKV.apply(x, weight, bias, heads, head_dim)
