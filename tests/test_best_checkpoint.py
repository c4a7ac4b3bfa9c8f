"""checkpoint.best_metric: the best evaluation's checkpoint is saved, named by <dir>/best and never pruned;
pointer files resolve as checkpoint paths; train.early_stop_patience stops a run that no longer improves."""
import json
import re

import pytest

from megatron_bert.checkpoint import CheckpointError, resolve_checkpoint
from megatron_bert.checkpoint.manager import BEST_FILE, META_FILE, best_checkpoint, finalize_save, list_checkpoints
from train_fixtures import base_overrides, build_dataset, metrics, train


def _fake_step(root, step):
    d = root / f"step_{step}"
    d.mkdir(parents=True)
    (d / META_FILE).write_text("{}")
    return d


def test_pruning_keeps_what_best_names_and_pointer_files_resolve(tmp_path):
    root = tmp_path / "ckpts"
    for step in (1, 2, 3, 4):
        _fake_step(root, step)
    (root / BEST_FILE).write_text("step_1\n")
    tmp = root / ".step_5.tmp"
    tmp.mkdir()
    finalize_save(tmp, root / "step_5", {"step": 5}, keep=2)
    assert [s for s, _ in list_checkpoints(root)] == [1, 4, 5]  # newest two + the best
    assert best_checkpoint(root) == root / "step_1"
    tmp = root / ".step_6.tmp"
    tmp.mkdir()
    finalize_save(tmp, root / "step_6", {"step": 6}, keep=2, best=True)  # a new best: the old one may go
    assert [s for s, _ in list_checkpoints(root)] == [5, 6]
    assert resolve_checkpoint(root / BEST_FILE) == root / "step_6"
    assert resolve_checkpoint(root / "latest") == root / "step_6"
    (root / BEST_FILE).write_text("step_9\n")
    with pytest.raises(CheckpointError, match="does not name a complete step_<N> directory"):
        resolve_checkpoint(root / BEST_FILE)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("best_data"))


def test_the_best_evaluation_is_saved_kept_and_resumable(dataset, tmp_path):
    """Evaluations at steps 2, 4, 6; keep=1, no interval saves, async saves on. best_mode=max on lm_loss makes
    the best an early step (the loss falls), so keep=1 alone would have pruned it."""
    run = tmp_path / "run"
    res = train(base_overrides(dataset, run, **{
        "train.eval_interval": 2, "train.eval_iters": 2, "checkpoint.keep": 1, "checkpoint.async_save": True,
        "checkpoint.best_metric": "lm_loss", "checkpoint.best_mode": "max"}))
    assert res.returncode == 0, res.stderr[-3000:]
    evals = metrics(run, "valid")
    assert [r["step"] for r in evals] == [2, 4, 6]
    top = max(evals, key=lambda r: r["lm_loss"])  # the first of equals, as the run keeps the first
    ckpts = run / "checkpoints"
    assert best_checkpoint(ckpts) == ckpts / f"step_{top['step']}"
    assert {s for s, _ in list_checkpoints(ckpts)} == {top["step"], 6}
    meta = json.loads((ckpts / f"step_{top['step']}" / META_FILE).read_text())
    assert meta["step"] == top["step"] and meta["best"] == {
        "metric": "lm_loss", "mode": "max", "value": pytest.approx(top["lm_loss"], abs=0), "step": top["step"]}
    assert f"best lm_loss {top['lm_loss']:.4f}: {ckpts / ('step_%d' % top['step'])}" in res.stdout
    assert re.search(rf"best lm_loss so far \({top['lm_loss']:.4f}\): .*step_{top['step']}", res.stdout)
    import io

    from megatron_bert.checkpoint.__main__ import inspect

    out = io.StringIO()
    inspect(ckpts / BEST_FILE, out)
    assert f"best evaluation so far: lm_loss = {top['lm_loss']:.6g} at step {top['step']} (max)" in out.getvalue()

    # the pointer is a checkpoint path: resume from it
    again = tmp_path / "again"
    res = train(base_overrides(dataset, again, **{"checkpoint.resume": str(ckpts / BEST_FILE),
                                                  "train.max_steps": top["step"] + 1}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpts / ('step_%d' % top['step'])} (step {top['step']}" in res.stdout
    assert [r["step"] for r in metrics(again)] == [top["step"] + 1]


def test_early_stopping_after_patience_evaluations_without_a_better_one(dataset, tmp_path):
    """best_mode=max on lm_loss (it falls): the step-2 evaluation stays the best, the step-4 one does not beat
    it, and patience 1 stops the run there: a clean stop that saves step 4 and keeps step 2 as best."""
    run = tmp_path / "run"
    res = train(base_overrides(dataset, run, **{
        "train.max_steps": 10, "train.eval_interval": 2, "train.eval_iters": 2, "train.early_stop_patience": 1,
        "checkpoint.best_metric": "lm_loss", "checkpoint.best_mode": "max"}))
    assert res.returncode == 0, res.stderr[-3000:]
    evals = metrics(run, "valid")
    assert [r["step"] for r in evals] == [2, 4] and evals[1]["lm_loss"] < evals[0]["lm_loss"]
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert (f"stopping at step 4: early stop: lm_loss has not improved on {evals[0]['lm_loss']:.4f} (step 2) "
            "in 1 evaluations") in res.stdout
    ckpts = run / "checkpoints"
    assert best_checkpoint(ckpts) == ckpts / "step_2" and resolve_checkpoint(ckpts) == ckpts / "step_4"
    assert json.loads((ckpts / "step_4" / META_FILE).read_text())["stale_evals"] == 1
    # resumed with patience 2: the best (step 2) and the count (1) come back, so the step-6 evaluation stops it
    res = train(base_overrides(dataset, run, **{
        "train.max_steps": 10, "train.eval_interval": 2, "train.eval_iters": 2, "train.early_stop_patience": 2,
        "checkpoint.best_metric": "lm_loss", "checkpoint.best_mode": "max"}))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout and "stopping at step 6: early stop" in res.stdout, res.stdout[-2000:]
    assert "(step 2) in 2 evaluations" in res.stdout and best_checkpoint(ckpts) == ckpts / "step_2"
