"""The MLP with its GeLU inside its GEMMs (GPU, one TP rank): ``gelu(x W1ᵀ + b1) W2ᵀ``.

Apart, fc1's GEMM writes its output, the bias + GeLU kernel reads it and writes the activation, and in
the backward fc2's input-grad GEMM writes ``dy`` for the GeLU backward to read again: ~270 MB of
traffic per layer each way at seq 512 / batch 32 (the GeLU kernels' 74 + 109 µs on H200). Here

- forward: one Triton GEMM computes ``x W1ᵀ`` and, while the tile is still in registers, adds the
  bias and applies the GeLU: it writes ``z = x W1ᵀ + b1`` (saved for the backward) and ``y = gelu(z)``;
  fc2 (``y W2ᵀ``) stays a cuBLAS call;
- backward: one Triton GEMM computes ``dy = dout · W2`` and multiplies it by ``gelu'(z)`` before it
  is stored, folding the bias grad's column sums into per-tile partial sums (summed afterwards in a
  fixed order, as gelu_kernels.py does); the weight grads and the input grad are cuBLAS calls.

The tiles accumulate in fp32 and the GeLU is evaluated on the fp32 accumulator (``dy`` is never
rounded to bf16, unlike the unfused path); the GeLU is gelu_kernels' erfc form (same accuracy).
Tile shapes are timed on the device at first use (autotune). Registered as custom ops with their
autograd formula, opaque to torch.compile. ``available()`` is False without Triton or a GPU (or with
``MEGATRON_BERT_TRITON_MLP=0``); the model then keeps its linear layers and gelu_kernels.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..triton_support import column_sum, tl, triton, usable
from .gelu_kernels import _normal_cdf_pdf

_BWD_BLOCK_M = 128  # the backward's tile rows, fixed: its partial-sum buffer has one row per row of tiles


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_MLP`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_MLP")


def supports(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """The fused kernels take 16-bit activations and weights of one dtype (fp32 would change the
    GEMMs' precision: Triton's dot rounds fp32 inputs to tf32)."""
    return x.dtype in (torch.bfloat16, torch.float16) and all(p.dtype == x.dtype for p in params)


def _configs(shapes, block_m=None):
    return [triton.Config({"BLOCK_M": block_m or m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w,
                          num_stages=s, maxnreg=r) for m, n, k, w, s, r in shapes]


# The K loop's trip count is a compile-time constant (one K per kernel in a model: the hidden size):
# a loop bound from a runtime argument does not run in the Triton interpreter (the CPU checks).
_K_TILING = {"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "K_TILES": lambda a: triton.cdiv(a["K"], a["BLOCK_K"])}

if triton is not None:
    # The Triton interpreter (the CPU checks) multiplies bf16 tiles as their raw 16-bit patterns: there
    # the operands go to the dot as fp32 (exact products, fp32 sums: what the tensor cores do).
    _INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")

    @triton.jit
    def _mma(a, b, acc):
        if _INTERPRETED:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
        return tl.dot(a, b, acc)

    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, register cap). Shared memory per program is stages ·
    # (BM + BN) · BK · 2 bytes. 128 × 128 × 64 tiles in 3 stages (96 KB) let two programs share an SM
    # when they fit in half the register file (4 warps at ≤ 255 registers, 8 warps at ≤ 128): one
    # program's epilogue then runs under the other's MMAs. The 128 × 256 tiles (8 warps, two
    # warpgroups) halve the operand loads per FLOP instead, one program per SM. The epilogues work
    # on half a tile at a time, which keeps them in registers (sm90 cubins, cuobjdump -res-usage: no
    # spills but in the 4-warp backward, 40 bytes).
    _FWD_SHAPES = ((128, 128, 64, 4, 3, None), (128, 128, 64, 8, 3, None), (128, 128, 64, 8, 4, None),
                   (128, 256, 64, 8, 3, None), (128, 256, 64, 8, 4, None), (256, 128, 64, 8, 3, None),
                   (64, 256, 64, 4, 3, None), (128, 128, 128, 8, 3, None))
    _BWD_SHAPES = ((128, 128, 64, 4, 3, None), (128, 128, 64, 8, 3, 128), (128, 128, 64, 8, 4, 128),
                   (128, 256, 64, 8, 3, None), (128, 256, 64, 8, 4, None), (128, 128, 128, 8, 3, None),
                   (128, 64, 64, 4, 3, None), (128, 128, 64, 4, 4, None))

    @triton.jit
    def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
        # Programs run in column-major order inside bands of GROUP_M tile rows: consecutive programs
        # share the band's rows of the left operand and one tile column of the right one in L2.
        pid = tl.program_id(0)
        tiles_n = tl.cdiv(N, BLOCK_N)
        band = pid // (GROUP_M * tiles_n)
        first = band * GROUP_M
        height = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
        inside = pid % (GROUP_M * tiles_n)
        return first + inside % height, inside // height

    @triton.autotune(configs=_configs(_FWD_SHAPES), key=["N", "K"])
    @triton.heuristics(_K_TILING)
    @triton.jit
    def _fc1_gelu_kernel(x_ptr, w_ptr, b_ptr, z_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, K_TILES: tl.constexpr):
        # z = x wᵀ + b and y = gelu(z): x [M, K], w [N, K] (a linear layer's weight), z, y [M, N].
        pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        # rows and columns past the edge read row / column 0 (in bounds, no mask in the loop); the
        # stores leave them out
        lhs = x_ptr + tl.where(rows < M, rows, 0).to(tl.int64)[:, None] * K + ks[None, :]  # [BM, BK]
        rhs = w_ptr + tl.where(cols < N, cols, 0).to(tl.int64)[:, None] * K + ks[None, :]  # [BN, BK]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(K_TILES):
            if EVEN_K:
                a = tl.load(lhs)
                b = tl.load(rhs)
            else:
                a = tl.load(lhs, mask=ks[None, :] < K - kt * BLOCK_K, other=0.0)
                b = tl.load(rhs, mask=ks[None, :] < K - kt * BLOCK_K, other=0.0)
            acc = _mma(a, tl.trans(b), acc)
            lhs += BLOCK_K
            rhs += BLOCK_K
        # the epilogue in two column halves: half the temporaries live at a time
        half: tl.constexpr = BLOCK_N // 2
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
        _fc1_epilogue(lo, b_ptr, z_ptr, y_ptr, rows, pid_n * BLOCK_N + tl.arange(0, half), M, N)
        _fc1_epilogue(hi, b_ptr, z_ptr, y_ptr, rows, pid_n * BLOCK_N + half + tl.arange(0, half), M, N)

    @triton.jit
    def _fc1_epilogue(acc, b_ptr, z_ptr, y_ptr, rows, cols, M, N):
        z = acc + tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        cdf, _ = _normal_cdf_pdf(z)
        out = rows.to(tl.int64)[:, None] * N + cols[None, :]
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(z_ptr + out, z.to(z_ptr.dtype.element_ty), mask=inside)
        tl.store(y_ptr + out, (z * cdf).to(y_ptr.dtype.element_ty), mask=inside)

    @triton.autotune(configs=_configs(_BWD_SHAPES, block_m=_BWD_BLOCK_M), key=["N", "K"])
    @triton.heuristics(_K_TILING)
    @triton.jit
    def _dgelu_dgrad_kernel(g_ptr, w_ptr, z_ptr, dz_ptr, partial_ptr, M, N, K, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                            EVEN_K: tl.constexpr, K_TILES: tl.constexpr):
        # dz = (g · w) ⊙ gelu'(z) and partial[tile row] = Σ_rows dz: g [M, K] (fc2's output grad),
        # w [K, N] (fc2's weight), z [M, N] (fc1's output with its bias), partial [cdiv(M, BM), N] fp32.
        pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        lhs = g_ptr + tl.where(rows < M, rows, 0).to(tl.int64)[:, None] * K + ks[None, :]  # [BM, BK]
        # [BK, BN]: the edge columns are masked, not clamped (a clamp along the contiguous dimension
        # hides the contiguity from the compiler: 2-byte loads instead of 16-byte async copies)
        rhs = w_ptr + ks.to(tl.int64)[:, None] * N + cols[None, :]
        col_ok = cols[None, :] < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(K_TILES):
            if EVEN_K:
                a = tl.load(lhs)
                b = tl.load(rhs, mask=col_ok, other=0.0)
            else:
                a = tl.load(lhs, mask=ks[None, :] < K - kt * BLOCK_K, other=0.0)
                b = tl.load(rhs, mask=col_ok & (ks[:, None] < K - kt * BLOCK_K), other=0.0)
            acc = _mma(a, b, acc)
            lhs += BLOCK_K
            rhs += BLOCK_K * N
        half: tl.constexpr = BLOCK_N // 2
        lo, hi = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
        _dgelu_epilogue(lo, z_ptr, dz_ptr, partial_ptr, pid_m, rows, pid_n * BLOCK_N + tl.arange(0, half), M, N)
        _dgelu_epilogue(hi, z_ptr, dz_ptr, partial_ptr, pid_m, rows, pid_n * BLOCK_N + half + tl.arange(0, half), M, N)

    @triton.jit
    def _dgelu_epilogue(acc, z_ptr, dz_ptr, partial_ptr, pid_m, rows, cols, M, N):
        out = rows.to(tl.int64)[:, None] * N + cols[None, :]
        inside = (rows[:, None] < M) & (cols[None, :] < N)
        z = tl.load(z_ptr + out, mask=inside, other=0.0).to(tl.float32)
        cdf, pdf = _normal_cdf_pdf(z)
        dz = tl.where(inside, acc * (cdf + z * pdf), 0.0)  # rows past the edge hold row 0's products
        tl.store(dz_ptr + out, dz.to(dz_ptr.dtype.element_ty), mask=inside)
        tl.store(partial_ptr + pid_m.to(tl.int64) * N + cols, tl.sum(dz, axis=0), mask=cols < N)


def _grid(m: int, n: int):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)


@torch.library.custom_op("megatron_bert::mlp_gelu", mutates_args=())
def mlp_gelu_forward(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gelu(x W1ᵀ + b1) W2ᵀ, z, y)``: the MLP's output (no fc2 bias) and, for its backward,
    ``z = x W1ᵀ + b1`` and ``y = gelu(z)`` as ``[tokens, ffn]``."""
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    m, k = x2.shape
    n = w1.shape[0]
    z = torch.empty(m, n, dtype=x.dtype, device=x.device)
    y = torch.empty_like(z)
    if m:
        _fc1_gelu_kernel[_grid(m, n)](x2, w1.contiguous(), b1, z, y, m, n, k)
    return F.linear(y, w2).view(*x.shape[:-1], w2.shape[0]), z, y


