"""Triton where it is installed (it is not a dependency) and a GPU to run its kernels on.

``triton`` and ``tl`` are None on CPU-only installs: kernel modules define their kernels under
``if triton is not None``. ``usable(switch)`` says whether the kernels can run, and with a
``switch`` (an environment variable) whether the user left them on: ``switch=0`` turns them off for
A/B runs. ``column_sum`` adds per-block partial sums, the second half of the bias-grad reductions
that the GeLU and QKV backward kernels fold into their passes. ``tuned`` is ``triton.autotune`` that
keeps one candidate in Triton's interpreter (which cannot time them). ``PTX`` (a constexpr) says
whether kernels may use inline PTX: not in the interpreter (the CPU checks), not on ROCm.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = tl = None

_SUM_COLS = 16  # columns per program of column_sum
_SUM_ROWS = 256  # most rows a column_sum program loads at once


def tuned(configs: list, key: list):
    """``triton.autotune`` over ``configs``, or over the first alone in Triton's interpreter (which
    cannot time candidates)."""
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return triton.autotune(configs=configs[:1] if interpret else configs, key=key)


@functools.lru_cache(maxsize=None)
def usable(switch: str | None = None) -> bool:
    """Triton and a GPU are present and ``switch`` (if given) is not set to "0"."""
    if triton is None or not torch.cuda.is_available():
        return False
    return switch is None or os.environ.get(switch, "1") != "0"


PTX = None if triton is None else tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1"
                                               and torch.version.hip is None)

if triton is not None:

    @triton.jit
    def _column_sum_kernel(partial_ptr, out_ptr, n_cols, N_ROWS: tl.constexpr, BLOCK_R: tl.constexpr,
                           BLOCK_N: tl.constexpr):
        # out[c] = sum over r of partial[r, c], rows added in a fixed order, written in out's dtype:
        # one launch where torch's generic reduction kernel and a cast took two. A program loads all
        # rows (up to BLOCK_R at a time) of a narrow column strip in one go: the partials are a few MB
        # and a loop over 8-row slices made each launch a chain of dependent loads (7 µs for a
        # [256 × 4096] partial on H200, 64 programs). The row count is a compile-time constant: one
        # per activation shape.
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in tl.static_range(0, N_ROWS, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            inside = (rows[:, None] < N_ROWS) & col_ok[None, :]
            acc += tl.sum(tl.load(partial_ptr + rows[:, None] * n_cols + cols[None, :], mask=inside, other=0.0),
                          axis=0)
        tl.store(out_ptr + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


def column_sum(partial: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``partial.sum(0)`` of an fp32 ``[blocks, n]`` tensor in a fixed order, as ``dtype`` (one launch)."""
    blocks, n = partial.shape
    out = torch.empty(n, dtype=dtype, device=partial.device)
    block_r = min(triton.next_power_of_2(blocks), _SUM_ROWS)
    _column_sum_kernel[(triton.cdiv(n, _SUM_COLS),)](partial, out, n, N_ROWS=blocks, BLOCK_R=block_r,
                                                     BLOCK_N=_SUM_COLS)
    return out
