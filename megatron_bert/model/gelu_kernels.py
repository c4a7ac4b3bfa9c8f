"""bias + GeLU (erf) for the MLP's first projection, as one Triton kernel each way (GPU).

Forward ``y = gelu(x + b)`` reads ``x`` once and writes ``y``; backward reads the incoming grad and
``x`` once, writes ``dx`` and folds the bias grad (a sum over rows) into the same pass as per-block
partial sums. Inductor, left to itself, computes the GeLU derivative twice (once for ``dx``, once
inside a separate bias-grad reduction) and the step spends ~7 ms of 96 there (bench/NOTES.md).

Registered as custom ops with their autograd formula, so torch.compile treats them as opaque kernels
inside a compiled layer and CUDA graphs capture them like any other launch. Math is fp32 (no rounding
of ``x + b`` before the activation, as in Inductor's fused kernel); outputs take the input dtype.
``available()`` is False without Triton or a GPU (or with ``MEGATRON_BERT_TRITON_GELU=0``); callers
then use plain torch.

The normal CDF is not libdevice's erf: that one branches between two polynomials per element and made
both kernels compute-bound (~37 and ~52 instructions per element on sm90, ~2.4 TB/s). Instead
``Φ(-|z|) = erfc(u)/2 = t/2 · 2^(Q(t) - u²·log2 e)`` with ``u = |z|/√2``, ``t = 1/(1 + P·u)`` and a
degree-9 polynomial ``Q`` fitted by tools/fit_gelu_cdf.py: one reciprocal, one Horner chain and one
exp2, no branch, relative error ~1.6e-6 for |z| ≤ 4 in fp32 (the erf form ``1 + erf(z/√2)`` loses
up to 1e-3 of Φ there to cancellation), far below bf16's 4e-3 rounding step.
"""
from __future__ import annotations

import torch

from ..triton_support import PTX, column_sum, tl, triton, usable

