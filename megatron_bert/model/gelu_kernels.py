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

import os

import torch

from ..triton_support import column_sum, tl, triton, usable

# Q(t) = log2(erfcx(u) / t), t^0 first, for t = 1 / (1 + P·u): tools/fit_gelu_cdf.py --p 0.5 --degree 9
CDF_P = 0.5
CDF_Q = (-1.8257482, 1.44272772, 0.539748186, 0.139060058, -0.265413518, 0.391494557, -1.61743147,
         2.12548158, -1.17339178, 0.243472756)


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_GELU`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_GELU")


if triton is not None:
    # PTX inline assembly needs an NVIDIA target: not the Triton interpreter (the CPU checks), not ROCm
    _PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1" and torch.version.hip is None)
    _INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
    _HALF_LOG2E = tl.constexpr(0.5 * 1.4426950408889634)  # z²/2 · log2(e) = u² · log2(e)
    _P_OVER_SQRT2 = tl.constexpr(CDF_P * 0.7071067811865476)
    _Q0, _Q1, _Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9 = (tl.constexpr(c) for c in CDF_Q)

    @triton.jit
    def _normal_cdf_pdf(z):
        # Φ(z) and φ(z) of fp32 z (module docstring); the forward drops the unused φ.
        u2 = z * z * _HALF_LOG2E
        d = 1.0 + _P_OVER_SQRT2 * tl.abs(z)  # in [1, inf]: no range scaling needed
        if _PTX:  # one MUFU.RCP where `/` is div.full (range checks and scaling, ~6 instructions)
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

    # Tile shapes are timed on the device at first use (autotune, during the eager warm-up steps). With
    # the cheap CDF, 8-16 elements per thread beat 64 (3.4 vs 2.7 TB/s on H200, bench_kernels --gelu):
    # less unrolled code, more warps in flight.
    @triton.autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
                              for m, n, w in ((1, 1024, 4), (2, 512, 4), (2, 1024, 4), (2, 1024, 8), (4, 1024, 4),
                                              (4, 1024, 8), (8, 512, 4), (8, 1024, 4))],
                     key=["n_cols"])
    @triton.jit
    def _fwd_kernel(x_ptr, b_ptr, y_ptr, n_rows, n_cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # 2-D tiles: the bias is loaded once per column block, the rows stream past it
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        offs = rows[:, None] * n_cols + cols[None, :]
        b = tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        z = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32) + b[None, :]
        cdf, _ = _normal_cdf_pdf(z)
        y = z * cdf
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)

    _BWD_ROWS = 64  # rows per program: fixed, so the partial-sum buffer has one row per program

    # The best backward tile had 32 elements per thread per sub-block (3.3 TB/s); 16 are tried too.
    @triton.autotune(configs=[triton.Config({"SUB_M": m, "BLOCK_N": n}, num_warps=w)
                              for m, n, w in ((64, 32, 4), (32, 64, 4), (64, 64, 4), (64, 64, 8), (64, 128, 4),
                                              (64, 128, 8), (16, 512, 4))],
                     key=["n_cols"])
    @triton.jit
    def _bwd_kernel(g_ptr, x_ptr, b_ptr, dx_ptr, partial_ptr, n_rows, n_cols,
                    BLOCK_M: tl.constexpr, SUB_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # A program owns BLOCK_M rows × BLOCK_N columns and walks them SUB_M rows at a time, keeping
        # the bias grad's column sums in registers.
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        col_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r in tl.static_range(0, BLOCK_M, SUB_M):
            rows = pid_m.to(tl.int64) * BLOCK_M + r + tl.arange(0, SUB_M)
            inside = (rows[:, None] < n_rows) & col_ok[None, :]
            offs = rows[:, None] * n_cols + cols[None, :]
            g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            z = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32) + b[None, :]
            cdf, pdf = _normal_cdf_pdf(z)
            dz = g * (cdf + z * pdf)
            tl.store(dx_ptr + offs, dz.to(dx_ptr.dtype.element_ty), mask=inside)
            col_sum += tl.sum(dz, axis=0)  # masked-out elements loaded g = 0: they add nothing
        # One row of partial sums per program, summed afterwards in a fixed order: deterministic,
        # unlike atomics.
        tl.store(partial_ptr + pid_m * n_cols + cols, col_sum, mask=col_ok)


@torch.library.custom_op("megatron_bert::bias_gelu", mutates_args=())
def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu(x + bias) over the last dim of ``x`` (bias: ``[x.shape[-1]]``)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    n = x.shape[-1]
    rows = x.numel() // n
    _fwd_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))](x, bias, y, rows, n)
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
    blocks = triton.cdiv(rows, _BWD_ROWS)
    partial = torch.empty(blocks, n, dtype=torch.float32, device=x.device)  # fp32 column sums per row block
    _bwd_kernel[lambda meta: (blocks, triton.cdiv(n, meta["BLOCK_N"]))](grad, x, bias, dx, partial, rows, n,
                                                                        BLOCK_M=_BWD_ROWS)
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
