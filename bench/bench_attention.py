"""Our Triton attention (attention_kernels.py, its backward in attention_backward_kernels.py) against
cuDNN's fused attention on this GPU (bf16).

    python bench/bench_attention.py --seq 512 --batch 32 --heads 16 --head-dim 64

First the accuracy at a small batch (ours and cuDNN against float64, the same dropout mask for ours
and the reference), then ``KERNEL {json}`` lines: median ms of each kernel and of forward + backward
with and without dropout, and each autotuned kernel's per-tile timings.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_kernels import report  # noqa: E402
from megatron_bert.model import attention_backward_kernels as bk  # noqa: E402
from megatron_bert.model import attention_kernels as ak  # noqa: E402
from megatron_bert.model import drop_mask_kernels as dm  # noqa: E402


def _cudnn(qkv, heads, hd, p, key_valid=None):
    s, b, _ = qkv.shape
    q, k, v = (t.permute(1, 2, 0, 3) for t in ak._views(qkv, heads, hd))  # [b, heads, s, hd] views
    mask = None if key_valid is None else key_valid[:, None, None, :]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION] if mask is None else [SDPBackend.CUDNN_ATTENTION,
                                                                        SDPBackend.EFFICIENT_ATTENTION]):
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    return o.permute(2, 0, 1, 3).reshape(s, b, heads * hd)


def accuracy(s, b, heads, hd):
    g = torch.Generator(device="cuda").manual_seed(0)
    for p, masked in ((0.0, False), (0.1, False), (0.1, True)):
        qkv = (torch.randn(s, b, heads * 3 * hd, device="cuda", generator=g) * 1.5).bfloat16().requires_grad_(True)
        kv = None
        if masked:
            kv = torch.ones(b, s, dtype=torch.bool, device="cuda")
            kv[0, s // 3:] = False
        seed = torch.tensor([99], dtype=torch.int64, device="cuda")
        out, _, bits = ak.flash_attention(qkv, kv, seed, heads, hd, p, 0)
        dout = torch.randn_like(out)
        out.backward(dout)
        bits = bits if p else None
        q64 = qkv.detach().double().requires_grad_(True)
        ref = ak.reference(q64, kv, bits, heads, hd, p)
        ref.backward(dout.double())
        rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731
        line = {"p": p, "masked": masked, "ours_out": rel(out, ref), "ours_dqkv": rel(qkv.grad, q64.grad)}
        if p == 0.0:  # cuDNN on the same inputs (its dropout mask cannot be reproduced)
            qkv.grad = None
            o2 = _cudnn(qkv, heads, hd, 0.0, kv)
            o2.backward(dout)
            line.update(cudnn_out=rel(o2, ref), cudnn_dqkv=rel(qkv.grad, q64.grad))
        if bits is not None:
            line["drop_fraction"] = 1.0 - dm.keep_from_bits(bits, s).double().mean().item()
        print("ACCURACY", json.dumps({k: (round(v, 8) if isinstance(v, float) else v) for k, v in line.items()}),
              flush=True)


def timed(fn, iters: int = 10) -> float:
    """Milliseconds of GPU kernel time per call of fn (profiler): launch overheads do not count, so
    calls of ~0.1 ms that the host cannot keep up with are still timed right. Prints the kernels."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    parts = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us and e.device_type.name == "CUDA":
            total += us
            parts.append((us / iters, e.key[:60]))
    print("  PARTS", "; ".join(f"{n}: {u:.1f} us" for u, n in sorted(parts, reverse=True)[:6]), flush=True)
    return total / iters / 1000.0


def timings(s, b, heads, hd, p, baseline=True):
    qkv = torch.randn(s, b, heads * 3 * hd, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
    seed = torch.tensor([5], dtype=torch.int64, device="cuda")
    flops_fwd = 4 * b * heads * s * s * hd
    shape = dict(s=s, b=b, heads=heads, hd=hd)
    for drop in ((p, 0.0) if baseline else (p,)):
        out, lse, bits = ak.flash_attention(qkv, None, seed, heads, hd, drop, 0)  # autotunes
        dout = torch.randn_like(out)
        dq = ak.flash_attention_backward(dout, qkv, out, lse, bits, None, heads, hd, drop, True)
        report(f"ours fwd p={drop}", timed(lambda: ak.flash_attention(qkv, None, seed, heads, hd, drop, 0)),
               flops=flops_fwd, **shape)
        report(f"ours bwd p={drop} (+ bias grad)", timed(lambda: ak.flash_attention_backward(
            dout, qkv, out, lse, bits, None, heads, hd, drop, True)),
               flops=2.5 * flops_fwd, **shape)
        if drop:
            report("ours mask kernel", timed(lambda: dm.drop_bits(seed, b * heads * s, s, drop, 0)),
                   nbytes=b * heads * s * s // 8, **shape)

        def ours_step():
            o, _, _ = ak.flash_attention(qkv, None, seed, heads, hd, drop, 0)
            o.backward(dout)
        report(f"ours fwd+bwd p={drop} (dqkv packed)", timed(ours_step), flops=3.5 * flops_fwd, **shape)
        report(f"cudnn fwd p={drop}", timed(lambda: _cudnn(qkv, heads, hd, drop)), flops=flops_fwd, **shape)

        def cudnn_step():
            _cudnn(qkv, heads, hd, drop).backward(dout)
        report(f"cudnn fwd+bwd p={drop} (autograd packs dqkv)", timed(cudnn_step), flops=3.5 * flops_fwd, **shape)
        del dq
        for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_drop_bits_kernel"):
            kern = getattr({"_drop_bits_kernel": dm, "_fwd_kernel": ak}.get(name, bk), name)
            for cfg, t in (getattr(kern, "configs_timings", None) or {}).items():
                print("TILE", f"p={drop}", name, str(cfg), t, flush=True)
            print("BEST", f"p={drop}", name, str(getattr(kern, "best_config", None)), flush=True)


def main():
    a = argparse.ArgumentParser()
    a.add_argument("--seq", type=int, default=512)
    a.add_argument("--batch", type=int, default=32)
    a.add_argument("--heads", type=int, default=16)
    a.add_argument("--head-dim", type=int, default=64)
    a.add_argument("--p", type=float, default=0.1)
    a.add_argument("--no-baseline", action="store_true", help="skip the runs without dropout")
    args = a.parse_args()
    accuracy(args.seq, 2, args.heads, args.head_dim)
    timings(args.seq, args.batch, args.heads, args.head_dim, args.p, not args.no_baseline)


if __name__ == "__main__":
    main()
