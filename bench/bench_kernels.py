"""Floors of the pieces of one BERT layer step on this GPU (bf16): GEMMs, attention backends,
LayerNorm, fused AdamW. Prints ``KERNEL {json}`` lines (median of CUDA-event timings).

    python bench/bench_kernels.py --hidden 1024 --heads 16 --seq 512 --batch 32
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F


def timed(fn, warm=5, iters=20) -> float:
    """Median milliseconds of fn() over ``iters`` runs (CUDA events)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def report(what, ms, flops=None, nbytes=None, **kw):
    r = {"what": what, "ms": round(ms, 4), **kw}
    if flops:
        r["tflops"] = round(flops / ms / 1e9, 1)
    if nbytes:
        r["gb_per_s"] = round(nbytes / ms / 1e6, 1)
    print("KERNEL", json.dumps(r), flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--params", type=float, default=335e6)
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    h, s, b, nh = a.hidden, a.seq, a.batch, a.heads
    hd, t = h // nh, s * b
    x = torch.randn(t, h, device=dev, dtype=dt)
    for name, n_out, k in (("qkv", 3 * h, h), ("proj", h, h), ("fc1", 4 * h, h), ("fc2", h, 4 * h)):
        inp = torch.randn(t, k, device=dev, dtype=dt)
        w = torch.randn(n_out, k, device=dev, dtype=dt) * 0.02
        g = torch.randn(t, n_out, device=dev, dtype=dt)
        fl = 2 * t * n_out * k
        report(f"gemm_{name}_fwd", timed(lambda: F.linear(inp, w)), fl, shape=[t, n_out, k])
        report(f"gemm_{name}_dgrad", timed(lambda: g @ w), fl)
        report(f"gemm_{name}_wgrad", timed(lambda: g.t() @ inp), fl)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qkv = torch.randn(s, b, nh, 3, hd, device=dev, dtype=dt, requires_grad=True)  # our [s, b, heads, 3, hd]
    att_fl = 4 * b * s * s * h
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        for p_drop in (0.0, 0.1):
            for layout in ("sbh", "bsh"):
                if layout == "sbh":
                    q, k, v = qkv.permute(3, 1, 2, 0, 4).unbind(0)  # strided views
                else:
                    base = torch.randn(b, s, 3, nh, hd, device=dev, dtype=dt, requires_grad=True)
                    q, k, v = base.permute(2, 0, 3, 1, 4).unbind(0)
                go = torch.randn(b, nh, s, hd, device=dev, dtype=dt)
                try:
                    with sdpa_kernel([getattr(SDPBackend, backend)]):
                        fwd = timed(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop))

                        def fb():
                            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p_drop)
                            torch.autograd.grad(out, (q, k, v), go)
                        both = timed(fb)
                    report(f"sdpa_{backend.split('_')[0].lower()}_p{p_drop}_{layout}_fwd", fwd, att_fl)
                    report(f"sdpa_{backend.split('_')[0].lower()}_p{p_drop}_{layout}_fwdbwd", both, 3.5 * att_fl)
                except Exception as e:  # a backend that does not take these inputs
                    print("KERNEL", json.dumps({"what": f"sdpa_{backend}_p{p_drop}_{layout}", "error": str(e)[:160]}))

    ln = torch.nn.LayerNorm(h, device=dev, dtype=dt)
    xr = x.clone().requires_grad_(True)
    gy = torch.randn_like(x)
    report("layernorm_fwd", timed(lambda: ln(xr)), nbytes=2 * x.numel() * 2)
    report("layernorm_fwdbwd", timed(lambda: torch.autograd.grad(ln(xr), (xr,), gy)), nbytes=6 * x.numel() * 2)
    big = torch.randn(t, 4 * h, device=dev, dtype=dt)
    report("gelu_fwd_4h", timed(lambda: F.gelu(big)), nbytes=2 * big.numel() * 2)
    report("dropout_add_h", timed(lambda: x + F.dropout(x, 0.1, True)), nbytes=3 * x.numel() * 2)

    n = int(a.params)
    chunks = [torch.randn(n // 64, device=dev) for _ in range(64)]
    params = [torch.nn.Parameter(c) for c in chunks]
    for q_ in params:
        q_.grad = torch.randn_like(q_)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    report("fused_adamw_fp32", timed(opt.step), nbytes=n * 28)
    report("foreach_norm_fp32", timed(lambda: torch._foreach_norm([q_.grad for q_ in params])), nbytes=n * 4)
    src = torch.randn(n, device=dev, dtype=dt)
    report("bf16_to_fp32", timed(lambda: src.float()), nbytes=n * 6)
    copy_src, copy_dst = torch.randn(n, device=dev), torch.empty(n, device=dev)
    report("copy_fp32", timed(lambda: copy_dst.copy_(copy_src)), nbytes=n * 8)
    big_a = torch.randn(8192, 8192, device=dev, dtype=dt)
    big_b = torch.randn(8192, 8192, device=dev, dtype=dt)
    report("gemm_8192_cube", timed(lambda: big_a @ big_b), 2 * 8192**3)


if __name__ == "__main__":
    main()
