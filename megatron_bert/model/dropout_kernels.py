"""Dropout keep-masks from one Triton kernel: four mask bytes per Philox call (GPU).

Inductor lowers ``F.dropout`` inside a compiled layer to one ``tl.rand`` per element: a full
10-round Philox call that yields four 32-bit words, of which it keeps one. On H200 that makes the
fused bias + dropout + residual kernel compute-bound (~100 µs for a [512·32, 1024] activation,
against ~25 µs of memory traffic; bench/NOTES.md). Here one call feeds four elements, in a kernel
of its own that writes only the boolean keep-mask; the compiled epilogue then reads the mask like
any other input and stays memory-bound, fused with the residual add and the next LayerNorm as before.
The mask is what autograd saves for the backward in either case.

``keep_mask(seed, numel, p, salt)`` is a pure function of its arguments (a registered custom op, so
torch.compile may move or re-run it freely): the randomness comes from ``seed``, a device tensor the
caller draws from torch's generator (``draw_seed``), which keeps CUDA-graph replays and activation
recompute right — a replay draws a new seed on device, a recompute restores the generator and draws
the same one. Element ``i`` is kept when the top 24 bits of its Philox word are at or above
``round(p · 2^24)``, so the drop probability is ``p`` to within 3e-8.
"""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_BLOCK = 1024  # Philox calls per program; each program writes 4 · _BLOCK mask bytes


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Triton and a GPU are present and ``MEGATRON_BERT_TRITON_DROPOUT`` is not "0" (A/B switch)."""
    return (triton is not None and torch.cuda.is_available()
            and os.environ.get("MEGATRON_BERT_TRITON_DROPOUT", "1") != "0")


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


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh 62-bit seed from torch's generator for ``device``, kept on the device (no host sync)."""
    return torch.randint(0, 1 << 62, (1,), device=device, dtype=torch.int64)


def keep_mask_like(x: torch.Tensor, p: float, salt: int = 0) -> torch.Tensor:
    """A bool keep-mask of ``x``'s shape drawn with probability ``1 - p`` per element."""
    return keep_mask(draw_seed(x.device), x.numel(), p, salt).view(x.shape)
