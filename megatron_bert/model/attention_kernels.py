"""Flash attention with exact dropout at a fraction of its usual cost (Triton, GPU).

Why: cuDNN's fused attention draws one Philox number per attention probability, and at BERT's
head size (64) that draw, not the matrix units, sets the forward's time: 92 µs per layer of
BERT-345M at seq 512 / batch 32 on H200 without dropout, 209 µs with it (bench/NOTES.md, session 9).
A Bernoulli(p) drop needs ~0.47 bits of entropy per element, not 32: the dropped positions of each
query row are drawn as geometric gaps by a small kernel that writes a bit mask (drop_mask_kernels.py:
``drop_bits``, exact up to float32 rounding and the SFU logarithm's error, ~1e-6); the attention
kernels read one bit per probability. The mask is a pure function of ``(seed, salt)``; the forward
returns it for the backward (16.8 MB per layer of BERT-345M at seq 512 / batch 32: drawing it again
cost more time than keeping it).

The kernels read q, k, v straight from the QKV projection's output ``[s, b, heads · 3 · head_dim]``
(per-head ``[q | k | v]``, as qkv_kernels.py), write the context as ``[s, b, heads · head_dim]`` (the
output projection's input) and, in the backward, the gradient of the projection output in the same
packed layout, so neither side needs a permuting copy; ``projected_attention`` also folds the
(column-parallel) projection's bias grad into the backward kernels.

    forward:  out = (P ⊙ Z) v,  P = softmax(q kᵀ / √d + key mask),  Z = keep / (1 − p)
    backward: dv = (P ⊙ Z)ᵀ do,  dP = (do vᵀ) ⊙ Z,  dS = P ⊙ (dP − δ),  δ = rowsum(do ⊙ out)
              dq = dS k / √d,  dk = dSᵀ q / √d

The forward runs one program per block of query rows, the softmax online in base 2 with the row
maximum and log-sum-exp kept in fp32, as in the FlashAttention papers; the backward kernels (one per
block of query rows for dq, one per block of key rows for dk and dv) are in
attention_backward_kernels.py. On H200 (session 9) the step is 0.7–1.8 ms faster than with cuDNN's
attention; without dropout our kernels are still slower than cuDNN's (the dq kernel recomputes q kᵀ
and do vᵀ instead of accumulating dq across key blocks).
"""
from __future__ import annotations

import math

import torch

from ..triton_support import column_sum, tl, triton, tuned, usable
from . import attention_backward_kernels as bwd
from .attention_backward_kernels import bias_partials
from .drop_mask_kernels import drop_bits, keep_from_bits, mask_words
from .qkv_kernels import projection_grads

