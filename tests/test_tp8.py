"""TP=8 at tiny size on 8 gloo ranks (what issue 11 asks of CPUs while no 8-GPU machine is lent):
TP=8 + sequence parallel equals TP=1 with dropout on, and a TP=8 checkpoint resumes at TP=4 × DP=2."""
import tp8_checks
from dist_harness import run_distributed


def test_tp8_matches_tp1_and_resumes_at_tp4_dp2(tmp_path):
    results = run_distributed(8, 8, tp8_checks.run, str(tmp_path / "ckpt"), timeout=300)
    assert all(r["tp"] == 8 and r["tp_after"] == 4 and r["dp_after"] == 2 for r in results)
    assert len({round(r["resumed"], 6) for r in results}) == 1  # every rank sees the same loss
