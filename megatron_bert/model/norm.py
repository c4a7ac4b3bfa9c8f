"""LayerNorm: apex's fused kernel when it is importable and we are on GPU, torch's otherwise.

Both keep ``weight`` / ``bias`` under the same names and compute the same function, so checkpoints
and results do not depend on whether apex is installed.
"""
from __future__ import annotations

import torch
from torch import nn


def _apex_layernorm():
    try:
        from apex.normalization import FusedLayerNorm  # NVIDIA apex, built from source
    except Exception:  # not installed, or the unrelated PyPI "apex", or built without CUDA
        return None
    return FusedLayerNorm


def make_layernorm(hidden: int, eps: float, device: torch.device, sequence_parallel: bool = False) -> nn.Module:
    cls = _apex_layernorm() if device.type == "cuda" else None
    norm = cls(hidden, eps=eps) if cls is not None else nn.LayerNorm(hidden, eps=eps)
    norm = norm.to(device)
    for p in norm.parameters():
        # Under SP a LayerNorm sees only this rank's sequence shard: its grads are partial sums.
        p.sequence_parallel = sequence_parallel
    return norm
