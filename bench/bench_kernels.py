"""Floors of the pieces of one BERT layer step on this GPU (bf16): GEMMs, attention backends,
LayerNorm, fused AdamW. Prints ``KERNEL {json}`` lines (median of CUDA-event timings).

    python bench/bench_kernels.py --hidden 1024 --heads 16 --seq 512 --batch 32
    python bench/bench_kernels.py --ours-only   # launch shapes of our flat AdamW and keep-mask kernels
    python bench/bench_kernels.py --gelu        # our bias + GeLU kernels (both ways) against torch's
    python bench/bench_kernels.py --residual-norm  # the fused epilogue + LayerNorm against the separate kernels
    python bench/bench_kernels.py --gemm-backends  # the layer's 12 GEMMs: cuBLAS, cuBLASLt, Inductor max-autotune
    python bench/bench_kernels.py --embedding   # the word embeddings' backward: ours against torch's
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

# this tree's package first, as the other bench scripts do (a copy of an older tree run beside this one
# must time its own kernels: bench/NOTES.md, session 15)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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
    p.add_argument("--ours-only", action="store_true", help="only the launch-shape sweep of our Triton kernels")
    p.add_argument("--gelu", action="store_true", help="only our bias + GeLU kernels, against torch's GeLU")
    p.add_argument("--residual-norm", action="store_true",
                   help="only the fused residual epilogue + LayerNorm kernels, against the separate ones")
    p.add_argument("--gemm-backends", action="store_true",
                   help="only the layer's GEMMs, under cuBLAS, cuBLASLt and Inductor's max-autotune")
    p.add_argument("--no-autotune", action="store_true", help="with --gemm-backends: the two BLAS libraries only")
    p.add_argument("--embedding", action="store_true", help="only the word embeddings' backward, ours and torch's")
    p.add_argument("--vocab", type=int, default=30592)
    a = p.parse_args()
    if a.embedding:
        return embedding_backward_timing(a.seq * a.batch, a.hidden, a.vocab)
    if a.gemm_backends:
        return gemm_backends(a.seq * a.batch, a.hidden, autotune=not a.no_autotune)
    if a.residual_norm:
        return residual_norm_timing(a.seq * a.batch, a.hidden)
    if a.ours_only:
        return our_kernel_shapes(int(a.params), a.seq * a.batch * a.hidden)
    if a.gelu:
        return gelu_kernels_timing(a.seq * a.batch, 4 * a.hidden)
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


def our_kernel_shapes(n_params: int, n_act: int) -> None:
    """Time the flat AdamW kernel over ``n_params`` elements (30 bytes each: fp32 grad, master and
    moments read, the three written back, bf16 weight written) and the dropout keep-mask kernel over
    an ``n_act``-element activation, for several programs sizes / warp counts."""
    from megatron_bert.model import dropout_kernels as dk
    from megatron_bert.training import flat_adamw as fa

    dev = "cuda"
    bufs = [torch.randn(n_params, device=dev) * 1e-2 for _ in range(3)] + [torch.rand(n_params, device=dev) * 1e-4]
    grad, master, m, v = bufs
    weight = torch.empty(n_params, device=dev, dtype=torch.bfloat16)
    step, lr = torch.zeros((), device=dev), torch.full((), 1e-4, device=dev)
    one, zero = torch.ones((), device=dev), torch.zeros((), device=dev)
    consts = fa.kernel_constexprs(0.9, 0.999, 0.01)
    for block in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            if block // (32 * warps) < 4:
                continue
            c = {**consts, "BLOCK": block}

            def launch():
                fa._adamw_kernel[(triton_cdiv(n_params, block),)](
                    master, grad, m, v, weight, step, lr, one, zero, n_params, 0.9, 0.1, 0.999, 0.001, 1e-8, 0.01,
                    **c, num_warps=warps, enable_fp_fusion=False)
            report("flat_adamw", timed(launch), nbytes=n_params * 30, block=block, warps=warps)
    del bufs, grad, master, m, v, weight
    seed = torch.tensor([1234], dtype=torch.int64, device=dev)
    mask = torch.empty(n_act, dtype=torch.bool, device=dev)
    thr = dk.drop_threshold(0.1)
    for block in (256, 512, 1024, 2048):
        for warps in (2, 4, 8):
            if block // (32 * warps) < 1:
                continue

            def launch():
                dk._keep_mask_kernel[(triton_cdiv(n_act, 4 * block),)](seed, mask, n_act, thr, 0, BLOCK=block,
                                                                        num_warps=warps)
            report("keep_mask", timed(launch), nbytes=n_act, block=block, warps=warps)


def gelu_kernels_timing(rows: int, n: int, calls: int = 20) -> None:
    """Our bias + GeLU forward (reads x, writes y) and backward (reads dy and x, writes dx, plus the
    bias grad), back to back ``calls`` times between two events so the launches overlap the kernels,
    against torch's GeLU alone. Which module ran is printed: point PYTHONPATH at an older tree for A/B."""
    from megatron_bert.model import gelu_kernels as gk

    dev, dt = "cuda", torch.bfloat16
    x, dy = (torch.randn(rows, n, device=dev, dtype=dt) for _ in range(2))
    b = torch.randn(n, device=dev, dtype=dt)

    def many(fn):
        return lambda: [fn() for _ in range(calls)]
    elems = rows * n
    for what, fn, nbytes in (("bias_gelu_fwd", lambda: gk.bias_gelu(x, b), 4 * elems),
                             ("bias_gelu_bwd", lambda: gk.bias_gelu_backward(dy, x, b), 6 * elems),
                             ("torch_gelu_fwd", lambda: F.gelu(x), 4 * elems)):
        report(what, timed(many(fn)) / calls, nbytes=nbytes, shape=[rows, n], module=gk.__file__)
    for name, kernel in (("bias_gelu_fwd", gk._fwd_kernel), ("bias_gelu_bwd", gk._bwd_kernel)):
        # the autotuner's own timings per tile shape (a list of quantiles, median first, or one number)
        timings = {cfg: ms[0] if isinstance(ms, list) else ms
                   for cfg, ms in (getattr(kernel, "configs_timings", None) or {}).items()}
        for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1]):
            report(f"{name}_tile", ms, nbytes=(4 if name.endswith("fwd") else 6) * elems, config=str(cfg))


