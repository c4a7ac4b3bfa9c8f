"""Checks of the model's Triton kernels (bias + GeLU with its bias-grad column sum, the QKV gradient
pack, the bias + dropout + residual epilogue, the epilogue + LayerNorm kernels and the encoder's path on
them, the attention kernels and the attention layer on them at TP=2, the word embeddings' backward) that
need Triton but no GPU. Run by tests/test_kernels.py when MEGATRON_BERT_TEST_TRITON=1, or:

    TRITON_INTERPRET=1 python tests/kernel_checks.py interpret   # against float64 / torch references
    python tests/kernel_checks.py compile                        # compiles each kernel for sm90

Prints one ``OK ...`` line per case and exits non-zero on the first failure. On a GPU,
tests/test_gpu.py checks the same kernels compiled and inside a compiled layer.
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megatron_bert import triton_support  # noqa: E402
from megatron_bert.model import (attention_backward_kernels, attention_kernels, drop_mask_kernels,  # noqa: E402
                                 dropout_kernels, embedding_kernels, gelu_kernels, layernorm_kernels,
                                 qkv_kernels, residual_norm_kernels)
from embedding_checks import check_embedding_grad  # noqa: E402


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def gelu_accuracy(y, dx, db, x, b, dy, rounding_checked: bool = True) -> str:
    """Empty when bias_gelu's ``y``, ``dx`` and ``db`` (bf16, from bf16 ``x``, ``b``, ``dy``) match
    exact GeLU elementwise: each output within one bf16 ulp of the float64 value (plus 1e-6·|dy| for
    dx, where gelu' crosses zero and fp32 cancels; values under 16× fp32's smallest normal do not
    count: near z = -13 the kernel's exp2 flushes to zero what z·t would have scaled up to ~3e-38),
    with ``rounding_checked`` at most 1e-3 of them off the correctly rounded bf16 (the interpreter
    truncates to bf16), and the bias grad within 4e-3 (relative norm: a sum in another order).
    Otherwise says what is wrong."""
    z = x.double() + b.double()
    # Φ through erfc: torch's gelu, even in float64, computes 1 + erf(z/√2), which is 0 below z ≈ -8
    cdf, pdf = 0.5 * torch.special.erfc(-z * 0.5 ** 0.5), torch.exp(-0.5 * z * z) * (2 * torch.pi) ** -0.5
    y64, dx64 = z * cdf, dy.double() * (cdf + z * pdf)
    tiny = 2.0 ** -122
    for name, got, want, floor in (("y", y, y64, tiny), ("dx", dx, dx64, 1e-6 * dy.double().abs() + tiny)):
        if got.dtype != torch.bfloat16:
            return f"{name} is {got.dtype}, not bf16"
        err = (got.double() - want).abs()
        off = (got != want.bfloat16())[want.abs() > tiny].double().mean().item()
        if (err > want.abs() * 2.0 ** -7 + floor).any() or (rounding_checked and off > 1e-3):
            return (f"{name}: max error {(err / (want.abs() * 2.0 ** -7 + floor)).max().item():.3g} bf16 ulps, "
                    f"{off:.2e} of the outputs not correctly rounded")
    db64 = dx64.reshape(-1, dx64.shape[-1]).sum(0)
    if db.dtype != torch.bfloat16 or _rel(db, db64) > 4e-3:
        return f"dbias: relative error {_rel(db, db64):.3g}"
    return ""


def check_gelu(rows: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(rows, n, generator=g)).bfloat16()  # reaches the tails
    x.view(-1)[: min(x.numel(), 2401)] = torch.linspace(-12, 12, 2401)[: x.numel()].bfloat16()
    b = torch.randn(n, generator=g).bfloat16()
    dy = torch.randn(rows, n, generator=g).bfloat16()
    y = gelu_kernels.bias_gelu(x, b)
    dx, db = gelu_kernels.bias_gelu_backward(dy, x, b)
    wrong = gelu_accuracy(y, dx, db, x, b, dy, rounding_checked=False)
    if wrong:
        raise SystemExit(f"FAIL bias_gelu {rows}x{n}: {wrong}")
    print(f"OK interpret bias_gelu {rows}x{n}: y and dx within one bf16 ulp of exact GeLU, dbias within 4e-3")


def check_column_sum(blocks: int, n: int, seed: int) -> None:
    partial = torch.randn(blocks, n, generator=torch.Generator().manual_seed(seed))
    got = triton_support.column_sum(partial, torch.float32)
    err = (got.double() - partial.double().sum(0)).abs().max().item()
    if got.shape != (n,) or err > 1e-4:
        raise SystemExit(f"FAIL column_sum [{blocks} x {n}]: off the float64 column sums by {err:.3g}")
    print(f"OK interpret column_sum [{blocks} x {n}]: within {err:.2g} of float64")


def check_layer_norm(shape: tuple, seed: int) -> None:
    # fp32 here: aten's CPU LayerNorm backward wants bf16 statistics for bf16 inputs, its CUDA one fp32
    # (tests/test_gpu.py runs the bf16 case on the GPU)
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    x = 2 * torch.randn(shape, generator=g) + 0.5
    w, b = 1 + 0.3 * torch.randn(n, generator=g), 0.2 * torch.randn(n, generator=g)
    dy = torch.randn(shape, generator=g)
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, b))
    y, mean, rstd = layernorm_kernels.layer_norm_with_stats(xt, wt, bt, 1e-5)
    y.backward(dy)
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    y64 = torch.nn.functional.layer_norm(x64, (n,), w64, b64, 1e-5)
    y64.backward(dy.double())
    stats_ok = mean.shape == rstd.shape == (*shape[:-1], 1) and mean.dtype == rstd.dtype == torch.float32 \
        and torch.allclose(mean.double().squeeze(-1), x64.mean(-1), atol=1e-5) \
        and torch.allclose(rstd.double().squeeze(-1), (x64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5)
    errs = (_rel(y, y64), _rel(xt.grad, x64.grad), _rel(wt.grad, w64.grad), _rel(bt.grad, b64.grad))
    if not (stats_ok and max(errs) < 1e-5):
        raise SystemExit(f"FAIL layer_norm {shape}: statistics ok {stats_ok}, relative errors y/dx/dw/db {errs}")
    print(f"OK interpret layer_norm {shape}: y, fp32 mean and 1/std, grads (torch's backward on the saved "
          f"statistics) within {max(errs):.2g} of float64")


def check_qkv_pack(s: int, b: int, heads: int, hd: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    # the strides cuDNN's backward hands back: [b, heads, s, hd] laid out as [s, b, heads, hd]
    grads = [torch.randn(s, b, heads, hd, generator=g).bfloat16().permute(1, 2, 0, 3) for _ in range(3)]
    grads[2] = grads[2].contiguous()  # and a plainly contiguous one
    bias = torch.zeros(heads * 3 * hd, dtype=torch.bfloat16)
    packed, dbias = qkv_kernels.qkv_grad_pack(*grads, bias)
    want = torch.stack(grads, 0).permute(3, 1, 2, 0, 4).reshape(s, b, heads * 3 * hd)  # [s, b, heads, 3, hd]
    if not torch.equal(packed, want):
        raise SystemExit(f"FAIL qkv_grad_pack {s=} {b=} {heads=}: the packed gradient differs from torch's stack")
    db = want.float().sum((0, 1)).bfloat16()  # fp32 sums (in another order), rounded once
    ulps = ((dbias.float() - db.float()).abs() / (db.float().abs() * 2.0 ** -7).clamp(min=2.0 ** -30)).max().item()
    if dbias.dtype != torch.bfloat16 or ulps > 1.0:
        raise SystemExit(f"FAIL qkv_grad_pack bias grad: {ulps:.3g} bf16 ulps from the fp32 column sum")
    print(f"OK interpret qkv_grad_pack s={s} b={b} heads={heads} hd={hd}: packed gradient bit-identical, "
          f"bias grad within {ulps:.2g} bf16 ulp of the fp32 column sum")


def _attention_inputs(s, b, heads, hd, masked, seed, device, dtype):
    g = torch.Generator().manual_seed(seed)
    h = heads * hd
    x = torch.randn(s, b, h, generator=g).to(device, dtype)
    w = (torch.randn(3 * h, h, generator=g) * 1.5 / h ** 0.5).to(device, dtype)
    bias = torch.randn(3 * h, generator=g).to(device, dtype)
    dout = torch.randn(s, b, h, generator=g).to(device, dtype)
    kv = None
    if masked:  # a sample with a padded tail, one with a single real token
        kv = torch.ones(b, s, dtype=torch.bool, device=device)
        kv[0, s - s // 3:] = False
        kv[-1, 1:] = False
    return x, w, bias, dout, kv


def _attention_references(x, w, bias, dout, kv, bits, heads, hd, p):
    """float64 context and grads of the projected attention, and of the attention on the projection."""
    import torch.nn.functional as F

    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, bias))
    ref = attention_kernels.reference(F.linear(x64, w64, b64), kv, bits, heads, hd, p)
    ref.backward(dout.double())
    q64 = F.linear(x, w, bias).double().requires_grad_()
    r2 = attention_kernels.reference(q64, kv, bits, heads, hd, p)
    r2.backward(dout.double())
    return (ref, x64.grad, w64.grad, b64.grad), (r2, q64.grad)


def _errors(attend, x, w, bias, dout, refs) -> dict:
    """``attend(qkv) -> context`` run on the projection (as the model does) and on a given projection."""
    import torch.nn.functional as F

    (ref, dx64, dw64, db64), (r2, dq64) = refs
    xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, bias))
    attend(F.linear(xt, wt, bt), (xt, wt, bt)).backward(dout)
    qkv = F.linear(x, w, bias).requires_grad_()
    o2 = attend(qkv, None)
    o2.backward(dout)
    return {"dx": _rel(xt.grad, dx64), "dW": _rel(wt.grad, dw64), "dbias": _rel(bt.grad, db64),
            "op_out": _rel(o2, r2), "op_dqkv": _rel(qkv.grad, dq64)}


def attention_errors(s: int, b: int, heads: int, hd: int, p: float, masked: bool, seed: int, device: str = "cpu",
                     dtype: torch.dtype = torch.float32) -> dict:
    """Relative errors (norms) against float64 of the attention kernels: ``projected_attention`` (the
    grads of x, W and the folded bias) and ``flash_attention`` on a given projection (context, packed
    grad), the reference applying the mask that ``drop_bits`` draws from the same seed. Also checks that
    the forward's saved mask is that mask."""
    x, w, bias, dout, kv = _attention_inputs(s, b, heads, hd, masked, seed, device, dtype)
    seed_t = torch.tensor([seed + 1000], dtype=torch.int64, device=device)
    bits = drop_mask_kernels.drop_bits(seed_t, b * heads * s, s, p, 0) if p else None
    saved = []

    def ours(qkv, projection):
        if projection is not None:
            x_, w_, b_ = projection
            return attention_kernels.projected_attention(x_, w_, b_, kv, seed_t, heads, hd, p)
        out, _, mask = attention_kernels.flash_attention(qkv, kv, seed_t, heads, hd, p, 0)
        saved.append(mask)
        return out

    errs = _errors(ours, x, w, bias, dout, _attention_references(x, w, bias, dout, kv, bits, heads, hd, p))
    if p and not torch.equal(saved[0], bits):
        raise SystemExit("FAIL attention: the forward's saved mask is not drop_bits' mask for the same seed")
    return errs


def sdpa_errors(s: int, b: int, heads: int, hd: int, masked: bool, seed: int, device: str,
                dtype: torch.dtype) -> dict:
    """``attention_errors``' numbers for torch's SDPA (cuDNN on GPU) on the same inputs, no dropout
    (its mask cannot be reproduced): the bar our kernels are held to."""
    import torch.nn.functional as F

    x, w, bias, dout, kv = _attention_inputs(s, b, heads, hd, masked, seed, device, dtype)
    mask = None if kv is None else kv[:, None, None, :]

    def sdpa(qkv, _projection):
        q, k, v = (t.permute(1, 2, 0, 3) for t in attention_kernels._views(qkv, heads, hd))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).permute(2, 0, 1, 3).reshape(s, b, -1)

    return _errors(sdpa, x, w, bias, dout, _attention_references(x, w, bias, dout, kv, None, heads, hd, 0.0))


