"""The model's Triton kernels (bias + GeLU, LayerNorm forward, the bias-grad column sum, the QKV
gradient pack, the bias + dropout + residual epilogue, that epilogue fused with the next LayerNorm and
the encoder path built on it, the attention kernels and the attention layer on them at TP=2) in
Triton's interpreter and compiled for sm90, on a machine without a GPU. Triton is not a dependency: that test runs where it is installed and
MEGATRON_BERT_TEST_TRITON=1 is set (tests/kernel_checks.py holds the cases; tests/test_gpu.py runs the
kernels themselves on a GPU). The GeLU kernels' normal-CDF polynomial is checked everywhere."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("MEGATRON_BERT_TEST_TRITON") != "1",
                    reason="the Triton checks need Triton (not a dependency): set MEGATRON_BERT_TEST_TRITON=1")
def test_model_kernels_in_the_interpreter_and_compiled_for_sm90():
    pytest.importorskip("triton")
    for mode, extra, cases in (("interpret", {"TRITON_INTERPRET": "1"}, 21), ("compile", {}, 21)):
        res = subprocess.run([sys.executable, "tests/kernel_checks.py", mode], capture_output=True, text=True,
                             timeout=600, env={**os.environ, **extra}, cwd=REPO)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert res.stdout.count("OK ") >= cases, res.stdout


def test_gelu_cdf_polynomial_is_the_fit_and_matches_erfc_in_fp32():
    """The constants in gelu_kernels.py are what tools/fit_gelu_cdf.py derives, and evaluated in fp32
    the way the kernels do, erfc(|x|/√2)/2 is within 2e-6 (relative) of float64 for |x| ≤ 4 and 3e-5
    out to |x| = 13, where Φ reaches fp32's smallest normal numbers."""
    sys.path.insert(0, str(REPO / "tools"))
    import fit_gelu_cdf

    from megatron_bert.model.gelu_kernels import CDF_P, CDF_Q

    coef = fit_gelu_cdf.fit(CDF_P, len(CDF_Q) - 1)
    assert np.abs(coef - np.array(CDF_Q)).max() < 1e-6, coef  # printed to 9 significant digits
    x = np.linspace(0.0, 13.0, 100001)
    ref = np.array([0.5 * math.erfc(v / math.sqrt(2.0)) for v in x])
    rel = np.abs(fit_gelu_cdf.half_erfc_fp32(x, CDF_P, np.array(CDF_Q)) - ref) / ref
    assert rel[x <= 4].max() < 2e-6 and rel.max() < 3e-5, (rel[x <= 4].max(), rel.max())
