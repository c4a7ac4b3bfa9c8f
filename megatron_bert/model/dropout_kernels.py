"""Dropout from Triton kernels: four mask bytes per Philox call (GPU).

Inductor lowers ``F.dropout`` inside a compiled layer to one ``tl.rand`` per element: a full
10-round Philox call that yields four 32-bit words, of which it keeps one. On H200 that makes the
fused bias + dropout + residual kernel compute-bound (~100 µs for a [512·32, 1024] activation,
against ~25 µs of memory traffic; bench/NOTES.md). Here one call feeds four elements.

``bias_dropout_add`` is a layer's residual epilogue: the draw and ``residual + (x + bias) · keep ·
scale`` in one kernel that writes the output and the boolean mask, which autograd saves for the
backward (plain torch, for Inductor to fuse). ``keep_mask`` draws the same mask alone; a mask kernel
followed by Inductor's epilogue reading the mask back took 48 µs against 36 µs for the one kernel on
a [512·32, 1024] activation on H200.

``keep_mask(seed, numel, p, salt)``, like ``bias_dropout_add``, is a pure function of its arguments
(a registered custom op, so torch.compile may move or re-run it freely): the randomness comes from
``seed``, a device tensor the caller draws from torch's generator (``draw_seed``), which keeps
CUDA-graph replays and activation recompute right — a replay draws a new seed on device, a
recompute restores the generator and draws the same one. Element ``i`` is kept when the top 24 bits of its Philox word are at or above
``round(p · 2^24)``, so the drop probability is ``p`` to within 3e-8.
"""
from __future__ import annotations

import torch

from ..triton_support import tl, triton, usable

_BLOCK = 1024  # Philox calls per program; each program writes 4 · _BLOCK mask bytes


def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_DROPOUT`` is not "0" (A/B switch)."""
    return usable("MEGATRON_BERT_TRITON_DROPOUT")


if triton is not None:

    @triton.jit
    def _keep_mask_kernel(seed_ptr, mask_ptr, n, threshold, salt, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        seed = tl.load(seed_ptr) + salt  # int64: Philox's two 32-bit key words
        counter = pid * BLOCK + tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(seed, counter)
        # The four words of a call land BLOCK bytes apart: every store is one contiguous run.
        base = pid.to(tl.int64) * (4 * BLOCK) + tl.arange(0, BLOCK)
        tl.store(mask_ptr + base, (r0 >> 8).to(tl.int32) >= threshold, mask=base < n)
        tl.store(mask_ptr + base + BLOCK, (r1 >> 8).to(tl.int32) >= threshold, mask=base + BLOCK < n)
        tl.store(mask_ptr + base + 2 * BLOCK, (r2 >> 8).to(tl.int32) >= threshold, mask=base + 2 * BLOCK < n)
        tl.store(mask_ptr + base + 3 * BLOCK, (r3 >> 8).to(tl.int32) >= threshold, mask=base + 3 * BLOCK < n)


    @triton.jit
    def _bda_word(x_ptr, b_ptr, r_ptr, out_ptr, keep_ptr, offs, n, word, threshold, scale, N_COLS: tl.constexpr):
        # One Philox word's BLOCK elements: keep = top 24 bits ≥ threshold (as _keep_mask_kernel),
        # out = residual + (x + b) · keep · scale in fp32, rounded once.
        inside = offs < n
        keep = (word >> 8).to(tl.int32) >= threshold
        x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + offs % N_COLS, mask=inside, other=0.0).to(tl.float32)
        r = tl.load(r_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        out = r + tl.where(keep, (x + b) * scale, 0.0)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)
        tl.store(keep_ptr + offs, keep, mask=inside)

    @triton.jit
    def _bda_fwd_kernel(x_ptr, b_ptr, r_ptr, out_ptr, keep_ptr, seed_ptr, n, threshold, salt, scale,
                        N_COLS: tl.constexpr, BLOCK: tl.constexpr):
        # The keep-mask kernel's draw (same seed → same mask), with the epilogue in the same pass.
        pid = tl.program_id(0)
        seed = tl.load(seed_ptr) + salt
        r0, r1, r2, r3 = tl.randint4x(seed, pid * BLOCK + tl.arange(0, BLOCK))
        base = pid.to(tl.int64) * (4 * BLOCK) + tl.arange(0, BLOCK)
        _bda_word(x_ptr, b_ptr, r_ptr, out_ptr, keep_ptr, base, n, r0, threshold, scale, N_COLS)
        _bda_word(x_ptr, b_ptr, r_ptr, out_ptr, keep_ptr, base + BLOCK, n, r1, threshold, scale, N_COLS)
        _bda_word(x_ptr, b_ptr, r_ptr, out_ptr, keep_ptr, base + 2 * BLOCK, n, r2, threshold, scale, N_COLS)
        _bda_word(x_ptr, b_ptr, r_ptr, out_ptr, keep_ptr, base + 3 * BLOCK, n, r3, threshold, scale, N_COLS)


@torch.library.custom_op("megatron_bert::bias_dropout_add", mutates_args=())
def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, seed: torch.Tensor, p: float,
                     salt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``residual + dropout(x + bias)`` in one pass that also draws the mask: → (out, keep).

    ``keep`` is the bool mask ``keep_mask(seed, x.numel(), p, salt)`` would give, in ``x``'s shape;
    kept elements are scaled by ``1 / (1 - p)``. ``bias``: ``[x.shape[-1]]``."""
    x, residual = x.contiguous(), residual.contiguous()
    out = torch.empty_like(x)
    keep = torch.empty(x.shape, dtype=torch.bool, device=x.device)
    n = x.numel()
    if n:
        grid = (triton.cdiv(n, 4 * _BLOCK),)
        _bda_fwd_kernel[grid](x, bias, residual, out, keep, seed, n, drop_threshold(p), salt, 1.0 / (1.0 - p),
                              N_COLS=x.shape[-1], BLOCK=_BLOCK)
    return out, keep