def _autotuned(name: str, kernel, nbytes: int) -> None:
    """The autotuner's own timings per config (a list of quantiles, median first, or one number)."""
    timings = {cfg: ms[0] if isinstance(ms, list) else ms
               for cfg, ms in (getattr(kernel, "configs_timings", None) or {}).items()}
    for cfg, ms in sorted(timings.items(), key=lambda kv: kv[1]):
        report(f"{name}_config", ms, nbytes=nbytes, config=str(cfg))


def residual_norm_timing(rows: int, n: int, calls: int = 20) -> None:
    """The fused residual epilogue + LayerNorm (residual_norm_kernels) both ways, the backward at several
    program counts (the partial-sum rows it leaves for its column sum), against the separate epilogue
    (dropout_kernels) and LayerNorm (layernorm_kernels) forwards; ``calls`` back to back per timing."""
    from megatron_bert.model import dropout_kernels as dk
    from megatron_bert.model import layernorm_kernels as lk
    from megatron_bert.model import residual_norm_kernels as rk

    dev, dt = "cuda", torch.bfloat16
    y, r, dln, dh = (torch.randn(rows, n, device=dev, dtype=dt) for _ in range(4))
    b, nb = (0.1 * torch.randn(n, device=dev, dtype=dt) for _ in range(2))
    w = torch.ones(n, device=dev, dtype=dt)
    seed = torch.tensor([7], dtype=torch.int64, device=dev)
    elems = rows * n

    def many(fn):
        return lambda: [fn() for _ in range(calls)]
    fwd = lambda: rk.residual_norm_with_stats(y, b, r, seed, 0.1, 0, w, nb, 1e-5)  # noqa: E731
    h, _, keep, mean, rstd = fwd()
    report("residual_norm_fwd", timed(many(fwd)) / calls, nbytes=9 * elems, shape=[rows, n])
    _autotuned("residual_norm_fwd", rk._fwd_kernel, 9 * elems)
    default = rk._PROGRAMS_PER_SM
    for per_sm in (2, 4, 8, 16):
        rk._PROGRAMS_PER_SM = per_sm
        bwd = lambda: rk.residual_norm_backward(dln, dh, h, keep, mean, rstd, w, 0.1, dt)  # noqa: E731
        bwd()
        report(f"residual_norm_bwd_{per_sm}_per_sm", timed(many(bwd)) / calls, nbytes=11 * elems,
               best=str(rk._bwd_kernel.best_config))
        _autotuned(f"residual_norm_bwd_{per_sm}_per_sm", rk._bwd_kernel, 11 * elems)
    rk._PROGRAMS_PER_SM = default

    def separate():
        out, _ = dk.bias_dropout_add(y, b, r, seed, 0.1, 0)
        return lk.layer_norm_with_stats(out, w, nb, 1e-5)
    report("separate_epilogue_and_layernorm_fwd", timed(many(separate)) / calls, nbytes=11 * elems)


