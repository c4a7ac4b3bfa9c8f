"""The model's Triton kernels (bias + GeLU, the QKV gradient pack, the
bias + dropout + residual epilogue) in Triton's interpreter and compiled
for sm90, on a machine without a GPU. Triton is not a dependency: the test runs where it is installed
and MEGATRON_BERT_TEST_TRITON=1 is set (tests/kernel_checks.py holds the cases; tests/test_gpu.py runs
the kernels themselves on a GPU)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(os.environ.get("MEGATRON_BERT_TEST_TRITON") != "1",
                    reason="the Triton checks need Triton (not a dependency): set MEGATRON_BERT_TEST_TRITON=1")
def test_model_kernels_in_the_interpreter_and_compiled_for_sm90():
    pytest.importorskip("triton")
    for mode, extra, cases in (("interpret", {"TRITON_INTERPRET": "1"}, 6), ("compile", {}, 5)):
        res = subprocess.run([sys.executable, "tests/kernel_checks.py", mode], capture_output=True, text=True,
                             timeout=600, env={**os.environ, **extra}, cwd=REPO)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        assert res.stdout.count("OK ") >= cases, res.stdout