# Q(t) = log2(erfcx(u) / t), t^0 first, for t = 1 / (1 + P·u): tools/fit_gelu_cdf.py --p 0.5 --degree 9
CDF_P = 0.5
CDF_Q = (-1.8257482, 1.44272772, 0.539748186, 0.139060058, -0.265413518, 0.391494557, -1.61743147,
         2.12548158, -1.17339178, 0.243472756)


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_GELU`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_GELU")


if triton is not None:
    _INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
    _HALF_LOG2E = tl.constexpr(0.5 * 1.4426950408889634)  # z²/2 · log2(e) = u² · log2(e)
    _P_OVER_SQRT2 = tl.constexpr(CDF_P * 0.7071067811865476)
    _Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9 = (tl.constexpr(c) for c in CDF_Q)

    @triton.jit
    def _normal_cdf_pdf(z):
        # Φ(z) and φ(z) of fp32 z (module docstring); the forward drops the unused φ.
        u2 = z * z * _HALF_LOG2E
        d = 1.0 + _P_OVER_SQRT2 * tl.abs(z)  # in [1, inf]: no range scaling needed
        if PTX:  # one MUFU.RCP where `/` is div.full (range checks and scaling, ~6 instructions)
            t = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [d], dtype=tl.float32,
                                          is_pure=True, pack=1)
        else:
            t = 1.0 / d
        q = _Q9 * t + _Q8
        q = q * t + _Q7
        q = q * t + _Q6
        q = q * t + _Q5
        q = q * t + _Q4
        q = q * t + _Q3
        q = q * t + _Q2
        q = q * t + _Q1
        q = q * t + (_Q0 - 1.0)  # the -1 is erfc's 1/2
        tail = t * tl.exp2(q - u2)  # Φ(-|z|)
        cdf = tl.where(z >= 0.0, 1.0 - tail, tail)
        return cdf, tl.exp2(-u2) * _INV_SQRT_2PI

    # A program walks ROWS_PER_PROGRAM rows of one BLOCK_N-column strip, SUB_M rows at a time, the next
    # sub-block's loads issued before the current one is computed (in registers). The bias is loaded
    # once per program with the tile's own shape: a 1-D vector broadcast over the tile is converted
    # through shared memory. Tile shapes are timed on the device at first use (autotune, during the
    # eager warm-up steps). On H200 (bench_kernels --gelu, session 7) the forward was fastest as
    # one-shot 2 × 1024 tiles (74 µs, from 78 with the vector bias; walking 128 rows: 78), the
    # backward walking 128 rows in 2 × 512 sub-blocks (109 µs = 3.7 TB/s, from 121 for one-shot
    # 64 × 64 tiles).
    _ROWS_PER_PROGRAM = 128  # the backward's, fixed: its partial-sum buffer has one row per program

    @triton.jit
    def _load_tile(ptr, rows, cols, end, n_cols):
        # [rows, cols] of a row-major [*, n_cols] tensor; rows from `end` on and columns past the last
        # read as 0 (and move no memory)
        inside = (rows[:, None] < end) & (cols[None, :] < n_cols)
        return tl.load(ptr + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0)

    # The forward's row count per program is tuned too (it leaves no partial sums): one-shot tiles
    # (ROWS_PER_PROGRAM = SUB_M) and one row walk.
    @triton.autotune(configs=[triton.Config({"ROWS_PER_PROGRAM": r, "SUB_M": m, "BLOCK_N": n}, num_warps=w)
                              for r, m, n, w in ((2, 2, 1024, 4), (1, 1, 1024, 4), (4, 4, 1024, 4), (4, 4, 1024, 8),
                                                 (4, 4, 512, 4), (8, 8, 512, 4), (2, 2, 1024, 8), (128, 4, 512, 4))],
                     key=["n_cols"])
    @triton.jit
    def _fwd_kernel(x_ptr, b_ptr, y_ptr, n_rows, n_cols, ROWS_PER_PROGRAM: tl.constexpr, SUB_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        first = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
        end = tl.minimum(first + ROWS_PER_PROGRAM, n_rows)
        sub = tl.arange(0, SUB_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        b = _load_tile(b_ptr, sub * 0, cols, 1, n_cols).to(tl.float32)  # [SUB_M, BLOCK_N], rows repeating
        x_next = _load_tile(x_ptr, first + sub, cols, end, n_cols)
        for r0 in range(0, ROWS_PER_PROGRAM, SUB_M):
            rows = first + r0 + sub
            x = x_next
            x_next = _load_tile(x_ptr, rows + SUB_M, cols, end, n_cols)
            z = x.to(tl.float32) + b
            cdf, _ = _normal_cdf_pdf(z)
            inside = (rows[:, None] < end) & (cols[None, :] < n_cols)
            tl.store(y_ptr + rows[:, None] * n_cols + cols[None, :], (z * cdf).to(y_ptr.dtype.element_ty),
                     mask=inside)

    @triton.autotune(configs=[triton.Config({"SUB_M": m, "BLOCK_N": n}, num_warps=w)
                              for m, n, w in ((4, 512, 4), (2, 512, 4), (4, 256, 4), (2, 1024, 4), (2, 1024, 8),
                                              (8, 256, 4), (16, 128, 4), (8, 128, 4))],
                     key=["n_cols"])
    @triton.jit
    def _bwd_kernel(g_ptr, x_ptr, b_ptr, dx_ptr, partial_ptr, n_rows, n_cols, ROWS_PER_PROGRAM: tl.constexpr,
                    SUB_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # dx = g · (Φ(z) + z φ(z)), z = x + b, and the bias grad's column sums of dx over the program's
        # rows, kept per row slot in registers and folded across rows once at the end (an axis-0 sum
        # per sub-block would cross warps through shared memory every time).
        pid_m = tl.program_id(0)
        first = pid_m.to(tl.int64) * ROWS_PER_PROGRAM
        end = tl.minimum(first + ROWS_PER_PROGRAM, n_rows)
        sub = tl.arange(0, SUB_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        b = _load_tile(b_ptr, sub * 0, cols, 1, n_cols).to(tl.float32)
        acc = tl.zeros((SUB_M, BLOCK_N), dtype=tl.float32)
        g_next = _load_tile(g_ptr, first + sub, cols, end, n_cols)
        x_next = _load_tile(x_ptr, first + sub, cols, end, n_cols)
        for r0 in range(0, ROWS_PER_PROGRAM, SUB_M):
            rows = first + r0 + sub
            g, x = g_next, x_next
            g_next = _load_tile(g_ptr, rows + SUB_M, cols, end, n_cols)
            x_next = _load_tile(x_ptr, rows + SUB_M, cols, end, n_cols)
            z = x.to(tl.float32) + b
            cdf, pdf = _normal_cdf_pdf(z)
            dz = g.to(tl.float32) * (cdf + z * pdf)  # rows past the end loaded g = 0: they add nothing
            inside = (rows[:, None] < end) & (cols[None, :] < n_cols)
            tl.store(dx_ptr + rows[:, None] * n_cols + cols[None, :], dz.to(dx_ptr.dtype.element_ty), mask=inside)
            acc += dz
        # One row of partial sums per program, summed afterwards in a fixed order: deterministic,
        # unlike atomics.
        tl.store(partial_ptr + pid_m * n_cols + cols, tl.sum(acc, axis=0), mask=cols < n_cols)


@torch.library.custom_op("megatron_bert::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) over the last dim of ``x`` (bias: ``[x.shape[-1]]``)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // n
    if rows:
        _fwd_kernel[lambda meta: (triton.cdiv(rows, meta["ROWS_PER_PROGRAM"]), triton.cdiv(n, meta["BLOCK_N"]))](
            x, bias, y, rows, n)
    return y


@bias_gelu.register_fake
def _(x, bias):
    return torch.empty_like(x)


@torch.library.custom_op("megatron_bert::bias_gelu_backward", mutates_args=())
def bias_gelu_backward(grad: torch.Tensor, x: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    grad, x = grad.contiguous(), x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    dx = torch.empty_like(x)
    blocks = max(triton.cdiv(rows, _ROWS_PER_PROGRAM), 1)
    # fp32 column sums per row block; every program writes its whole row
    partial = (torch.empty if rows else torch.zeros)(blocks, n, dtype=torch.float32, device=x.device)
    if rows:
        _bwd_kernel[lambda meta: (blocks, triton.cdiv(n, meta["BLOCK_N"]))](
            grad, x, bias, dx, partial, rows, n, ROWS_PER_PROGRAM=_ROWS_PER_PROGRAM)
    return dx, column_sum(partial, bias.dtype)


@bias_gelu_backward.register_fake
def _(grad, x, bias):
    return torch.empty_like(x), torch.empty_like(bias)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, bias = ctx.saved_tensors
    return bias_gelu_backward(grad, x, bias)


bias_gelu.register_autograd(_backward, setup_context=_setup_context)
