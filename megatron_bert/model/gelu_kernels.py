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
"""
from __future__ import annotations

import torch

from ..triton_support import column_sum, tl, triton, usable


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_GELU`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_GELU")


if triton is not None:
    _INV_SQRT2 = tl.constexpr(0.7071067811865476)
    _INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

    # Tile shapes are timed on the device at first use (autotune, during the eager warm-up steps).
    @triton.autotune(configs=[triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
                              for m, n, w in ((8, 1024, 4), (16, 512, 4), (16, 1024, 8), (32, 256, 4),
                                              (32, 512, 8), (64, 128, 4), (64, 256, 8), (128, 128, 8))],
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
        y = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)

    _BWD_ROWS = 64  # rows per program: fixed, so the partial-sum buffer has one row per program

    @triton.autotune(configs=[triton.Config({"SUB_M": m, "BLOCK_N": n}, num_warps=w)
                              for m, n, w in ((64, 64, 4), (64, 128, 4), (64, 256, 8), (32, 256, 4),
                                              (16, 512, 4), (32, 512, 8), (16, 1024, 8))],
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
            cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))
            dz = g * (cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI)
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