def check_attention(s: int, b: int, heads: int, hd: int, p: float, masked: bool, seed: int) -> None:
    errs = attention_errors(s, b, heads, hd, p, masked, seed)
    if max(errs.values()) > 1e-5:  # fp32 kernels against float64
        raise SystemExit(f"FAIL attention {s=} {b=} {heads=} {hd=} {p=} {masked=}: {errs}")
    print(f"OK interpret attention s={s} b={b} heads={heads} hd={hd} p={p} masked={masked}: context and all grads "
          f"within {max(errs.values()):.1e} of float64 (same dropout mask)")


def errors_over_dirty_partials(s: int, b: int, heads: int, hd: int, p: float, masked: bool, seed: int,
                               device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    """``attention_errors`` with the bias-grad partial sums allocated full of NaNs and the dk/dv kernel
    on 128-key blocks (two partial rows each, the second written as zeros), the dq kernel on 64-query
    blocks: the backward must write every row whatever its tiles (no zero-fill before it)."""
    bk = attention_backward_kernels
    dkdv, alloc = bk._bwd_dkdv_kernel, attention_kernels.bias_partials
    wide = [c for c in bk._bwd_configs() if c.kwargs["BLOCK_N"] > bk.PARTIAL_ROWS]
    configs, dkdv.configs, dkdv.cache = dkdv.configs, wide[:1], {}
    attention_kernels.bias_partials = lambda *args: alloc(*args).fill_(float("nan"))
    try:
        return attention_errors(s, b, heads, hd, p, masked, seed, device, dtype)
    finally:
        dkdv.configs, dkdv.cache, attention_kernels.bias_partials = configs, {}, alloc


def check_attention_partials(seed: int) -> None:
    errs = errors_over_dirty_partials(80, 3, 2, 16, 0.3, True, seed)
    if not errs["dbias"] <= 1e-5:  # NaN fails too
        raise SystemExit(f"FAIL attention bias grad on a buffer of NaNs, 128-key blocks: {errs}")
    print(f"OK interpret attention bias grad with 128-key dk/dv blocks over a buffer of NaNs: within "
          f"{errs['dbias']:.1e} of float64")


def mask_statistics(rows: int, s: int, p: float, seed: int, device: str = "cpu") -> str:
    """Empty when ``drop_bits`` drops each position independently with probability p: overall rate
    within 5σ, per-position (column) rates within 5σ, per-row counts with the binomial variance (±15%),
    neighbours uncorrelated (lag-1 correlation within 5σ), a pure function of the seed, and another
    salt an independent mask (2p(1-p) of the positions differ), the same mask when written over a
    buffer of ones (the kernel zeroes the words it draws no drop in). Otherwise says what is wrong."""
    seed_t = torch.tensor([seed], dtype=torch.int64, device=device)
    bits = drop_mask_kernels.drop_bits(seed_t, rows, s, p, 0)
    dirty = torch.full_like(bits, -1)
    over_ones = drop_mask_kernels.drop_bits(seed_t, rows, s, p, 0, out=dirty)
    drop = (~drop_mask_kernels.keep_from_bits(bits, s)).double()
    n = drop.numel()
    rate, sd = drop.mean().item(), (p * (1 - p) / n) ** 0.5
    cols = drop.mean(0)
    col_sd = (p * (1 - p) / rows) ** 0.5
    var = drop.sum(1).var().item()
    lag = ((drop[:, 1:] - p) * (drop[:, :-1] - p)).mean().item() / (p * (1 - p))
    lag_sd = (1.0 / (rows * (s - 1))) ** 0.5
    other = (~drop_mask_kernels.keep_from_bits(drop_mask_kernels.drop_bits(seed_t, rows, s, p, 1), s)).double()
    differ = (other != drop).double().mean().item()
    checks = [(abs(rate - p) < 5 * sd, f"drop rate {rate:.6f} for p={p}"),
              ((cols - p).abs().max().item() < 5 * col_sd,
               f"a position's drop rate off by {(cols - p).abs().max():.4f}"),
              (abs(var / (s * p * (1 - p)) - 1) < 0.15, f"per-row count variance {var:.2f} vs {s * p * (1 - p):.2f}"),
              (abs(lag) < 5 * lag_sd, f"lag-1 correlation {lag:.4f}"),
              (torch.equal(bits, drop_mask_kernels.drop_bits(seed_t, rows, s, p, 0)), "not a function of the seed"),
              (over_ones is dirty and torch.equal(over_ones, bits), "words left over from the buffer's old contents"),
              (abs(differ - 2 * p * (1 - p)) < 5 * (2 * p * (1 - p) / n) ** 0.5, f"salt 1 differs at {differ:.4f}")]
    return "; ".join(msg for ok, msg in checks if not ok)


def check_attention_mask(rows: int, s: int, p: float, seed: int) -> None:
    wrong = mask_statistics(rows, s, p, seed)
    if wrong:
        raise SystemExit(f"FAIL attention dropout mask {rows=} {s=} {p=}: {wrong}")
    print(f"OK interpret attention dropout mask {rows}x{s} p={p}: rate, per-position rates, row-count variance, "
          f"lag-1 correlation, determinism and salts as for independent Bernoulli(p) drops")


def _within_ulp(a: torch.Tensor, ref: torch.Tensor) -> bool:
    """bf16 ``a`` equals fp32 ``ref`` rounded, give or take one bf16 ulp (the interpreter rounds
    halves up where the GPU rounds to nearest even)."""
    ulp = (ref.abs() * 2.0 ** -7).clamp(min=2.0 ** -126)
    return bool(((a.float() - ref).abs() <= ulp).all())


def check_bias_dropout_add(shape: tuple, p: float, salt: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, r, dy = (torch.randn(shape, generator=g).bfloat16() for _ in range(3))
    b = torch.randn(shape[-1], generator=g).bfloat16()
    s = torch.tensor([987654321 + seed], dtype=torch.int64)
    out, keep = dropout_kernels.bias_dropout_add(x, b, r, s, p, salt)
    if not torch.equal(keep.flatten(), dropout_kernels.keep_mask(s, x.numel(), p, salt)):
        raise SystemExit(f"FAIL bias_dropout_add {shape}: its mask is not keep_mask's for the same seed")
    scale = 1.0 / (1.0 - p)
    want = r.float() + torch.where(keep, (x.float() + b.float()) * scale, 0.0)
    if out.dtype != torch.bfloat16 or not _within_ulp(out, want):
        raise SystemExit(f"FAIL bias_dropout_add {shape}: out is not residual + (x + b)·keep/(1-p)")
    xt, bt, rt = (t.clone().requires_grad_() for t in (x, b, r))
    dropout_kernels.bias_dropout_add(xt, bt, rt, s, p, salt)[0].backward(dy)
    want_dx = torch.where(keep, dy.float() * scale, 0.0)
    want_db = want_dx.bfloat16().float().reshape(-1, shape[-1]).sum(0)  # eager: the bf16 grad, summed in fp32
    if not (_within_ulp(xt.grad, want_dx) and _within_ulp(bt.grad, want_db) and torch.equal(rt.grad, dy)):
        raise SystemExit(f"FAIL bias_dropout_add backward {shape}: the grads of x, bias or residual differ")
    kept = keep.float().mean().item()
    print(f"OK interpret bias_dropout_add {shape} p={p} salt={salt}: mask = keep_mask's, out, dx, dbias "
          f"within one bf16 ulp, kept {kept:.3f}")


def _close(a: torch.Tensor, ref: torch.Tensor, rel_floor: float) -> bool:
    """bf16 ``a`` within one bf16 ulp of float64 ``ref``, plus ``rel_floor`` times ref's largest
    magnitude (fp32 cancellation in sums over a row)."""
    ulp = ref.abs() * 2.0 ** -7 + rel_floor * ref.abs().max()
    return bool(((a.double() - ref).abs() <= ulp).all())


def check_residual_norm(shape: tuple, p: float, salt: int, seed: int, grad_h: bool, device: str = "cpu") -> None:
    """residual_norm_kernels against float64 (also run on the GPU by tests/test_gpu.py)."""
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]
    y, r, dln, dh = (torch.randn(shape, generator=g).bfloat16().to(device) for _ in range(4))
    b, nb, w = (t.bfloat16().to(device) for t in (0.5 * torch.randn(n, generator=g), 0.2 * torch.randn(n, generator=g),
                                                  1 + 0.3 * torch.randn(n, generator=g)))
    s = torch.tensor([123456789 + seed], dtype=torch.int64, device=device)
    leaves = [t.clone().requires_grad_() for t in (y, b, r, w, nb)]
    yt, bt, rt, wt, nbt = leaves
    h, normed, keep, mean, rstd = residual_norm_kernels.residual_norm_with_stats(yt, bt, rt, s, p, salt, wt, nbt, 1e-5)
    scale = 1.0 / (1.0 - p)
    want_h = r.float() + torch.where(keep, (y.float() + b.float()) * scale, 0.0)
    h64 = h.detach().double().requires_grad_()  # the LayerNorm normalises the stored (rounded) h
    w64, nb64 = (t.double().requires_grad_() for t in (w, nb))
    ln64 = torch.nn.functional.layer_norm(h64, (n,), w64, nb64, 1e-5)
    stats_ok = torch.allclose(mean.double().squeeze(-1), h64.mean(-1), atol=1e-5) and torch.allclose(
        rstd.double().squeeze(-1), (h64.var(-1, unbiased=False) + 1e-5).rsqrt(), rtol=1e-5)
    if not (_within_ulp(h, want_h) and _close(normed, ln64, 1e-6) and stats_ok):
        raise SystemExit(f"FAIL residual_norm {shape} p={p}: h, LN(h) or the statistics are off (stats ok {stats_ok})")
    kept = keep.float().mean().item()
    if p == 0 and not bool(keep.all()) or p > 0 and abs(kept - (1 - p)) > 5 * (p * (1 - p) / keep.numel()) ** 0.5:
        raise SystemExit(f"FAIL residual_norm {shape} p={p}: kept {kept:.4f}")
    # elements drawn by one Philox call (a quarter of the tile apart) or side by side agree as
    # independent draws do, p² + (1 - p)² of the time (a word used twice would agree always)
    flat, q, agree = keep.reshape(-1, n), max(1 << (n - 1).bit_length() >> 2, 1), p * p + (1 - p) ** 2
    for d in sorted({1, q, 2 * q}):
        if 0 < p < 1 and d < n:
            same = (flat[:, d:] == flat[:, :-d]).double()
            if abs(same.mean().item() - agree) > 5 * (agree * (1 - agree) / same.numel()) ** 0.5:
                raise SystemExit(f"FAIL residual_norm {shape} p={p}: masks {d} columns apart agree at "
                                 f"{same.mean().item():.4f}, independent draws at {agree:.4f}")
    torch.autograd.backward((normed, h) if grad_h else (normed,), (dln, dh) if grad_h else (dln,))
    ln64.backward(dln.double())
    want_dres = h64.grad + (dh.double() if grad_h else 0.0)
    want_dy = torch.where(keep, rt.grad.double() * scale, 0.0)  # of the rounded grad of h, as autograd does
    want_db = yt.grad.double().reshape(-1, n).sum(0)
    errs = {"d residual": _close(rt.grad, want_dres, 1e-5), "d y": _close(yt.grad, want_dy, 0.0),
            "d bias": _close(bt.grad, want_db, 1e-6), "d weight": _close(wt.grad, w64.grad, 1e-5),
            "d norm bias": _close(nbt.grad, nb64.grad, 1e-6)}
    if not all(errs.values()):
        raise SystemExit(f"FAIL residual_norm backward {shape} p={p} grad_h={grad_h}: {errs}")
    print(f"OK {device} residual_norm {shape} p={p} salt={salt} grad_h={grad_h}: h = r + (y + b)·keep/(1-p), "
          f"LN(h), statistics and the five grads within one bf16 ulp of float64, kept {kept:.3f}")


def encoder_both_paths(enc, x: torch.Tensor, mask, dctx, dout: torch.Tensor, rows=None):
    """``enc``'s output, input grad and parameter grads (fp32) on its plain path, then on its fused path
    (the layers' ``residual_norm`` off, then on), with their names: for this file and tests/test_gpu.py.
    With ``rows [b, n]`` the fused path runs its last layer at those positions only, and the plain
    path's full output is taken there."""
    from megatron_bert.model.transformer import row_index, take_rows

    runs = []
    for fused_path in (False, True):
        for layer in enc.layers:
            layer.residual_norm = fused_path
        enc.zero_grad()
        xt = x.clone().requires_grad_()
        out = enc(xt, mask, dctx, rows if fused_path else None)
        if rows is not None and not fused_path:
            out = take_rows(out, row_index(rows, x.shape[1]))
        out.backward(dout)
        runs.append([out.detach().float(), xt.grad.float()] + [p.grad.float() for p in enc.parameters()])
    return ["output", "d input"] + [n for n, _ in enc.named_parameters()], runs[0], runs[1]


def check_encoder_fused(layers: int, seed: int) -> None:
    """The encoder's fused path (each residual epilogue and the next LayerNorm in one kernel each way,
    LN(x) handed from layer to layer) computes what its plain path computes: output and every grad,
    fp32, dropout off (the compiled epilogues of the GPU path are swapped for their eager functions)."""
    from megatron_bert.config import ModelConfig, ModelRuntime
    from megatron_bert.model import fused
    from megatron_bert.model.dropout import DropoutContext
    from megatron_bert.model.transformer import TransformerEncoder
    from parallel import ParallelState
    from parallel.init import normal_init

    torch.manual_seed(seed)
    cfg = ModelConfig(num_layers=layers, hidden_size=64, num_attention_heads=2, vocab_size=128,
                      hidden_dropout=0.0, attention_dropout=0.0)
    enc = TransformerEncoder(cfg, ModelRuntime(dropout_impl="native", fuse_elementwise=True),
                             ParallelState.single("cpu"), normal_init(0.02), normal_init(0.02))
    for p_ in enc.parameters():  # LayerNorms away from (1, 0), so their grads are not trivial
        p_.data.add_(0.1 * torch.randn_like(p_))
    for layer in enc.layers:
        layer.mlp.bias_act, layer.fused_bda = fused.bias_gelu, fused.bias_dropout_add
    dctx = DropoutContext(training=True, impl="native", seed=0, sample_ids=None, seq_len=12, seq_offset=0)
    x = torch.randn(12, 3, 64)
    mask = torch.ones(3, 1, 12, 12, dtype=torch.bool)
    mask[1, ..., 9:] = False  # one padded sequence
    dout = torch.cos(torch.arange(x.numel(), dtype=torch.float32)).view_as(x)
    names, plain, fused_path = encoder_both_paths(enc, x, mask, dctx, dout)
    # and its last layer pruned to 4 rows per sample ([CLS] first, a repeat, a key-padding mask)
    rows = torch.tensor([[0, 3, 7, 11], [0, 1, 8, 0], [0, 5, 6, 2]])
    names_rows, plain_rows, fused_rows = encoder_both_paths(enc, x, mask[:, :, :1], dctx, dout[:4], rows)
    for what, pairs in (("", zip(names, fused_path, plain)), (" pruned", zip(names_rows, fused_rows, plain_rows))):
        for name, a, ref in pairs:
            err = _rel(a, ref.double())
            if err > 1e-5:
                raise SystemExit(f"FAIL encoder fused path{what} ({layers} layers): {name} off the plain path by {err:.3g}")
    print(f"OK interpret encoder fused path ({layers} layers, fp32, padded batch; and its last layer at 4 rows "
          f"per sample): output and {len(names) - 1} grads within 1e-5 of the plain path")


def check_encoder_seeds(layers: int, seed: int) -> None:
    """With dropout on, the fused encoder draws its layers' mask seeds in one ``[layers, 3]`` draw and
    site j of layer i (0 attention probabilities, 1 and 2 the residual epilogues) masks with seeds[i, j]:
    its output is bitwise that of the same layers drawing a seed per site, when those draws return the
    same numbers in that order. Our attention kernels are on (fp32 let through for the interpreter)."""
    from megatron_bert.config import ModelConfig, ModelRuntime
    from megatron_bert.model import dropout as dropout_mod
    from megatron_bert.model.dropout import DropoutContext
    from megatron_bert.model.transformer import TransformerEncoder
    from parallel import ParallelState
    from parallel.init import normal_init

    supports, attention_kernels.supports = attention_kernels.supports, lambda *args: True
    draw = dropout_mod.draw_seed
    try:
        torch.manual_seed(seed)
        cfg = ModelConfig(num_layers=layers, hidden_size=64, num_attention_heads=2, vocab_size=128,
                          hidden_dropout=0.3, attention_dropout=0.3)
        enc = TransformerEncoder(cfg, ModelRuntime(dropout_impl="native", fuse_elementwise=True),
                                 ParallelState.single("cpu"), normal_init(0.02), normal_init(0.02))
        for layer in enc.layers:  # the GPU path (set at construction where Triton has a GPU)
            layer.residual_norm = layer.attention.flash = True
        dctx = DropoutContext(training=True, impl="native", seed=0, sample_ids=None, seq_len=12, seq_offset=0)
        x = torch.randn(12, 3, 64)
        mask = torch.ones(3, 1, 1, 12, dtype=torch.bool)
        mask[1, ..., 9:] = False
        torch.manual_seed(seed + 1)
        seeds = torch.randint(0, 1 << 62, (layers, 3), dtype=torch.int64)
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            out = enc(x, mask, dctx)
            queue = list(seeds.flatten().split(1))
            dropout_mod.draw_seed = lambda device: queue.pop(0)
            h, normed = x, enc.layers[0]._norm(enc.layers[0].input_layernorm, x)
            nexts = [layer.input_layernorm for layer in enc.layers[1:]] + [enc.final_layernorm]
            for layer, next_norm in zip(enc.layers, nexts):
                h, normed = layer.forward_fused(h, normed, mask, dctx, next_norm)
            other = enc(x, mask, dctx)  # a new draw: other masks
    finally:
        attention_kernels.supports, dropout_mod.draw_seed = supports, draw
    if queue or not torch.equal(out, normed):
        raise SystemExit(f"FAIL encoder seeds: {len(queue)} per-site seeds unused, or the outputs differ "
                         f"by {(out - normed).abs().max().item():.3g}")
    if torch.equal(out, other):
        raise SystemExit("FAIL encoder seeds: a second forward drew the same masks")
    print(f"OK interpret encoder seeds ({layers} layers, dropout on, our attention kernels): one [layers, 3] "
          f"draw per forward, site j of layer i masked with seeds[i, j]")


def check_attention_tp() -> None:
    """The attention layer on our kernels at TP=2, ± sequence parallel (2 gloo ranks: tests/model_checks.py)."""
    import model_checks
    from dist_harness import run_distributed

    reports = run_distributed(2, 2, model_checks.check_flash_attention_tp, timeout=600)
    worst = max(v for r in reports for v in r.values())
    print(f"OK interpret attention layer at TP=2 (± sequence parallel, padded batch): output and grads within "
          f"{worst:.1e} of TP=1's SDPA path, each rank's dropout mask drop_bits(seed, salt=TP rank)")


def interpret() -> None:
    # The interpreter cannot time autotune candidates: keep one tile shape of each kernel.
    walk = gelu_kernels._fwd_kernel.configs[-1]  # the forward's row walk (its first config is one-shot)
    assert walk.kwargs["ROWS_PER_PROGRAM"] > walk.kwargs["SUB_M"]
    for kernel in (gelu_kernels._fwd_kernel, gelu_kernels._bwd_kernel, layernorm_kernels._layer_norm_fwd_kernel,
                   residual_norm_kernels._fwd_kernel, residual_norm_kernels._bwd_kernel,
                   attention_kernels._fwd_kernel, attention_backward_kernels._bwd_dq_kernel,
                   attention_backward_kernels._bwd_dkdv_kernel, drop_mask_kernels._drop_bits_kernel):
        kernel.configs = kernel.configs[:1]
    check_gelu(128 + 69, 256, 0)      # a ragged last program (69 rows: its last sub-block part-filled)
    check_gelu(100, 192, 1)           # columns not a multiple of the tile
    gelu_kernels._fwd_kernel.configs, gelu_kernels._fwd_kernel.cache = [walk], {}
    check_gelu(128 + 69, 600, 2)      # the forward walking rows too
    check_layer_norm((37, 3, 1024), 8)  # 111 rows: a ragged last program whatever its row count
    check_layer_norm((50, 96), 9)       # a row narrower than its power-of-two tile
    check_column_sum(600, 40, 6)      # rows in three loads (256 + 256 + 88), columns not a multiple of 16
    check_column_sum(3, 16, 7)        # fewer rows than a tile
    check_qkv_pack(8, 3, 2, 16, 2)    # tokens (24) fewer than a block
    check_qkv_pack(40, 4, 3, 32, 3)   # 160 tokens: 2.5 blocks
    check_bias_dropout_add((70, 3, 96), 0.1, 0, 4)   # 20160 elements: a ragged last program, rows % 64 != 0
    check_bias_dropout_add((16, 2, 256), 0.5, 1, 5)  # salted
    check_residual_norm((45, 3, 256), 0.1, 0, 10, True)   # 135 rows: ragged programs (8 of 17 rows)
    check_residual_norm((7, 2, 96), 0.0, 0, 11, False)    # a row narrower than its tile, nothing dropped
    check_residual_norm((16, 4, 128), 0.5, 3, 12, False)  # salted, no grad of h (the last layer's epilogue)
    check_encoder_fused(2, 13)
    check_encoder_seeds(2, 19)
    check_attention(64, 2, 2, 16, 0.0, False, 14)
    check_attention(80, 3, 2, 16, 0.3, True, 15)   # a ragged last block, padding keys, a one-token sample
    check_attention_partials(18)
    check_attention_mask(2048, 512, 0.1, 16)
    check_attention_mask(2048, 96, 0.5, 17)        # a row of three words
    check_attention_tp()
    check_embedding_grad()


def compile_sm90() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    def build(kernel, types: dict, consts: dict, warps: int = 4, divisible=()):
        sig = {k: ("constexpr" if k in consts else types.get(k, "i32")) for k in kernel.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, k in enumerate(kernel.arg_names)
                 if k.endswith("_ptr") or k in divisible}  # as the JIT marks integers divisible by 16
        src = ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
        print(f"OK compile sm90: {kernel.fn.__name__} {consts}: {len(k.asm['cubin'])} bytes of cubin")
        return k

    def disassemble(k) -> str:
        nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            return subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout

    def fp32_selects(k, name: str) -> None:
        # The dropout selects stay in fp32 (drop_mask_kernels.zero_dropped): a select moved past the bf16
        # cast shows as PRMTs (halves taken out of and put back into packed pairs), ~40 a loop, none otherwise.
        sass = disassemble(k)
        if " PRMT " in sass:
            raise SystemExit(f"FAIL: {name}'s dropout select runs on packed bf16 halves "
                             f"({sass.count(' PRMT ')} PRMTs in its sm90 SASS)")
        print(f"OK compile sm90: {name} with dropout selects in fp32 (no PRMT in its SASS)")

    bf = {"x_ptr": "*bf16", "b_ptr": "*bf16", "y_ptr": "*bf16", "g_ptr": "*bf16", "dx_ptr": "*bf16",
          "partial_ptr": "*fp32", "out_ptr": "*bf16", "q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16"}
    build(gelu_kernels._fwd_kernel.fn, bf, {"ROWS_PER_PROGRAM": 128, "SUB_M": 4, "BLOCK_N": 512}, 4)
    build(gelu_kernels._bwd_kernel.fn, bf, {"ROWS_PER_PROGRAM": 128, "SUB_M": 8, "BLOCK_N": 512}, 4)
    build(layernorm_kernels._layer_norm_fwd_kernel.fn, {**bf, "w_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
                                          "eps": "fp32"}, {"N_COLS": 1024, "BLOCK_N": 1024, "ROWS": 4})
    build(triton_support._column_sum_kernel, bf, {"N_ROWS": 256, "BLOCK_R": 256, "BLOCK_N": 16})
    build(dropout_kernels._bda_fwd_kernel, {**bf, "r_ptr": "*bf16", "keep_ptr": "*i1", "seed_ptr": "*i64",
                                            "scale": "fp32"},
          {"N_COLS": 1024, "BLOCK": dropout_kernels._BLOCK})
    rn = {**bf, "r_ptr": "*bf16", "w_ptr": "*bf16", "lb_ptr": "*bf16", "h_ptr": "*bf16", "keep_ptr": "*i8",
          "ln_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "seed_ptr": "*i64", "scale": "fp32",
          "eps": "fp32", "dln_ptr": "*bf16", "dres_ptr": "*bf16", "dy_ptr": "*bf16"}
    build(residual_norm_kernels._fwd_kernel.fn, rn, {"N_COLS": 1024, "Q": 256, "DROP": True, "ROWS": 4}, 4)
    build(residual_norm_kernels._bwd_kernel.fn, rn, {"N_COLS": 1024, "BLOCK_N": 1024, "HAS_DRES": True,
                                                     "ROWS_PER_PROGRAM": 32, "ROWS": 1}, 4)
    k = build(qkv_kernels._pack_kernel, {**bf, "n_tokens": "i64", "batch": "i64"},
              {"HEADS": 16, "HEAD_DIM": 64, "ROWS": qkv_kernels._ROWS})
    if "st.global.v4.b32" not in k.asm["ptx"] and "st.global.v2.b32" not in k.asm["ptx"]:
        raise SystemExit("FAIL: the packed gradient is not stored with vector stores")
    at = {**bf, "o_ptr": "*bf16", "do_ptr": "*bf16", "dq_ptr": "*bf16", "dk_ptr": "*bf16", "dv_ptr": "*bf16",
          "lse_ptr": "*fp32", "delta_ptr": "*fp32", "bits_ptr": "*i32", "kv_ptr": "*i1", "db_ptr": "*fp32",
          "seed_ptr": "*i64", "qk_scale": "fp32", "keep_scale": "fp32", "sm_scale": "fp32", "inv_log_keep": "fp32"}
    k = build(drop_mask_kernels._drop_bits_kernel.fn, at, {"S_K": 512, "WORDS": 16, "ROWS": 32}, 1)
    lg2 = disassemble(k).count("MUFU.LG2")
    if lg2 != 4:  # one per Philox word of the loop (drop_mask_kernels.fast_log2)
        raise SystemExit(f"FAIL: _drop_bits_kernel takes {lg2} SFU logarithms a loop, not 4 (a software log2?)")
    print("OK compile sm90: _drop_bits_kernel's logarithms on the SFU (4 MUFU.LG2)")
    strides = ("s_s", "s_b", "s_h", "o_s", "o_b", "o_h", "n_rows")
    bk = attention_backward_kernels
    for drop, masked in ((True, False), (False, True)):
        c = dict(S_Q=512, S_K=512, HEAD_DIM=64, WORDS=16, DROPOUT=drop, KEY_MASK=masked)
        for i, cfg in enumerate(attention_kernels._fwd_configs()):
            k = build(attention_kernels._fwd_kernel.fn, at, {**c, **cfg.kwargs}, cfg.num_warps, strides)
            if drop and i == 0:
                fp32_selects(k, "_fwd_kernel")
        for cfg in bk._bwd_configs()[:1]:
            build(bk._bwd_dq_kernel.fn, at, {**c, "BIAS_GRAD": True, **cfg.kwargs}, cfg.num_warps, strides)
        for i, cfg in enumerate(bk._bwd_configs()[::2]):  # 64- and 128-key blocks
            k = build(bk._bwd_dkdv_kernel.fn, at, {**c, "BIAS_GRAD": True, **cfg.kwargs}, cfg.num_warps, strides)
            if drop and i == 0:
                fp32_selects(k, "_bwd_dkdv_kernel")
    ek = embedding_kernels
    emb = {"ids_ptr": "*i16", "perm_ptr": "*i64", "grad_ptr": "*bf16", "out_ptr": "*bf16", "heads_ptr": "*fp32",
           "tails_ptr": "*fp32"}
    build(ek._chunk_sums_kernel, emb, {"CHUNK": ek.CHUNK, "BLOCK_H": ek.BLOCK_H}, ek.NUM_WARPS, ("hidden",))
    build(ek._carry_kernel, emb, {"CHUNK": ek.CHUNK, "BLOCK_H": ek.BLOCK_H, "AHEAD": ek.CARRY_AHEAD}, ek.NUM_WARPS,
          ("hidden",))

if __name__ == "__main__":
    {"interpret": interpret, "compile": compile_sm90}[sys.argv[1]]()
