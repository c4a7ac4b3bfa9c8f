"""The word embeddings' backward as sorted segment sums in Triton (GPU).

``dW[v] = sum of grad[t] over the tokens t with ids[t] == v``, the rows of ids that do not occur zero.
torch's CUDA embedding backward does this with a sort and a two-pass segment reduction in ~20 launches:
0.248 ms from a CUDA graph at the 345M step's 16384 tokens on H200, against 0.082 ms here (a stable
sort of 16-bit ids 30 µs, the zero fill 20 µs, and two kernels, 18 + 7 µs; bench/NOTES.md, session 16).

1. ``_chunk_sums_kernel``: one program per (chunk of CHUNK sorted positions, column block). It gathers
   its CHUNK rows of grad, and ``eq @ rows`` (``eq[i, j] = ids[i] == ids[j]``, one tile product with
   fp32 accumulation) gives every row its run's sum within the chunk. A run that starts and ends inside
   the chunk is written at its last row, rounded once. A chunk's first run, when it began in an earlier
   chunk, leaves its sum in ``heads[chunk]``; its last run, when it began here and goes on past the
   chunk, in ``tails[chunk]``.
2. ``_carry_kernel``: the chunk where a cut run began adds the ``heads`` of the chunks it covers
   (CARRY_AHEAD at a time, in a fixed order) to its ``tails`` entry and writes the row. A long run
   ([MASK] is ~12% of the tokens: ~30 chunks) is thus summed by many programs in pass 1 and a short
   walk in pass 2, and no row is written twice.

Every sum is taken in a fixed order (no atomics, one fixed launch configuration: no autotuning), so the
grads are the same run to run; they differ from torch's, whose order is another, by fp32 rounding
before the final 16-bit rounding. ``available()`` is False without Triton or a GPU, or with
``MEGATRON_BERT_TRITON_EMBEDDING=0``; :func:`embedding` then is ``F.embedding``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..triton_support import tl, triton, usable

CHUNK = 64  # sorted positions per program of pass 1 (the eq tile is CHUNK × CHUNK)
BLOCK_H = 128  # columns per program
NUM_WARPS = 4
CARRY_AHEAD = 16  # chunks the carry pass reads at once


def available() -> bool:
    return usable("MEGATRON_BERT_TRITON_EMBEDDING")


if triton is not None:

    @triton.jit
    def _chunk_sums_kernel(ids_ptr, perm_ptr, grad_ptr, out_ptr, heads_ptr, tails_ptr, n_tokens, hidden,
                           CHUNK: tl.constexpr, BLOCK_H: tl.constexpr):
        c = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < hidden
        pos = c * CHUNK + tl.arange(0, CHUNK)
        ok = pos < n_tokens
        ids = tl.load(ids_ptr + pos, mask=ok, other=-1)  # [C]; -1 past the end matches nothing real
        after = tl.load(ids_ptr + pos + 1, mask=pos + 1 < n_tokens, other=-1)  # the next position's id
        before = tl.load(ids_ptr + c * CHUNK - 1, mask=c > 0, other=-1)  # the id just before the chunk
        rows = tl.load(perm_ptr + pos, mask=ok, other=0)
        vals = tl.load(grad_ptr + rows[:, None].to(tl.int64) * hidden + cols[None, :],
                       mask=ok[:, None] & col_ok[None, :], other=0.0)  # [C, BH]
        eq = (ids[:, None] == ids[None, :]).to(vals.dtype)  # [C, C]
        if vals.dtype == tl.float32:  # fp32 products (not TF32); fp32 grads exist on GPU, and in the checks
            sums = tl.dot(eq, vals, input_precision="ieee")
        else:
            sums = tl.dot(eq, vals)  # [C, BH]: each row its run's sum in the chunk, accumulated in fp32

        ends = ok & (ids != after)
        began_before = ids == before  # only the first run can equal the id before the chunk
        inside = ends & ~began_before
        tl.store(out_ptr + ids[:, None].to(tl.int64) * hidden + cols[None, :], sums.to(out_ptr.dtype.element_ty),
                 mask=inside[:, None] & col_ok[None, :])
        # The cut runs' sums: the first row's (a run from an earlier chunk: its owner adds this part) and
        # the last row's (a run that begins here and goes on: this chunk owns it), as masked stores of
        # the tile (a row taken out of it by a reduction cost ~500 shuffles and adds)
        r = tl.arange(0, CHUNK)
        last_row = tl.minimum(n_tokens - c * CHUNK, CHUNK) - 1
        first_id = tl.load(ids_ptr + c * CHUNK)
        last_id = tl.load(ids_ptr + c * CHUNK + last_row)
        next_id = tl.load(ids_ptr + c * CHUNK + CHUNK, mask=c * CHUNK + CHUNK < n_tokens, other=-1)
        head = (r == 0) & (first_id == before)
        tail = (r == last_row) & (last_id == next_id) & (last_id != before)
        at = c * hidden + cols[None, :] + 0 * r[:, None]
        tl.store(heads_ptr + at, sums, mask=head[:, None] & col_ok[None, :])
        tl.store(tails_ptr + at, sums, mask=tail[:, None] & col_ok[None, :])

    @triton.jit
    def _carry_kernel(ids_ptr, out_ptr, heads_ptr, tails_ptr, n_tokens, hidden, CHUNK: tl.constexpr,
                      BLOCK_H: tl.constexpr, AHEAD: tl.constexpr):
        c = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < hidden
        end = c * CHUNK + CHUNK  # the next chunk's first position
        if end < n_tokens:
            v = tl.load(ids_ptr + end - 1)
            before = tl.load(ids_ptr + c * CHUNK - 1, mask=c > 0, other=-1)
            if (tl.load(ids_ptr + end) == v) & (v != before):  # this chunk owns a cut run
                acc = tl.load(tails_ptr + c * hidden + cols, mask=col_ok, other=0.0)
                k = c + 1
                going = True
                while going:
                    # The next AHEAD chunks at once (a chunk-by-chunk walk, two dependent loads a step,
                    # took ~45 µs over the ~30 chunks of a [MASK] run): chunk k holds part of the run
                    # iff its first id is v, a prefix of them since the ids are sorted.
                    ks = k + tl.arange(0, AHEAD)
                    covered = tl.load(ids_ptr + ks * CHUNK, mask=ks * CHUNK < n_tokens, other=-1) == v
                    acc += tl.sum(tl.load(heads_ptr + ks[:, None] * hidden + cols[None, :],
                                          mask=covered[:, None] & col_ok[None, :], other=0.0), axis=0)
                    going = tl.sum(covered.to(tl.int32)) == AHEAD
                    k += AHEAD
                tl.store(out_ptr + v.to(tl.int64) * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def segment_sums(ids: torch.Tensor, grad: torch.Tensor, rows: int) -> torch.Tensor:
    """``[rows, h]`` with row v the sum of ``grad``'s rows ``t`` where ``ids[t] == v`` (ids ``[n]`` in
    ``[0, rows)``, grad ``[n, h]``), in grad's dtype, summed in fp32 in a fixed order."""
    n, hidden = grad.shape
    out = torch.zeros(rows, hidden, dtype=grad.dtype, device=grad.device)
    if n == 0:
        return out
    # stable: equal ids keep token order. 16-bit keys where the ids fit: half the radix passes
    key = torch.int16 if rows <= 2 ** 15 else torch.int32
    sorted_ids, perm = torch.sort(ids.to(key), stable=True)
    chunks = triton.cdiv(n, CHUNK)
    heads = torch.empty(chunks, hidden, dtype=torch.float32, device=grad.device)  # read only where written
    tails = torch.empty_like(heads)
    grid = (chunks, triton.cdiv(hidden, BLOCK_H))
    _chunk_sums_kernel[grid](sorted_ids, perm, grad, out, heads, tails, n, hidden, CHUNK=CHUNK, BLOCK_H=BLOCK_H,
                             num_warps=NUM_WARPS)
    _carry_kernel[grid](sorted_ids, out, heads, tails, n, hidden, CHUNK=CHUNK, BLOCK_H=BLOCK_H, AHEAD=CARRY_AHEAD,
                        num_warps=NUM_WARPS)
    return out


class _Lookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, weight):
        ctx.save_for_backward(ids)
        ctx.rows, ctx.dtype = weight.shape[0], weight.dtype
        return F.embedding(ids, weight)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1]).contiguous()
        return None, segment_sums(ids.reshape(-1), g, ctx.rows).to(ctx.dtype)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.embedding(ids, weight)`` whose backward is :func:`segment_sums` where it can run (a CUDA
    weight, Triton present), torch's own elsewhere."""
    if weight.requires_grad and torch.is_grad_enabled() and weight.is_cuda and available():
        return _Lookup.apply(ids, weight)
    return F.embedding(ids, weight)
