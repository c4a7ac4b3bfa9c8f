"""GPU test of the distributed optimizer (optim.distributed_optimizer; skipped without CUDA): DP=2 with both
ranks sharing the GPU over gloo (tests/shared_gpu_train.py) against the replicated optimizer, then its
checkpoint resumed by a one-GPU unsharded run."""
import subprocess
import sys

import pytest
import torch

from train_fixtures import REPO, base_overrides, build_dataset, env, metrics, resume_dir, train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_the_distributed_optimizer_on_the_gpu_matches_the_replicated_one_and_resumes_unsharded(tmp_path):
    """DP=2 (ranks sharing the GPU over gloo), bf16, torch's fused AdamW on the masters' DP slices:
    the same losses as the replicated optimizer; its step-6 checkpoint (DP-sliced masters and
    moments) resumed by a one-GPU unsharded run continues them."""
    data = build_dataset(tmp_path / "data")
    common = {"train.device": "cuda", "train.precision": "bf16", "train.max_steps": 12, "model.hidden_size": 128,
              "train.micro_batch_size": 8, "train.global_batch_size": 16, "checkpoint.save_interval": 6,
              "parallel.dropout_impl": "keyed"}
    shared = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "tests/shared_gpu_train.py"]
    losses = {}
    for name, extra in (("plain", {}), ("zero", {"optim.distributed_optimizer": True})):
        ov = base_overrides(data, tmp_path / name, **common, **extra)
        res = subprocess.run(shared + ov, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)
        assert res.returncode == 0, res.stderr[-3000:]
        assert ("distributed optimizer: fp32 masters" in res.stdout) == (name == "zero"), res.stdout[-2000:]
        losses[name] = {r["step"]: r["loss"] for r in metrics(tmp_path / name)}
    assert sorted(losses["zero"]) == list(range(1, 13)) and losses["zero"][12] < losses["zero"][1]
    for step, ref in losses["plain"].items():
        assert abs(losses["zero"][step] - ref) <= 2e-3 * abs(ref), (step, losses["zero"][step], ref)
    resumed = resume_dir(tmp_path / "zero" / "checkpoints", tmp_path / "resumed")
    res = train(base_overrides(data, resumed, **common))
    assert res.returncode == 0, res.stderr[-3000:]
    again = {r["step"]: r["loss"] for r in metrics(resumed)}
    assert sorted(again) == list(range(7, 13))
    for step, loss in again.items():
        assert abs(loss - losses["zero"][step]) <= 5e-3 * abs(losses["zero"][step]), (step, loss)
