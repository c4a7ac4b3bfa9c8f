"""LayerNorm forward as one Triton kernel (GPU); its backward is torch's, fused by Inductor.

Inside the compiled layer halves, Inductor's multi-kernel reductions pick at run time between a
persistent LayerNorm forward (18.9 µs for a ``[16384 × 1024]`` bf16 activation on H200) and a looped
one that reads the input twice (31.5 µs): same code, the looped one ran in session 5's first call
(bench/NOTES.md). Here a program holds whole rows in registers, always: one read, one write, and the fp32
mean and 1/std per row that the backward needs (18.5–19 µs).

Registered as a custom op whose autograd formula calls ``aten.native_layer_norm_backward`` with the
saved statistics: compiled, AOTAutograd traces that formula and Inductor fuses it with its
neighbours (the residual-grad add) as it did before; eager, it is torch's CUDA kernel. Math in fp32
(two-pass variance from registers), output in the input's dtype: the function of ``nn.LayerNorm``
and apex's FusedLayerNorm. ``available()`` is False without Triton or a GPU, or with
``MEGATRON_BERT_TRITON_LN=0``.
"""
from __future__ import annotations

import torch

from ..triton_support import tl, triton, usable


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_LN`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_LN")


if triton is not None:

    # Rows per program and warps are timed on the device at first use (the eager warm-up steps).
    @triton.autotune(configs=[triton.Config({"ROWS": r}, num_warps=w)
                              for r, w in ((1, 4), (2, 4), (4, 4), (4, 8), (8, 8), (16, 8))],
                     key=["N_COLS"])
    @triton.jit
    def _layer_norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, eps, N_COLS: tl.constexpr,
                    BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        row_ok, col_ok = rows < n_rows, cols < N_COLS
        inside = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * N_COLS + cols[None, :]
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / N_COLS
        centred = tl.where(inside, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / N_COLS + eps)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = centred * rstd[:, None] * w[None, :] + b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=inside)
        tl.store(mean_ptr + rows, mean, mask=row_ok)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)


def _stats_shape(x: torch.Tensor) -> tuple:
    return (*x.shape[:-1], 1)  # as aten.native_layer_norm returns them (its backward broadcasts them)


@torch.library.custom_op("megatron_bert::layer_norm", mutates_args=())
def layer_norm_with_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of ``x``: (output, fp32 mean, fp32 1/std), the last two ``[..., 1]``."""
    x = x.contiguous()
    n = x.shape[-1]
    rows = x.numel() // n
    y = torch.empty_like(x)
    mean = torch.empty(_stats_shape(x), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    _layer_norm_fwd_kernel[lambda meta: (triton.cdiv(rows, meta["ROWS"]),)](
        x, weight, bias, y, mean, rstd, rows, eps, N_COLS=n, BLOCK_N=triton.next_power_of_2(n))
    return y, mean, rstd


@layer_norm_with_stats.register_fake
def _(x, weight, bias, eps):
    mean = x.new_empty(_stats_shape(x), dtype=torch.float32)
    return torch.empty_like(x), mean, torch.empty_like(mean)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, bias, mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.aten.native_layer_norm_backward(
        grad_y, x, [x.shape[-1]], mean, rstd, weight, bias, list(ctx.needs_input_grad[:3]))
    return dx, dw, db, None


layer_norm_with_stats.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """``norm(x)`` for an affine ``nn.LayerNorm`` (or apex FusedLayerNorm) over the last dim, by the kernel."""
    return layer_norm_with_stats(x, norm.weight, norm.bias, norm.eps)[0]