@bias_dropout_add.register_fake
def _(x, bias, residual, seed, p, salt):
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=x.device)


def _bda_setup_context(ctx, inputs, output):
    ctx.p = inputs[4]
    ctx.save_for_backward(output[1], inputs[1])


def _bda_backward(ctx, grad_out, _grad_keep):
    # Plain torch ops: inside a compiled graph Inductor fuses them into one masked-grad pass and a
    # column sum (a Triton kernel doing both in one pass measured slower on H200: bench/NOTES.md).
    keep, bias = ctx.saved_tensors
    dx = grad_out * keep * (1.0 / (1.0 - ctx.p))
    dbias = dx.sum(tuple(range(dx.dim() - 1)), dtype=torch.float32).to(bias.dtype)
    return dx, dbias, grad_out, None, None, None  # d residual = grad_out


bias_dropout_add.register_autograd(_bda_backward, setup_context=_bda_setup_context)


def fused_bias_dropout_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float,
                           salt: int = 0) -> torch.Tensor:
    """``residual + dropout(x + bias)`` with a freshly drawn seed (training, p > 0)."""
    return bias_dropout_add(x, bias, residual, draw_seed(x.device), p, salt)[0]


def drop_threshold(p: float) -> int:
    """The 24-bit threshold below which an element is dropped."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return int(round(p * (1 << 24)))


@torch.library.custom_op("megatron_bert::dropout_keep_mask", mutates_args=())
def keep_mask(seed: torch.Tensor, numel: int, p: float, salt: int) -> torch.Tensor:
    """A flat ``[numel]`` bool tensor, True where the element is kept, on ``seed``'s device.

    ``seed``: one int64 element; ``salt`` gives independent masks from the same seed (e.g. per
    sequence-parallel shard)."""
    mask = torch.empty(numel, dtype=torch.bool, device=seed.device)
    if numel:
        grid = (triton.cdiv(numel, 4 * _BLOCK),)
        _keep_mask_kernel[grid](seed, mask, numel, drop_threshold(p), salt, BLOCK=_BLOCK)
    return mask


@keep_mask.register_fake
def _(seed, numel, p, salt):
    return torch.empty(numel, dtype=torch.bool, device=seed.device)


def draw_seed(device: torch.device, *shape: int) -> torch.Tensor:
    """A fresh 62-bit seed (or a tensor of ``shape`` of them) from torch's generator for ``device``,
    kept on the device (no host sync)."""
    return torch.randint(0, 1 << 62, shape or (1,), device=device, dtype=torch.int64)
