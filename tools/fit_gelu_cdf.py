"""Derives the polynomial that megatron_bert/model/gelu_kernels.py uses for the normal CDF.

The GeLU kernels need Φ(x) = erfc(-x/√2)/2 for every element. libdevice's erff takes two
polynomials with branch-selected coefficients (~37 instructions per element in the forward kernel,
~52 in the backward on sm90), which made both kernels compute-bound at ~2.4 TB/s. Instead, with
u = |x|/√2 and t = 1/(1 + P·u) in (0, 1]:

    erfc(u) = t · 2^(Q(t) - u²·log2(e)),    Q(t) = log2(erfcx(u) / t)

where erfcx(u) = e^(u²)·erfc(u) is smooth and bounded, so Q is well fitted by a low-degree
polynomial on [0, 1] (t → 0 is u → ∞, where Q(0) = log2(P/√π)). One branch-free expression then
covers every x: a reciprocal, one Horner chain, one exp2, and Φ(x) = 1 - erfc(u)/2 for x ≥ 0,
erfc(u)/2 otherwise (no 1 + erf(x) cancellation in the tail, unlike the erf form). The backward's
pdf φ(x) = 2^(-u²·log2(e))/√(2π) reuses u².

This script fits Q by Lawson's iteratively reweighted least squares (a near-minimax fit) in the
Chebyshev basis and prints the power-basis coefficients and the error of an fp32 evaluation. Needs
numpy only; run it when changing P or the degree:

    python tools/fit_gelu_cdf.py --p 0.5 --degree 9
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from numpy.polynomial import chebyshev, polynomial


def log2_erfcx_over_t(t: np.ndarray, p: float) -> np.ndarray:
    """Q(t) = log2(erfcx(u) / t) with u = (1/t - 1)/p, in float64."""
    out = np.empty_like(t)
    for i, ti in enumerate(t):
        if ti == 0.0:
            out[i] = math.log2(p / math.sqrt(math.pi))
            continue
        u = (1.0 / ti - 1.0) / p
        if u < 25.0:  # erfc(u) and e^(u²) are both representable here
            erfcx = math.erfc(u) * math.exp(u * u)
        else:  # asymptotic series, error < 1e-12 at u ≥ 25
            s = 1.0 / (2.0 * u * u)
            erfcx = (1.0 - s + 3.0 * s * s - 15.0 * s ** 3) / (u * math.sqrt(math.pi))
        out[i] = math.log2(erfcx / ti)
    return out


def fit(p: float, degree: int, points: int = 20001, rounds: int = 100) -> np.ndarray:
    t = np.concatenate([np.linspace(0.0, 1.0, points), 1.0 - np.geomspace(1e-9, 1e-3, 200)])
    q = log2_erfcx_over_t(t, p)
    basis = chebyshev.chebvander(2.0 * t - 1.0, degree)
    weight = np.ones_like(t)
    for _ in range(rounds):  # Lawson: reweight by the error until the fit equioscillates
        root = np.sqrt(weight)
        coef, *_ = np.linalg.lstsq(basis * root[:, None], q * root, rcond=None)
        weight = weight * np.abs(basis @ coef - q) + 1e-300
        weight /= weight.sum()
    return chebyshev.Chebyshev(coef, domain=[0.0, 1.0]).convert(kind=polynomial.Polynomial).coef


def half_erfc_fp32(x: np.ndarray, p: float, coef: np.ndarray) -> np.ndarray:
    """Φ(-|x|) = erfc(|x|/√2)/2 evaluated in float32 the way the kernel does (the 1/2 folded into the
    constant term as -1; exact reciprocal and exp2 where the kernel's are approximate to ~1 ulp)."""
    f = np.float32
    u2 = (x.astype(f) * x.astype(f) * f(0.5 * math.log2(math.e))).astype(f)  # u² · log2(e)
    t = (f(1.0) / (f(1.0) + f(p / math.sqrt(2.0)) * np.abs(x.astype(f)))).astype(f)
    q = f(coef[-1])
    for c in coef[-2:0:-1]:
        q = (q * t + f(c)).astype(f)
    q = (q * t + f(coef[0] - 1.0)).astype(f)
    return (t * np.exp2((q - u2).astype(f))).astype(f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--degree", type=int, default=9)
    a = ap.parse_args()
    coef = fit(a.p, a.degree)
    x = np.linspace(0.0, 13.0, 200001)
    ref = np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in x])
    rel = np.abs(half_erfc_fp32(x, a.p, coef) - ref) / ref
    print(f"P = {a.p}, degree {a.degree}: max relative error of erfc(|x|/√2)/2 in fp32 over |x| ≤ 13: "
          f"{rel.max():.2e} (fp32 rounding of u² alone grows it with |x|; {rel[x <= 4].max():.2e} for |x| ≤ 4)")
    print("coefficients of Q, t^0 first:")
    print("(" + ", ".join(f"{c:.9g}" for c in coef) + ")")


if __name__ == "__main__":
    main()
