"""Where the GPU time of a profiled region goes: kernel time by category, GPU busy vs wall time.

Used by ``bench_pretrain.py --profile``; categories are by kernel name (cuBLAS/CUTLASS GEMMs,
attention, Triton (Inductor's fused kernels), torch's own elementwise/reduction kernels, the
optimizer's multi-tensor kernels, copies, NCCL).
"""
from __future__ import annotations

import json
from collections import defaultdict

CATEGORIES = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "wgmma", "sm90")),
    ("nccl", ("nccl",)),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy", "cat", "index")),
    ("norm", ("layer_norm", "layernorm")),
    ("elementwise", ("elementwise", "vectorized", "reduce", "dropout", "gelu", "softmax")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def summarize(prof, steps: int) -> dict:
    """Per-step milliseconds by category, the top kernels, and the GPU's busy fraction."""
    from torch.autograd import DeviceType

    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    by_cat: dict[str, float] = defaultdict(float)
    by_name: dict[str, list] = defaultdict(lambda: [0.0, 0])
    spans = []
    for e in kernels:
        us = e.time_range.end - e.time_range.start
        by_cat[category(e.name)] += us
        by_name[e.name][0] += us
        by_name[e.name][1] += 1
        spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    busy, cur_s, cur_e = 0.0, None, None
    for s, t in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    if cur_e is not None:
        busy += cur_e - cur_s
    wall = (spans[-1][1] - spans[0][0]) if spans else 0.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][0])[:45]
    return {
        "ms_per_step_by_category": {k: round(v / steps / 1e3, 2) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "kernel_ms_per_step": round(sum(by_cat.values()) / steps / 1e3, 2),
        "gpu_busy_ms_per_step": round(busy / steps / 1e3, 2),
        "gpu_span_ms_per_step": round(wall / steps / 1e3, 2),
        "launches_per_step": len(kernels) // max(steps, 1),
        "top_kernels": [{"name": n[:110], "ms_per_step": round(v[0] / steps / 1e3, 3), "calls_per_step": v[1] // steps}
                        for n, v in top],
    }


def print_summary(summary: dict, tag: str = "") -> None:
    print("PROFILE", json.dumps({"tag": tag, **{k: v for k, v in summary.items() if k != "top_kernels"}}), flush=True)
    for k in summary["top_kernels"]:
        print(f"  {k['ms_per_step']:8.3f} ms  x{k['calls_per_step']:<4d} {k['name']}")
