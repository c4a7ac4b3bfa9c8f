"""The Triton kernels of the flat AdamW (flat_adamw.py holds the buffers, the optimizer and the math's
description): one over a flat fp32 grad buffer, one reading each tensor's 16-bit grad through a table of
addresses, both the same update with the same rounding (``_adamw_math``).

Launch shape: 1024 elements per program and 8 warps, the fastest of 11 shapes timed on H200 at 345M
elements (bench/bench_kernels.py --ours-only: 2.43 ms = 4.1 TB/s, against 2.66 ms for 4096 / 8 warps).
"""
from __future__ import annotations

import math

import torch

from ..triton_support import tl, triton  # triton is None on CPU-only installs

BLOCK = 1024
NUM_WARPS = 8
TABLE_SUBBLOCKS = 4  # BLOCKs per program of the table kernel (its lookups paid once per 4096 elements)


if triton is not None:
    @triton.jit
    def _adamw_scalars(step_ptr, lr_ptr, scale_ptr, LOG2_BETA1: tl.constexpr, LOG2_BETA2: tl.constexpr):
        # Bias corrections in fp64 like torch's kernel (1 - b**step cancels badly in fp32), rounded to
        # fp32. log2(beta) comes as a constexpr (fp64 here; a float argument would be fp32). Once per
        # program: the fp64 exp2 and sqrt cost ~180 instructions per thread, and computed again for
        # each of a program's blocks they held registers that cut the table kernel to 3 programs per SM.
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        bc1 = (1.0 - tl.exp2(step * tl.full([], LOG2_BETA1, tl.float64))).to(tl.float32)
        bc2_sqrt = tl.sqrt(1.0 - tl.exp2(step * tl.full([], LOG2_BETA2, tl.float64))).to(tl.float32)
        lr = tl.load(lr_ptr)
        return lr, tl.div_rn(lr, bc1), bc2_sqrt, tl.load(scale_ptr)

    @triton.jit
    def _adamw_math(p, g, m, v, lr, step_size, bc2_sqrt, scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                    weight_decay, DECAY: tl.constexpr):
        g = tl.div_rn(g, scale)
        if DECAY:
            p = p - (lr * weight_decay) * p
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + (one_minus_beta2 * g) * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        return p, m, v

    @triton.jit
    def _update_block(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, offs, grad_idx, mask, lr,
                      step_size, bc2_sqrt, scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                      DECAY: tl.constexpr, WRITE_WEIGHT: tl.constexpr):
        # One block of either kernel: flat buffers at offs, the grad at grad_ptr + grad_idx.
        g = tl.load(grad_ptr + grad_idx, mask=mask, other=0.0).to(tl.float32)
        p, m, v = _adamw_math(
            tl.load(master_ptr + offs, mask=mask, other=0.0), g,
            tl.load(exp_avg_ptr + offs, mask=mask, other=0.0), tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0),
            lr, step_size, bc2_sqrt, scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, DECAY)
        tl.store(master_ptr + offs, p, mask=mask)
        tl.store(exp_avg_ptr + offs, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
        if WRITE_WEIGHT:
            tl.store(weight_ptr + offs, p.to(weight_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _adamw_kernel(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, step_ptr, lr_ptr, scale_ptr,
                      found_ptr, n, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                      LOG2_BETA1: tl.constexpr, LOG2_BETA2: tl.constexpr, DECAY: tl.constexpr,
                      WRITE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
        # Every program reads the skip flag first: a skipped step (found_inf != 0) reads no tensor data.
        if tl.load(found_ptr) == 0.0:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64: >2**31 elements
            lr, step_size, bc2_sqrt, scale = _adamw_scalars(step_ptr, lr_ptr, scale_ptr, LOG2_BETA1, LOG2_BETA2)
            _update_block(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, offs, offs, offs < n, lr,
                          step_size, bc2_sqrt, scale, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                          weight_decay, DECAY, WRITE_WEIGHT)

    @triton.jit
    def _adamw_table_kernel(master_ptr, grad_table_ptr, block_tensor_ptr, block_start_ptr, block_flat_ptr,
                            block_count_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, step_ptr, lr_ptr, scale_ptr,
                            found_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                            LOG2_BETA1: tl.constexpr, LOG2_BETA2: tl.constexpr, DECAY: tl.constexpr,
                            BLOCK: tl.constexpr, SUBBLOCKS: tl.constexpr):
        # The same update, the grads read where autograd left them: program pid covers ``count``
        # elements of tensor t from ``start`` on, at ``flat`` in the flat buffers (block tables, fixed by
        # the layout); t's 16-bit grad lives at grad_table[t] (16-byte aligned: checked on the host).
        # Table lookups come before any data moves, so they are kept to two dependent levels (this
        # program's row, then the grad's address) and issued before the skip flag is known; a program
        # takes several blocks to pay them once (at 345M on H200: one block per program with three
        # levels 3.27 ms, four blocks 2.82, two levels 2.80-2.87, and with the bias corrections once per
        # program instead of once per block 2.44, against 2.6 for the flat kernel, which reads fp32
        # grads). A block inside its tensor runs without masks, so that loads and stores are vectorised
        # (a mask against a size read from memory is not known to be constant over a vector).
        pid = tl.program_id(0)
        t = tl.load(block_tensor_ptr + pid)
        start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
        flat = tl.multiple_of(tl.load(block_flat_ptr + pid), 64)  # the layout's ALIGN
        count = tl.load(block_count_ptr + pid)
        grad_ptr = tl.multiple_of(tl.load(grad_table_ptr + t).to(tl.pointer_type(weight_ptr.dtype.element_ty)), 16)
        if tl.load(found_ptr) == 0.0:  # a skipped step reads no tensor data
            lr, step_size, bc2_sqrt, scale = _adamw_scalars(step_ptr, lr_ptr, scale_ptr, LOG2_BETA1, LOG2_BETA2)
            for j in tl.static_range(SUBBLOCKS):
                local = j * BLOCK + tl.arange(0, BLOCK)
                if (j + 1) * BLOCK <= count:
                    _update_block(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, flat + local,
                                  start + local, tl.full((BLOCK,), True, tl.int1), lr, step_size, bc2_sqrt, scale,
                                  beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, DECAY, True)
                elif j * BLOCK < count:
                    _update_block(master_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, flat + local,
                                  start + local, local < count, lr, step_size, bc2_sqrt, scale, beta1,
                                  one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, DECAY, True)

else:  # CPU-only installs: flat_adamw falls back to its torch update
    _adamw_kernel = _adamw_table_kernel = None


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf  # beta = 0: beta**step = 0


def kernel_constexprs(beta1: float, beta2: float, weight_decay: float, write_weight: bool = True) -> dict:
    return {"LOG2_BETA1": _log2(beta1), "LOG2_BETA2": _log2(beta2), "DECAY": weight_decay != 0,
            "WRITE_WEIGHT": write_weight, "BLOCK": BLOCK}


def flat_update_triton(master, grad, exp_avg, exp_avg_sq, weight, step, lr, grad_scale, found_inf, *,
                       beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The update of one contiguous slice in one launch (arguments as in :func:`flat_update_torch`)."""
    n = master.numel()
    # fp_fusion off: no FMA contraction, so the kernel rounds exactly where flat_update_torch does
    _adamw_kernel[(triton.cdiv(n, BLOCK),)](
        master, grad, exp_avg, exp_avg_sq, master if weight is None else weight, step, lr, grad_scale, found_inf,
        n, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
        **kernel_constexprs(beta1, beta2, weight_decay, weight is not None), num_warps=NUM_WARPS,
        enable_fp_fusion=False)


def table_update_triton(flat, group: int, grad_table: torch.Tensor, step, lr, grad_scale, found_inf, *,
                        beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """:func:`flat_update_triton` of layout group ``group`` over the buffers of ``flat`` (a
    flat_adamw.FlatBuffers), its grads read through ``grad_table`` (the address of every tensor's 16-bit
    grad) instead of a flat fp32 buffer; same rounding."""
    blocks, starts, flats, counts = flat.block_tables()[group]
    if blocks.numel() == 0:
        return
    consts = kernel_constexprs(beta1, beta2, weight_decay)
    del consts["WRITE_WEIGHT"]
    _adamw_table_kernel[(blocks.numel(),)](
        flat.master, grad_table, blocks, starts, flats, counts, flat.exp_avg, flat.exp_avg_sq, flat.weight, step,
        lr, grad_scale, found_inf, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, **consts,
        SUBBLOCKS=TABLE_SUBBLOCKS, num_warps=NUM_WARPS, enable_fp_fusion=False)
