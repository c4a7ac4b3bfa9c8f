"""The attention backward kernels (Triton, GPU) and the tile readers the forward shares with them.

    dv = (P ⊙ Z)ᵀ do,  dP = (do vᵀ) ⊙ Z,  dS = P ⊙ (dP − δ),  δ = rowsum(do ⊙ out)
    dq = dS k / √d,  dk = dSᵀ q / √d

Two kernels (attention_kernels.py has the forward and the layouts): one program per block of query
rows for dq (it computes δ for its rows and runs first), one per block of key rows for dk and dv, in
transposed tiles [keys, queries]. Both recompute q kᵀ and do vᵀ, so a block pair costs seven tile
products, not five; the five-product way, one program per (sample, head) adding dq up in an fp32
scratch (deterministic, unlike atomic adds), was measured 21% slower at seq 512 on H200 (bench/NOTES.md,
session 13) and is not kept.

The bias-grad partial sums: one row per (PARTIAL_ROWS positions, sample); each block writes all of
its rows (the sum in the first, zeros in the rest), so the buffer needs no zero-fill and an autotune
candidate with other blocks leaves nothing behind.
"""
from __future__ import annotations

import torch

from ..triton_support import tl, triton, tuned

PARTIAL_ROWS = 64


def bias_partials(s: int, b: int, width: int, device: torch.device) -> torch.Tensor:
    """The backward's bias-grad partial-sum buffer (uninitialised: every row gets written)."""
    return torch.empty(-(-s // PARTIAL_ROWS) * b, width, dtype=torch.float32, device=device)


def _bwd_configs():
    # Blocks are multiples of PARTIAL_ROWS (the bias-grad partial sums' row granularity).
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
            for m, n, w, st in ((64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2))]


if triton is not None:
    from .drop_mask_kernels import drop_tile, drop_tile_t, zero_dropped

    _PARTIAL_ROWS = tl.constexpr(PARTIAL_ROWS)

    @triton.jit
    def _store_bias_partials(db_ptr, block, batch, b, heads, h, d, sums, GROUP: tl.constexpr, BLOCK: tl.constexpr,
                             S: tl.constexpr, HEAD_DIM: tl.constexpr):
        # Block `block` (BLOCK positions) of sample b, head h: its column sums of q, k or v (GROUP 0, 1,
        # 2) into the first of its BLOCK / PARTIAL_ROWS rows of the partial sums, zeros into the others.
        SUB: tl.constexpr = BLOCK // _PARTIAL_ROWS
        tl.static_assert(SUB * _PARTIAL_ROWS == BLOCK, "attention backward blocks must be multiples of PARTIAL_ROWS")
        n_rows = (S + _PARTIAL_ROWS - 1) // _PARTIAL_ROWS
        col = h * 3 * HEAD_DIM + GROUP * HEAD_DIM + d
        for j in tl.static_range(SUB):
            r = block * SUB + j
            ptr = db_ptr + (r * batch + b).to(tl.int64) * (heads * 3 * HEAD_DIM) + col
            # the row test broadcast through a where: Triton 3.9's interpreter rejects `(d >= 0) & scalar`
            tl.store(ptr, sums if j == 0 else tl.zeros_like(sums), mask=d < tl.where(r < n_rows, HEAD_DIM, 0))

    @triton.jit
    def _head_tile(ptr, base, pos, pos_ok, s_s, d):
        # One head's [positions, HEAD_DIM] tile of q, k or v in the packed projection (zeros past the end).
        return tl.load(ptr + base + pos[:, None] * s_s + d[None, :], mask=pos_ok[:, None], other=0.0)

    @triton.jit
    def _in_range(pos, N: tl.constexpr, BLOCK: tl.constexpr):
        # pos < N, as a constant True where blocks of BLOCK tile N exactly: the masks of the loads and the
        # key selects that take it fold away (in the dk/dv loop, 32 FSELs a block pair on the scores and
        # 16 on the log-sum-exp).
        ok = pos < N
        if N % BLOCK == 0:
            ok = tl.full(pos.shape, True, tl.int1)
        return ok

    @triton.jit
    def _valid_keys(kv_ptr, b, cols, col_ok, S_K: tl.constexpr, KEY_MASK: tl.constexpr):
        # Keys inside the sequence and, with a key-padding mask, not padding.
        valid = col_ok
        if KEY_MASK:
            valid = valid & (tl.load(kv_ptr + b * S_K + cols, mask=col_ok, other=0) != 0)
        return valid

    _BWD_KEY = ["S_Q", "S_K", "HEAD_DIM", "DROPOUT", "KEY_MASK", "BIAS_GRAD", "batch", "heads"]

    @tuned(_bwd_configs(), key=_BWD_KEY)
    @triton.jit
    def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, bits_ptr, kv_ptr, db_ptr,
                       s_s, s_b, s_h, o_s, o_b, o_h, heads, batch, n_rows, qk_scale, sm_scale, keep_scale,
                       S_Q: tl.constexpr, S_K: tl.constexpr, HEAD_DIM: tl.constexpr, WORDS: tl.constexpr,
                       DROPOUT: tl.constexpr, KEY_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Block of query rows: δ = rowsum(do ⊙ out) (stored for the dk/dv kernel), then dq over all keys.
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        row_ok = _in_range(rows, S_Q, BLOCK_M)
        base = b.to(tl.int64) * s_b + h * s_h
        obase = b.to(tl.int64) * o_b + h * o_h + rows[:, None] * o_s + d[None, :]
        q = _head_tile(q_ptr, base, rows, row_ok, s_s, d)
        do = tl.load(do_ptr + obase, mask=row_ok[:, None], other=0.0)
        o = tl.load(o_ptr + obase, mask=row_ok[:, None], other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        tl.store(delta_ptr + bh.to(tl.int64) * S_Q + rows, delta, mask=row_ok)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * S_Q + rows, mask=row_ok, other=float("inf"))
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        bits = bits_ptr + bh.to(tl.int64) * S_Q  # word-major: [WORDS, b · heads · S_Q]
        for start_n in range(0, S_K, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = _in_range(cols, S_K, BLOCK_N)
            k = _head_tile(k_ptr, base, cols, col_ok, s_s, d)
            v = _head_tile(v_ptr, base, cols, col_ok, s_s, d)
            p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])
            p = tl.where(_valid_keys(kv_ptr, b, cols, col_ok, S_K, KEY_MASK)[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))  # d(P ⊙ Z)
            if DROPOUT:  # dP = d(P ⊙ Z) ⊙ Z, the scale folded into the subtraction (one FFMA)
                dp = zero_dropped(dp, drop_tile(bits, n_rows, rows, start_n, row_ok, BLOCK_M, BLOCK_N, WORDS))
                ds = p * (dp * keep_scale - delta[:, None])
            else:
                ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        dq = dq * sm_scale
        tl.store(dq_ptr + base + rows[:, None] * s_s + d[None, :], dq.to(dq_ptr.dtype.element_ty), mask=row_ok[:, None])
        if BIAS_GRAD:  # this block's rows of the q columns' bias grad (rows past S_Q hold zeros)
            _store_bias_partials(db_ptr, pid_m, batch, b, heads, h, d, tl.sum(dq, axis=0), 0, BLOCK_M, S_Q, HEAD_DIM)

    @tuned(_bwd_configs(), key=_BWD_KEY)
    @triton.jit
    def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, bits_ptr, kv_ptr, db_ptr,
                         s_s, s_b, s_h, o_s, o_b, o_h, heads, batch, n_rows, qk_scale, sm_scale, keep_scale,
                         S_Q: tl.constexpr, S_K: tl.constexpr, HEAD_DIM: tl.constexpr, WORDS: tl.constexpr,
                         DROPOUT: tl.constexpr, KEY_MASK: tl.constexpr, BIAS_GRAD: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Block of key rows (BLOCK_N of them): dk, dv over all queries, in transposed tiles [keys, queries].
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // heads, bh % heads
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions
        d = tl.arange(0, HEAD_DIM)
        col_ok = _in_range(cols, S_K, BLOCK_N)
        base = b.to(tl.int64) * s_b + h * s_h
        k = _head_tile(k_ptr, base, cols, col_ok, s_s, d)
        v = _head_tile(v_ptr, base, cols, col_ok, s_s, d)
        valid = _valid_keys(kv_ptr, b, cols, col_ok, S_K, KEY_MASK)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        bits = bits_ptr + bh.to(tl.int64) * S_Q  # word-major: [WORDS, b · heads · S_Q]
        for start_m in range(0, S_Q, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = _in_range(rows, S_Q, BLOCK_M)
            q = _head_tile(q_ptr, base, rows, row_ok, s_s, d)
            do = tl.load(do_ptr + b.to(tl.int64) * o_b + h * o_h + rows[:, None] * o_s + d[None, :],
                         mask=row_ok[:, None], other=0.0)
            lse = tl.load(lse_ptr + bh.to(tl.int64) * S_Q + rows, mask=row_ok, other=float("inf"))
            delta = tl.load(delta_ptr + bh.to(tl.int64) * S_Q + rows, mask=row_ok, other=0.0)
            pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # [keys, queries]
            pt = tl.where(valid[:, None], pt, 0.0)
            dpt = tl.dot(v, tl.trans(do))  # d(P ⊙ Z)ᵀ
            if DROPOUT:
                drop = drop_tile_t(bits, n_rows, rows, pid_n * BLOCK_N, row_ok, BLOCK_M, BLOCK_N, WORDS)
                dv += tl.dot(zero_dropped(pt, drop).to(do.dtype), do)  # scaled by 1 / (1 - p) once, below
                dst = pt * (zero_dropped(dpt, drop) * keep_scale - delta[None, :])
            else:
                dv += tl.dot(pt.to(do.dtype), do)
                dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q)
        dk = dk * sm_scale
        if DROPOUT:
            dv = dv * keep_scale
        tl.store(dk_ptr + base + cols[:, None] * s_s + d[None, :], dk.to(dk_ptr.dtype.element_ty), mask=col_ok[:, None])
        tl.store(dv_ptr + base + cols[:, None] * s_s + d[None, :], dv.to(dv_ptr.dtype.element_ty), mask=col_ok[:, None])
        if BIAS_GRAD:
            _store_bias_partials(db_ptr, pid_n, batch, b, heads, h, d, tl.sum(dk, axis=0), 1, BLOCK_N, S_K, HEAD_DIM)
            _store_bias_partials(db_ptr, pid_n, batch, b, heads, h, d, tl.sum(dv, axis=0), 2, BLOCK_N, S_K, HEAD_DIM)


def backward(q, k, v, out4, dout4, lse, bits, kv, partial, dq, dk, dv, heads: int, b: int, scalars: tuple,
             consts: dict) -> None:
    """Write dq, dk, dv (views into the packed gradient) and the bias-grad partials (``partial``, or a
    placeholder without ``BIAS_GRAD``). ``scalars``: (qk_scale, sm_scale, keep_scale)."""
    s = consts["S_Q"]
    delta = torch.empty_like(lse)
    args = (q.stride(0), q.stride(1), q.stride(2), out4.stride(0), out4.stride(1), out4.stride(2), heads, b,
            b * heads * s, *scalars)
    _bwd_dq_kernel[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), b * heads)](
        q, k, v, out4, dout4, lse, delta, dq, bits, kv, partial, *args, **consts)
    _bwd_dkdv_kernel[lambda meta: (triton.cdiv(s, meta["BLOCK_N"]), b * heads)](
        q, k, v, dout4, lse, delta, dk, dv, bits, kv, partial, *args, **consts)
