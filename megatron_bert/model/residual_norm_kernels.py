"""A layer's residual epilogue and the LayerNorm that reads its result, as one Triton kernel each way (GPU).

In a pre-LN layer every residual sum is normalised next: ``h = r + dropout(y + b)`` then ``LN(h)``
(the post-attention LayerNorm, the next layer's input LayerNorm, or the final one). Done apart, that is
an epilogue kernel, a LayerNorm kernel, and in the backward the LayerNorm backward with its residual-grad
add, the masked grad of ``y``, the bias-grad column sum and the two column sums of the LayerNorm's
weight and bias grads: six passes and ~285 µs per layer for a ``[16384 × 1024]`` bf16 activation on
H200 (bench/NOTES.md, session 5). Here the forward reads ``y`` and ``r`` once and writes ``h``, the mask,
``LN(h)`` and the row statistics; the backward reads the grad of ``LN(h)``, the grad of ``h`` from the
residual path, ``h`` and the mask once and writes the grads of ``r`` and ``y``, folding the three column
sums into per-program partials (one more launch adds them up). Measured at 345M on H200: ~51 µs
forward (Philox-bound: ~17 of its ~51 instructions per element), ~49 µs backward + 4 µs of sums, ~207
µs per layer in all (BENCHMARKS.md, session 6).

Semantics are those of the unfused path: ``h`` is rounded to the activation dtype before it is
normalised (the residual stream is stored in bf16 either way), LayerNorm math is fp32 (two-pass
variance from registers), the grad of ``h`` is rounded once and the grad of ``y`` is that times
``keep / (1 - p)``. The mask is drawn in the kernel as dropout_kernels draws it — four elements per
Philox call, an element kept when the top 24 bits of its word are at or above ``round(p · 2^24)`` —
from ``seed`` (a device tensor, so CUDA-graph replays draw fresh masks); element ``(row, c + k·Q)`` takes
word ``k`` of counter ``row·Q + c``, ``Q`` a quarter of the row's power-of-two tile.

``available()`` is False without Triton or a GPU, or with ``MEGATRON_BERT_TRITON_RESIDUAL_NORM=0``;
the layer then runs the separate epilogue and LayerNorm kernels.
"""
from __future__ import annotations

import torch

from ..triton_support import column_sum, tl, triton, usable
from .dropout_kernels import drop_threshold
from .layernorm_kernels import _stats_shape