@mlp_gelu_forward.register_fake
def _(x, w1, b1, w2):
    m, n = x.numel() // x.shape[-1], w1.shape[0]
    return (x.new_empty(*x.shape[:-1], w2.shape[0]), x.new_empty(m, n), x.new_empty(m, n))


@torch.library.custom_op("megatron_bert::mlp_gelu_backward", mutates_args=())
def mlp_gelu_backward(grad: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                      z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grads of ``x``, ``W1``, ``b1``, ``W2`` from the output's grad and the saved ``z``, ``y``."""
    g2 = grad.reshape(-1, grad.shape[-1]).contiguous()  # [tokens, h]
    x2 = x.reshape(-1, x.shape[-1])
    m, h = g2.shape
    n = w1.shape[0]
    dw2 = g2.t().mm(y)  # [h, ffn]
    dz = torch.empty_like(z)
    blocks = max(triton.cdiv(m, _BWD_BLOCK_M), 1)
    partial = (torch.empty if m else torch.zeros)(blocks, n, dtype=torch.float32, device=z.device)
    if m:
        _dgelu_dgrad_kernel[_grid(m, n)](g2, w2.contiguous(), z, dz, partial, m, n, h)
    dx = dz.mm(w1).view_as(x)
    dw1 = dz.t().mm(x2)  # [ffn, hidden]
    return dx, dw1, column_sum(partial, b1.dtype), dw2


@mlp_gelu_backward.register_fake
def _(grad, x, w1, b1, w2, z, y):
    return torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2)


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2 = inputs
    _, z, y = output
    ctx.save_for_backward(x, w1, b1, w2, z, y)


def _backward(ctx, grad, _grad_z, _grad_y):
    # z and y are handed out only to be saved (mlp_gelu returns the output alone): no grads of theirs
    return mlp_gelu_backward(grad, *ctx.saved_tensors)


mlp_gelu_forward.register_autograd(_backward, setup_context=_setup_context)


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``gelu(x W1ᵀ + b1) W2ᵀ`` over the last dim of ``x`` (``[*, hidden]`` → ``[*, w2.shape[0]]``)."""
    return mlp_gelu_forward(x, w1, b1, w2)[0]