from parallel import comm
from parallel.layers import column_parallel_grads


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_ATTENTION`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_ATTENTION")


def supports(head_dim: int, dtype: torch.dtype, qkv_numel: int) -> bool:
    """Head sizes the kernels' tiles take (a power of two, 16–128), bf16 inputs (what the GPU test
    holds to cuDNN's accuracy; fp16 and fp32 models keep SDPA), and a projection output of fewer than
    2^31 elements (the kernels index within a sample with 32-bit offsets)."""
    return (16 <= head_dim <= 128 and head_dim & (head_dim - 1) == 0 and dtype == torch.bfloat16
            and qkv_numel < 2 ** 31)


def _fwd_configs():
    # The winners at seq 512 / batch 32 on H200 (bench/bench_attention.py swept 6: bench/NOTES.md) and
    # one more; each candidate costs a compile at start-up.
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in ((128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3))]


if triton is not None:
    from .attention_backward_kernels import _head_tile, _in_range, _valid_keys
    from .drop_mask_kernels import drop_tile, zero_dropped

    @tuned(_fwd_configs(), key=["S_Q", "S_K", "HEAD_DIM", "DROPOUT", "KEY_MASK", "batch", "heads"])
    @triton.jit
    def _fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bits_ptr, kv_ptr,
                    s_s, s_b, s_h, o_s, o_b, o_h, heads, batch, n_rows, qk_scale, keep_scale,
                    S_Q: tl.constexpr, S_K: tl.constexpr, HEAD_DIM: tl.constexpr, WORDS: tl.constexpr,
                    DROPOUT: tl.constexpr, KEY_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        row_ok = _in_range(rows, S_Q, BLOCK_M)
        base = b.to(tl.int64) * s_b + h * s_h
        q = _head_tile(q_ptr, base, rows, row_ok, s_s, d)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        bits = bits_ptr + bh.to(tl.int64) * S_Q  # word-major: [WORDS, b · heads · S_Q]
        for start_n in range(0, S_K, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = _in_range(cols, S_K, BLOCK_N)
            k = _head_tile(k_ptr, base, cols, col_ok, s_s, d)
            # At head size 64 the instructions per score set this loop's time as much as the matrix
            # products (bench/NOTES.md, session 14): the scale rides on the exponent's FFMA (the max of
            # raw scores, scaled once per row), the key select folds away where every key is valid
            # (_in_range), and the dropout select stays in fp32 (zero_dropped).
            s = tl.dot(q, tl.trans(k))  # [BLOCK_M, BLOCK_N], raw
            s = tl.where(_valid_keys(kv_ptr, b, cols, col_ok, S_K, KEY_MASK)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)  # log2 units
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s * qk_scale - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None]
            m_i = m_new
            if DROPOUT:
                p = zero_dropped(p, drop_tile(bits, n_rows, rows, start_n, row_ok, BLOCK_M, BLOCK_N, WORDS))
            v = _head_tile(v_ptr, base, cols, col_ok, s_s, d)
            acc = acc + tl.dot(p.to(v.dtype), v)
        empty = l_i == 0.0
        out = acc * (keep_scale / tl.where(empty, 1.0, l_i))[:, None]
        tl.store(o_ptr + b.to(tl.int64) * o_b + h * o_h + rows[:, None] * o_s + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(lse_ptr + bh.to(tl.int64) * S_Q + rows, lse, mask=row_ok)


def _check(qkv: torch.Tensor, heads: int, head_dim: int, key_valid: torch.Tensor | None, p: float) -> None:
    s, b, width = qkv.shape
    if width != heads * 3 * head_dim or not qkv.is_contiguous() or qkv.numel() >= 2 ** 31 or not 0.0 <= p < 1.0:
        raise ValueError(f"attention kernels: qkv {tuple(qkv.shape)} with {heads} heads of {head_dim}, p={p}")
    if key_valid is not None and tuple(key_valid.shape) != (b, s):
        raise ValueError(f"attention kernels: key mask {tuple(key_valid.shape)}, expected {(b, s)}")


def _views(qkv: torch.Tensor, heads: int, head_dim: int):
    s, b, _ = qkv.shape
    packed = qkv.view(s, b, heads, 3, head_dim)
    return packed[:, :, :, 0], packed[:, :, :, 1], packed[:, :, :, 2]  # each [s, b, heads, hd]


def _consts(s: int, head_dim: int, p: float, key_valid) -> dict:
    return dict(S_Q=s, S_K=s, HEAD_DIM=head_dim, WORDS=mask_words(s), DROPOUT=p > 0.0, KEY_MASK=key_valid is not None)


@torch.library.custom_op("megatron_bert::flash_attention", mutates_args=())
def flash_attention(qkv: torch.Tensor, key_valid: torch.Tensor | None, seed: torch.Tensor, heads: int,
                    head_dim: int, p: float, salt: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention of the packed projection ``qkv [s, b, heads · 3 · head_dim]`` → (context
    ``[s, b, heads · head_dim]``, log-sum-exp ``[b · heads, s]`` (fp32, base 2) and the dropout bit
    mask (``drop_bits``; empty without dropout), both for the backward).

    ``key_valid``: ``[b, s]`` bool, False for padding keys, or None. ``p``: dropout on the attention
    probabilities, its mask drawn from ``seed`` (one int64 on the device) and ``salt``."""
    _check(qkv, heads, head_dim, key_valid, p)
    s, b, _ = qkv.shape
    q, k, v = _views(qkv, heads, head_dim)
    out = torch.empty(s, b, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty(b * heads, s, dtype=torch.float32, device=qkv.device)
    bits = drop_bits(seed, b * heads * s, s, p, salt) if p > 0.0 else lse.new_zeros(0, 0, dtype=torch.int32)
    kv = key_valid if key_valid is not None else lse  # never read without KEY_MASK
    grid = lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * heads)  # noqa: E731
    _fwd_kernel[grid](q, k, v, out, lse, bits, kv, q.stride(0), q.stride(1), q.stride(2),
                      out.stride(0), out.stride(1), out.stride(2), heads, b, b * heads * s,
                      math.log2(math.e) / math.sqrt(head_dim), 1.0 / (1.0 - p), **_consts(s, head_dim, p, key_valid))
    return out.view(s, b, heads * head_dim), lse, bits


@flash_attention.register_fake
def _(qkv, key_valid, seed, heads, head_dim, p, salt):
    s, b, _ = qkv.shape
    bits = (mask_words(s), b * heads * s) if p > 0.0 else (0, 0)
    return (qkv.new_empty(s, b, heads * head_dim), qkv.new_empty(b * heads, s, dtype=torch.float32),
            qkv.new_empty(bits, dtype=torch.int32))


@torch.library.custom_op("megatron_bert::flash_attention_backward", mutates_args=())
def flash_attention_backward(dout: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             bits: torch.Tensor, key_valid: torch.Tensor | None, heads: int, head_dim: int,
                             p: float, bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of ``qkv`` (same packed layout) from that of the context, and with ``bias_grad``
    its column sum (the projection's bias grad, ``[heads · 3 · head_dim]``; else empty)."""
    s, b, _ = qkv.shape
    dout4 = dout.reshape(s, b, heads, head_dim)
    out4 = out.view(s, b, heads, head_dim)
    if dout4.stride() != out4.stride():
        dout4 = dout4.contiguous()
    q, k, v = _views(qkv, heads, head_dim)
    dqkv = torch.empty_like(qkv)
    dq, dk, dv = _views(dqkv, heads, head_dim)
    kv = key_valid if key_valid is not None else lse
    partial = bias_partials(s, b, qkv.shape[-1], qkv.device) if bias_grad else lse
    scalars = (math.log2(math.e) / math.sqrt(head_dim), 1.0 / math.sqrt(head_dim), 1.0 / (1.0 - p))
    bwd.backward(q, k, v, out4, dout4, lse, bits, kv, partial, dq, dk, dv, heads, b, scalars,
                 dict(_consts(s, head_dim, p, key_valid), BIAS_GRAD=bias_grad))
    dbias = column_sum(partial, qkv.dtype) if bias_grad else qkv.new_empty(0)
    return dqkv, dbias


@flash_attention_backward.register_fake
def _(dout, qkv, out, lse, bits, key_valid, heads, head_dim, p, bias_grad):
    return torch.empty_like(qkv), qkv.new_empty(qkv.shape[-1] if bias_grad else 0)


def _setup_context(ctx, inputs, output):
    qkv, key_valid, _seed, heads, head_dim, p, _salt = inputs
    ctx.save_for_backward(qkv, output[0], output[1], output[2], key_valid)
    ctx.args = (heads, head_dim, p)


def _backward(ctx, dout, _dlse, _dbits):
    qkv, out, lse, bits, key_valid = ctx.saved_tensors
    dqkv, _ = flash_attention_backward(dout, qkv, out, lse, bits, key_valid, *ctx.args, False)
    return dqkv, None, None, None, None, None, None


flash_attention.register_autograd(_backward, setup_context=_setup_context)


class _ProjectedAttention(torch.autograd.Function):
    """The (column-parallel) QKV projection + attention, the projection's bias grad folded into the
    attention backward. The weight and input grads are the projection's two GEMMs; at TP > 1 with the
    column-parallel collectives around them (parallel.layers.column_parallel_grads)."""

    @staticmethod
    def forward(ctx, x, weight, bias, key_valid, seed, heads: int, head_dim: int, p: float, group, sp: bool):
        total = comm.all_gather_along_dim(x, group, 0) if sp else x  # [s, b, h]
        mixed = torch.nn.functional.linear(total, weight, bias)  # [s, b, heads · 3 · hd]
        out, lse, bits = flash_attention(mixed, key_valid, seed, heads, head_dim, p, comm.group_rank(group))
        ctx.save_for_backward(x, weight, mixed, out, lse, bits, key_valid)  # x: the shard under SP
        ctx.args, ctx.group, ctx.sp = (heads, head_dim, p), group, sp
        return out

    @staticmethod
    def backward(ctx, dout):
        x, weight, mixed, out, lse, bits, key_valid = ctx.saved_tensors
        dqkv, dbias = flash_attention_backward(dout, mixed, out, lse, bits, key_valid, *ctx.args, True)
        if comm.group_size(ctx.group) == 1:
            dx, dweight = projection_grads(dqkv, x, weight)
        else:
            dx, dweight, _ = column_parallel_grads(dqkv, x, weight, ctx.group, ctx.sp, bias_grad=False)
        return dx, dweight, dbias, None, None, None, None, None, None, None


def projected_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, key_valid: torch.Tensor | None,
                        seed: torch.Tensor, heads: int, head_dim: int, p: float, group=None,
                        sequence_parallel: bool = False) -> torch.Tensor:
    """``flash_attention(linear(x, weight, bias), ...)``'s context ``[s, b, heads · head_dim]`` for
    ``x [s, b, h]`` (``weight [heads · 3 · hd, h]`` in the per-head q|k|v order). With a TP ``group``
    the projection is column-parallel (``weight``, ``bias``: this rank's heads; under
    ``sequence_parallel`` x is the sequence shard ``[s/tp, b, h]``) and the dropout mask is salted with
    the TP rank."""
    return _ProjectedAttention.apply(x, weight, bias, key_valid, seed, heads, head_dim, p, group, sequence_parallel)


def reference(qkv: torch.Tensor, key_valid: torch.Tensor | None, bits: torch.Tensor | None, heads: int,
              head_dim: int, p: float) -> torch.Tensor:
    """The same function in plain torch (float64-friendly), the dropout mask given as ``drop_bits``'s words."""
    s, b, _ = qkv.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in _views(qkv, heads, head_dim))  # [b, heads, s, hd]
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if bits is not None and p > 0.0:
        probs = probs * keep_from_bits(bits, s).view(b, heads, s, s) / (1.0 - p)
    return (probs @ v).permute(2, 0, 1, 3).reshape(s, b, heads * head_dim)
