"""The README's main command, shortened (20 of its 150 steps: the steps were most of this test's time):
launch/quickstart.sh builds the built-in corpus, tokenizer and dataset, pretrains the tiny model with
TP=2 on CPU, and the loss goes down."""
import json
import subprocess

from train_fixtures import REPO, env


def test_quickstart_script_trains_and_loss_falls(tmp_path):
    run_dir = tmp_path / "run"
    res = subprocess.run(
        ["bash", "launch/quickstart.sh", "train.max_steps=20", "train.log_interval=5", "train.eval_interval=20",
         "checkpoint.save_interval=0", f"data.cache_dir={tmp_path / 'data'}"],
        capture_output=True, text=True, timeout=600, cwd=REPO, env={**env(), "RUN_DIR": str(run_dir)})
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split", "train") == "train"]
    assert [r["step"] for r in train] == [5, 10, 15, 20]
    assert train[-1]["loss"] < train[0]["loss"] - 0.5, [r["loss"] for r in train]
    assert any(r.get("split") == "valid" for r in rows)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_20"
    assert "checkpoints:" in res.stdout and "metrics:" in res.stdout
    assert "tp=0/2" in res.stdout  # two tensor-parallel ranks