def bert_like_ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """``n`` token ids shaped like masked BERT batches: Zipf-distributed words (exponent 1.1), 12%
    [MASK] (id 103), a [CLS] and two [SEP]s per 512 tokens: the long segments of the backward."""
    g = torch.Generator().manual_seed(seed)
    rank = torch.arange(1, vocab - 1000 + 1, dtype=torch.float64)
    words = 1000 + torch.multinomial(rank ** -1.1, n, replacement=True, generator=g)
    ids = torch.where(torch.rand(n, generator=g) < 0.12, 103, words)
    ids[::512], ids[255::512], ids[511::512] = 101, 102, 102
    return ids


def graphed_ms(fn, calls: int = 20, stream: torch.cuda.Stream | None = None) -> float:
    """Milliseconds per call of ``fn`` replayed ``calls`` times from one CUDA graph: the GPU time as in
    the graphed training step, without the CPU launch cost that bounds a chain of small kernels
    launched eagerly (bench/NOTES.md, session 16). ``stream``: where to warm up and capture (for an
    autograd backward, the stream its forward ran on)."""
    side = stream or torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        for _ in range(calls):
            fn()
    return timed(graph.replay) / calls


def embedding_backward_timing(n: int, h: int, vocab: int) -> None:
    """The word embeddings' backward at ``n`` tokens, graphed: embedding_kernels.segment_sums (sort, zero
    fill, two kernels; each piece alone too) against torch's (F.embedding's autograd); ours checked
    against torch's to an ulp first."""
    from megatron_bert.model import embedding_kernels as ek

    dev, dt = "cuda", torch.bfloat16
    ids = bert_like_ids(n, vocab).to(dev)
    grad = torch.randn(n, h, device=dev, dtype=dt)
    w = torch.zeros(vocab, h, device=dev, dtype=dt, requires_grad=True)
    autograd_stream = torch.cuda.Stream()  # the backward runs where the forward did: not the legacy stream
    autograd_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(autograd_stream):
        out = F.embedding(ids, w)
    torch.cuda.current_stream().wait_stream(autograd_stream)

    def torch_backward():
        return torch.autograd.grad(out, w, grad, retain_graph=True)[0]
    ours, ref = ek.segment_sums(ids, grad, vocab), torch_backward()
    ulp = ref.float().abs() * 2.0 ** -7 + 1e-3
    assert bool(((ours.float() - ref.float()).abs() <= ulp).all()), "segment_sums is not torch's embedding backward"
    nbytes = 2 * n * h + 2 * vocab * h
    report("embedding_bwd_ours", graphed_ms(lambda: ek.segment_sums(ids, grad, vocab)), nbytes=nbytes, tokens=n,
           hidden=h, vocab=vocab, mask_run=int((ids == 103).sum()), graphed=True)
    report("embedding_bwd_torch", graphed_ms(torch_backward, stream=autograd_stream), nbytes=nbytes, graphed=True)
    for key in (torch.int16, torch.int32):
        keys = ids.to(key)
        report(f"embedding_bwd_sort_only_{str(key)[6:]}", graphed_ms(lambda: torch.sort(keys, stable=True)))
    report("embedding_bwd_zero_fill_only", graphed_ms(lambda: torch.zeros(vocab, h, device=dev, dtype=dt)),
           nbytes=2 * vocab * h)
    sorted_ids, perm = torch.sort(ids.to(torch.int16), stable=True)
    chunks = -(-n // ek.CHUNK)
    heads, tails = (torch.empty(chunks, h, device=dev) for _ in range(2))
    grid = (chunks, -(-h // ek.BLOCK_H))
    report("embedding_bwd_chunk_kernel_only", graphed_ms(lambda: ek._chunk_sums_kernel[grid](
        sorted_ids, perm, grad, ours, heads, tails, n, h, CHUNK=ek.CHUNK, BLOCK_H=ek.BLOCK_H, num_warps=ek.NUM_WARPS)))
    report("embedding_bwd_carry_kernel_only", graphed_ms(lambda: ek._carry_kernel[grid](
        sorted_ids, ours, heads, tails, n, h, CHUNK=ek.CHUNK, BLOCK_H=ek.BLOCK_H, AHEAD=ek.CARRY_AHEAD,
        num_warps=ek.NUM_WARPS)))


def gemm_backends(t: int, h: int, calls: int = 10, autotune: bool = True) -> None:
    """Each GEMM of one layer (forward, input grad, weight grad of the four projections, in the
    layouts autograd hands them) under torch's default BLAS (cuBLAS), cuBLASLt, and torch.compile's
    max-autotune (Inductor's Triton templates against the BLAS call; the faster one is kept), timed
    ``calls`` back to back so the launches overlap."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    inductor_config.max_autotune_gemm_backends = "ATEN,TRITON"
    dynamo_config.cache_size_limit = 64  # one graph per shape and layout
    dev, dt = "cuda", torch.bfloat16
    cases = []
    for name, n_out, k in (("qkv", 3 * h, h), ("proj", h, h), ("fc1", 4 * h, h), ("fc2", h, 4 * h)):
        inp = torch.randn(t, k, device=dev, dtype=dt)
        w = torch.randn(n_out, k, device=dev, dtype=dt) * 0.02
        g = torch.randn(t, n_out, device=dev, dtype=dt)
        cases += [(f"{name}_fwd", inp, w.t()), (f"{name}_dgrad", g, w), (f"{name}_wgrad", g.t(), inp)]

    def many(fn, a_, b_):
        return lambda: [fn(a_, b_) for _ in range(calls)]
    for what, a_, b_ in cases:
        fl = 2 * a_.shape[0] * a_.shape[1] * b_.shape[1]
        row = {}
        for lib in ("cublas", "cublaslt"):
            torch.backends.cuda.preferred_blas_library(lib)
            row[lib] = timed(many(torch.mm, a_, b_)) / calls
        torch.backends.cuda.preferred_blas_library("cublas")
        tuned = None
        if autotune:
            tuned = torch.compile(lambda x, y: x @ y, mode="max-autotune-no-cudagraphs", dynamic=False)
        try:
            if tuned is not None:
                row["autotune"] = timed(many(tuned, a_, b_)) / calls
        except Exception as e:  # no Triton template for this layout
            print("KERNEL", json.dumps({"what": f"gemm_{what}_autotune", "error": str(e)[:160]}))
        for lib, ms in row.items():
            report(f"gemm_{what}_{lib}", ms, fl, shape=[a_.shape[0], b_.shape[1], a_.shape[1]])


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


if __name__ == "__main__":
    main()
