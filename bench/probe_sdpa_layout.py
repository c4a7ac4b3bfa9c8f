"""Which q/k/v layout lets SDPA's backward hand back grads without an interleaving copy (GPU probe).

For each layout of the fused QKV projection output, prints the strides of dq/dk/dv that SDPA's
backward returns and the time of forward + backward from the packed tensor (the grad of the packed
tensor included, as the QKV GEMM's backward needs it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

s, b, heads, hd = 512, 32, 16, 64
dev = "cuda"


def views(mixed, layout):
    if layout == "s b heads 3 hd":  # ours (Megatron's per-head layout)
        return mixed.view(s, b, heads, 3, hd).permute(3, 1, 2, 0, 4).unbind(0)
    if layout == "s b 3 heads hd":
        return mixed.view(s, b, 3, heads, hd).permute(2, 1, 3, 0, 4).unbind(0)
    if layout == "b s 3 heads hd":
        return mixed.view(b, s, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    raise ValueError(layout)


def run(layout, dropout):
    shape = (b, s, 3 * heads * hd) if layout.startswith("b") else (s, b, 3 * heads * hd)
    mixed = torch.randn(shape, device=dev, dtype=torch.bfloat16, requires_grad=True)
    q, k, v = views(mixed, layout)
    for t in (q, k, v):
        t.retain_grad()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    g = torch.randn_like(out)
    out.backward(g)
    strides = [tuple(t.grad.stride()) for t in (q, k, v)]
    same_storage = q.grad.untyped_storage().data_ptr() == k.grad.untyped_storage().data_ptr()

    def step():
        mixed.grad = None
        q, k, v = views(mixed, layout)
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout).backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        step()
    e1.record()
    torch.cuda.synchronize()
    print(f"PROBE layout=[{layout}] dropout={dropout} dq/dk/dv strides={strides} one storage={same_storage} "
          f"fwd+bwd {e0.elapsed_time(e1) / 20:.3f} ms", flush=True)


if __name__ == "__main__":
    for layout in ("s b heads 3 hd", "s b 3 heads hd", "b s 3 heads hd"):
        for p in (0.0, 0.1):
            run(layout, p)