# backward programs (and partial-sum rows) per SM: 4 the fastest of 2, 4, 8, 16 on H200 (55.5 µs against
# 59-67, bench/bench_kernels.py --residual-norm)
_PROGRAMS_PER_SM = 4


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_RESIDUAL_NORM`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_RESIDUAL_NORM")


if triton is not None:

    @triton.jit
    def _residual_quarter(y_ptr, b_ptr, r_ptr, h_ptr, keep_ptr, rows, row_ok, cols, word, threshold, scale,
                          N_COLS: tl.constexpr):
        # One quarter of the rows' columns: h = r + (y + b)·keep·scale, rounded to h's dtype and stored
        # with the mask; returns the rounded h in fp32 (0 outside the tensor) for the LayerNorm.
        col_ok = cols < N_COLS
        inside = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N_COLS + cols[None, :]
        keep = (word >> 8).to(tl.int32) >= threshold
        y = tl.load(y_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        # the bias (and below the LayerNorm's weight and bias) loaded as full [ROWS, Q] tiles, rows
        # repeating (L1 hits): loaded 1-D or [1, Q] they took another layout, and shared memory and
        # barriers to meet the data's
        b = tl.load(b_ptr + offs - rows[:, None] * N_COLS, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        h = (r + tl.where(keep, (y + b) * scale, 0.0)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + offs, h, mask=inside)
        tl.store(keep_ptr + offs, keep, mask=inside)
        return tl.where(inside, h.to(tl.float32), 0.0)

    @triton.jit
    def _normed_quarter(ln_ptr, w_ptr, lb_ptr, h, mean, rstd, rows, row_ok, cols, N_COLS: tl.constexpr):
        inside = row_ok[:, None] & (cols < N_COLS)[None, :]
        cols2 = rows[:, None] * 0 + cols[None, :]
        w = tl.load(w_ptr + cols2, mask=inside, other=0.0).to(tl.float32)
        lb = tl.load(lb_ptr + cols2, mask=inside, other=0.0).to(tl.float32)
        out = (h - mean[:, None]) * rstd[:, None] * w + lb
        tl.store(ln_ptr + rows[:, None] * N_COLS + cols2, out.to(ln_ptr.dtype.element_ty), mask=inside)

    # Rows per program and warps are timed on the device at first use (the eager warm-up steps). With
    # ROWS = warps a thread holds 8 elements of each quarter row at Q = 256 (16-byte accesses) and the
    # kernel converts layouts only for the Philox words (nvdisasm of an sm90 build: 11 barriers, against
    # 27 at 16 elements per thread).
    @triton.autotune(configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in ((2, 2), (4, 4), (8, 8))],
                     key=["N_COLS", "DROP"])
    @triton.jit
    def _fwd_kernel(y_ptr, b_ptr, r_ptr, w_ptr, lb_ptr, h_ptr, keep_ptr, ln_ptr, mean_ptr, rstd_ptr, seed_ptr,
                    n_rows, threshold, salt, scale, eps, N_COLS: tl.constexpr, Q: tl.constexpr,
                    DROP: tl.constexpr, ROWS: tl.constexpr):
        pid = tl.program_id(0)
        rows32 = pid * ROWS + tl.arange(0, ROWS)  # int32 Philox counters (the host checks rows · Q < 2^31)
        rows = rows32.to(tl.int64)
        row_ok = rows < n_rows
        cols = tl.arange(0, Q)
        if DROP:
            seed = tl.load(seed_ptr) + salt
            w0, w1, w2, w3 = tl.randint4x(seed, rows32[:, None] * Q + cols[None, :])
        else:  # nothing dropped: every word passes threshold 0
            w0 = tl.zeros((ROWS, Q), dtype=tl.uint32)
            w1, w2, w3 = w0, w0, w0
        h0 = _residual_quarter(y_ptr, b_ptr, r_ptr, h_ptr, keep_ptr, rows, row_ok, cols, w0, threshold, scale, N_COLS)
        h1 = _residual_quarter(y_ptr, b_ptr, r_ptr, h_ptr, keep_ptr, rows, row_ok, cols + Q, w1, threshold, scale,
                               N_COLS)
        h2 = _residual_quarter(y_ptr, b_ptr, r_ptr, h_ptr, keep_ptr, rows, row_ok, cols + 2 * Q, w2, threshold,
                               scale, N_COLS)
        h3 = _residual_quarter(y_ptr, b_ptr, r_ptr, h_ptr, keep_ptr, rows, row_ok, cols + 3 * Q, w3, threshold,
                               scale, N_COLS)
        mean = (tl.sum(h0, axis=1) + tl.sum(h1, axis=1) + tl.sum(h2, axis=1) + tl.sum(h3, axis=1)) / N_COLS
        # two-pass variance; the columns past N_COLS hold 0 and must not count as (0 - mean)²
        c0 = tl.where(cols[None, :] < N_COLS, h0 - mean[:, None], 0.0)
        c1 = tl.where(cols[None, :] + Q < N_COLS, h1 - mean[:, None], 0.0)
        c2 = tl.where(cols[None, :] + 2 * Q < N_COLS, h2 - mean[:, None], 0.0)
        c3 = tl.where(cols[None, :] + 3 * Q < N_COLS, h3 - mean[:, None], 0.0)
        var = (tl.sum(c0 * c0, axis=1) + tl.sum(c1 * c1, axis=1) + tl.sum(c2 * c2, axis=1)
               + tl.sum(c3 * c3, axis=1)) / N_COLS
        rstd = 1.0 / tl.sqrt(var + eps)
        _normed_quarter(ln_ptr, w_ptr, lb_ptr, h0, mean, rstd, rows, row_ok, cols, N_COLS)
        _normed_quarter(ln_ptr, w_ptr, lb_ptr, h1, mean, rstd, rows, row_ok, cols + Q, N_COLS)
        _normed_quarter(ln_ptr, w_ptr, lb_ptr, h2, mean, rstd, rows, row_ok, cols + 2 * Q, N_COLS)
        _normed_quarter(ln_ptr, w_ptr, lb_ptr, h3, mean, rstd, rows, row_ok, cols + 3 * Q, N_COLS)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def _bwd_load(dln_ptr, dres_ptr, h_ptr, keep_ptr, mean_ptr, rstd_ptr, rows, row_ok, cols, col_ok,
                  N_COLS: tl.constexpr, HAS_DRES: tl.constexpr):
        # as stored (16-bit, bytes): the next block's values wait in half the registers
        inside = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N_COLS + cols[None, :]
        h = tl.load(h_ptr + offs, mask=inside, other=0.0)
        dln = tl.load(dln_ptr + offs, mask=inside, other=0.0)
        dres = tl.load(dres_ptr + offs, mask=inside, other=0.0) if HAS_DRES else tl.zeros(h.shape, h.dtype)
        keep = tl.load(keep_ptr + offs, mask=inside, other=0)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        return h, dln, dres, keep, mean, rstd

    # 4-8 elements per thread (ROWS · 1024 / threads): more, and the layout the row sums want differs
    # from the stores' (shared memory and barriers each block: 46 barriers at ROWS 2 on 4 warps, 12 at 1).
    @triton.autotune(configs=[triton.Config({"ROWS": r}, num_warps=w) for r, w in ((1, 4), (1, 8), (2, 8))],
                     key=["N_COLS", "HAS_DRES", "ROWS_PER_PROGRAM"])
    @triton.jit
    def _bwd_kernel(dln_ptr, dres_ptr, h_ptr, keep_ptr, mean_ptr, rstd_ptr, w_ptr, dx_ptr, dy_ptr, partial_ptr,
                    n_rows, scale, N_COLS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_DRES: tl.constexpr,
                    ROWS_PER_PROGRAM: tl.constexpr, ROWS: tl.constexpr):
        # Program pid walks rows [pid · ROWS_PER_PROGRAM, +ROWS_PER_PROGRAM) in blocks of ROWS (a
        # compile-time trip count), loading the next block before it works on this one (a loop of
        # load → row sums → store would leave one block's reads in flight per program); the column
        # sums of its rows go to partial[pid] = (Σ dLN·ĥ, Σ dLN, Σ dy), each [N_COLS] in fp32.
        pid = tl.program_id(0)
        first = pid.to(tl.int64) * ROWS_PER_PROGRAM
        end = tl.minimum(first + ROWS_PER_PROGRAM, n_rows)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N_COLS
        w = tl.load(w_ptr + cols[None, :], mask=col_ok[None, :], other=0.0).to(tl.float32)
        # column sums kept per row slot and folded once at the end: an axis-0 sum per block would
        # cross warps (shared memory and a barrier) three times per block
        acc_w = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        acc_b = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        acc_y = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        rows = first + tl.arange(0, ROWS)
        h_n, dln_n, dres_n, keep_n, mean_n, rstd_n = _bwd_load(
            dln_ptr, dres_ptr, h_ptr, keep_ptr, mean_ptr, rstd_ptr, rows, rows < end, cols, col_ok, N_COLS, HAS_DRES)
        for r0 in range(0, ROWS_PER_PROGRAM, ROWS):
            rows = first + r0 + tl.arange(0, ROWS)
            row_ok = rows < end
            h, dln, dres = h_n.to(tl.float32), dln_n.to(tl.float32), dres_n.to(tl.float32)
            keep, mean, rstd = keep_n, mean_n, rstd_n
            h_n, dln_n, dres_n, keep_n, mean_n, rstd_n = _bwd_load(
                dln_ptr, dres_ptr, h_ptr, keep_ptr, mean_ptr, rstd_ptr, rows + ROWS, rows + ROWS < end, cols, col_ok,
                N_COLS, HAS_DRES)
            inside = row_ok[:, None] & col_ok[None, :]
            offs = rows[:, None] * N_COLS + cols[None, :]
            xhat = tl.where(inside, (h - mean[:, None]) * rstd[:, None], 0.0)
            g = dln * w
            mean_g = tl.sum(g, axis=1) / N_COLS
            mean_gx = tl.sum(g * xhat, axis=1) / N_COLS
            dx = (rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None]) + dres).to(dx_ptr.dtype.element_ty)
            tl.store(dx_ptr + offs, dx, mask=inside)
            dy = tl.where(keep != 0, dx.to(tl.float32) * scale, 0.0).to(dy_ptr.dtype.element_ty)
            tl.store(dy_ptr + offs, dy, mask=inside)
            acc_w += dln * xhat
            acc_b += dln
            acc_y += dy.to(tl.float32)
        base = partial_ptr + pid.to(tl.int64) * (3 * N_COLS) + cols
        tl.store(base, tl.sum(acc_w, axis=0), mask=col_ok)
        tl.store(base + N_COLS, tl.sum(acc_b, axis=0), mask=col_ok)
        tl.store(base + 2 * N_COLS, tl.sum(acc_y, axis=0), mask=col_ok)


@torch.library.custom_op("megatron_bert::residual_norm", mutates_args=())
def residual_norm_with_stats(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, seed: torch.Tensor,
                             p: float, salt: int, weight: torch.Tensor, norm_bias: torch.Tensor, eps: float
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h = residual + dropout_p(y + bias)`` and ``LayerNorm(h; weight, norm_bias, eps)`` over the last
    dim: → (h, normed, keep, fp32 mean, fp32 1/std), the statistics ``[..., 1]``. ``p = 0``: nothing
    dropped (``seed`` unread)."""
    y, residual = y.contiguous(), residual.contiguous()
    n = y.shape[-1]
    rows = y.numel() // n
    q = max(triton.next_power_of_2(n) // 4, 1)
    if rows * q >= 2**31:
        raise ValueError(f"residual_norm: {rows} rows of {n} exceed the kernel's 32-bit Philox counters")
    h, normed = torch.empty_like(y), torch.empty_like(y)
    keep = torch.empty(y.shape, dtype=torch.bool, device=y.device)
    mean = torch.empty(_stats_shape(y), dtype=torch.float32, device=y.device)
    rstd = torch.empty_like(mean)
    if rows:
        _fwd_kernel[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](
            y, bias, residual, weight, norm_bias, h, keep.view(torch.int8), normed, mean, rstd, seed, rows,
            drop_threshold(p), salt, 1.0 / (1.0 - p), eps, N_COLS=n, Q=q, DROP=p > 0)
    return h, normed, keep, mean, rstd


@residual_norm_with_stats.register_fake
def _(y, bias, residual, seed, p, salt, weight, norm_bias, eps):
    mean = y.new_empty(_stats_shape(y), dtype=torch.float32)
    return (torch.empty_like(y), torch.empty_like(y), torch.empty(y.shape, dtype=torch.bool, device=y.device),
            mean, torch.empty_like(mean))


def _programs(device: torch.device, rows: int) -> int:
    return max(1, min(rows, _PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count))


@torch.library.custom_op("megatron_bert::residual_norm_backward", mutates_args=())
def residual_norm_backward(grad_normed: torch.Tensor, grad_h: torch.Tensor | None, h: torch.Tensor,
                           keep: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor,
                           p: float, sums_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (grad of h: ``grad_h`` plus the LayerNorm's backward, that times ``keep / (1 - p)``, and the
    column sums ``[3, n]`` of the grads of the LayerNorm's weight and bias and of the epilogue's bias)."""
    grad_normed = grad_normed.contiguous()
    n = h.shape[-1]
    rows = h.numel() // n
    dh, dy = torch.empty_like(h), torch.empty_like(h)
    programs = _programs(h.device, rows) if h.is_cuda else max(1, min(rows, 8))
    per_program = triton.cdiv(max(rows, 1), programs)
    programs = triton.cdiv(max(rows, 1), per_program)  # no program without rows
    partial = torch.empty(programs, 3 * n, dtype=torch.float32, device=h.device)
    if rows:
        _bwd_kernel[(programs,)](
            grad_normed, grad_h.contiguous() if grad_h is not None else grad_normed, h, keep.view(torch.int8), mean,
            rstd, weight,
            dh, dy, partial, rows, 1.0 / (1.0 - p), N_COLS=n, BLOCK_N=triton.next_power_of_2(n),
            HAS_DRES=grad_h is not None, ROWS_PER_PROGRAM=per_program)
    else:
        partial.zero_()
    return dh, dy, column_sum(partial, sums_dtype).view(3, n)


@residual_norm_backward.register_fake
def _(grad_normed, grad_h, h, keep, mean, rstd, weight, p, sums_dtype):
    return torch.empty_like(h), torch.empty_like(h), h.new_empty((3, h.shape[-1]), dtype=sums_dtype)


def _setup_context(ctx, inputs, output):
    _, bias, _, _, p, _, weight, _, _ = inputs
    h, _, keep, mean, rstd = output
    ctx.mark_non_differentiable(keep, mean, rstd)
    ctx.p, ctx.bias_dtype = p, bias.dtype
    ctx.save_for_backward(h, keep, mean, rstd, weight)


def _backward(ctx, grad_h, grad_normed, _grad_keep, _grad_mean, _grad_rstd):
    h, keep, mean, rstd, weight = ctx.saved_tensors
    if grad_normed is None:
        grad_normed = torch.zeros_like(h)
    same = weight.dtype == ctx.bias_dtype  # the usual case: the sums are written in the parameters' dtype
    dh, dy, sums = residual_norm_backward(grad_normed, grad_h, h, keep, mean, rstd, weight, ctx.p,
                                          weight.dtype if same else torch.float32)
    dw, dnb, db = sums.unbind(0)
    if not same:
        dw, dnb, db = dw.to(weight.dtype), dnb.to(weight.dtype), db.to(ctx.bias_dtype)
    return dy, db, dh, None, None, None, dw, dnb, None


residual_norm_with_stats.register_autograd(_backward, setup_context=_setup_context)


def residual_norm(y: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, seed: torch.Tensor, p: float,
                  salt: int, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                  eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, LayerNorm(h))`` for ``h = residual + dropout_p(y + bias)``, the mask drawn from ``seed``
    (one int64 on the device: DropoutContext.kernel_seed), the LayerNorm affine over the last dim."""
    h, normed, _, _, _ = residual_norm_with_stats(y, bias, residual, seed, p, salt, norm_weight, norm_bias, eps)
    return h, normed
