"""Elementwise epilogues that are worth one kernel on GPU: bias + GeLU, bias + dropout + residual.

Eager versions are plain torch; ``compiled(fn)`` hands them to torch.compile (Inductor fuses each
into a single pass over memory). Compilation is opt-in (``ModelRuntime.fuse_elementwise``) and
falls back to eager if it is unavailable. bias + erf-GeLU has its own Triton kernels
(gelu_kernels.py), used where Triton and a GPU are there (``MEGATRON_BERT_TRITON_GELU=0`` turns
them off, for A/B benchmarks); so has bias + dropout + residual in training, mask draw included
(dropout_kernels.py, ``MEGATRON_BERT_TRITON_DROPOUT=0``), and that epilogue together with the
LayerNorm after it (residual_norm_kernels.py, ``MEGATRON_BERT_TRITON_RESIDUAL_NORM=0``), which the
encoder uses where it can.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias)


def bias_gelu_tanh(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias, approximate="tanh")


def bias_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.relu(x + bias)


def bias_dropout_add(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, p: float, training: bool):
    """residual + dropout(x + bias) with torch's RNG (the native dropout path)."""
    return residual + F.dropout(x + bias, p, training)


BIAS_ACT = {"gelu": bias_gelu, "gelu_tanh": bias_gelu_tanh, "relu": bias_relu}


@functools.lru_cache(maxsize=None)
def compiled(fn):
    try:
        return torch.compile(fn, dynamic=False, fullgraph=True)
    except Exception:  # no compiler backend available: stay eager
        return fn


def fused_bias_activation(name: str):
    """The GPU epilogue ``act(x + bias)`` for activation ``name``."""
    if name == "gelu":
        from . import gelu_kernels

        if gelu_kernels.available():
            return gelu_kernels.bias_gelu
    return compiled(BIAS_ACT[name])
