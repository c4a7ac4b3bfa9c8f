"""task=pretrain task.mode=evaluate: a checkpoint scored on the validation data reproduces the evaluation
the training run logged at that step (architecture and tokenizer from the checkpoint, any TP / micro-batch
split), writes nothing but its metrics line, and refuses what it cannot score with one line."""
import json

import pytest

from checkpoint_checks import finish, launch
from megatron_bert.checkpoint.manager import read_model_state, write_model_checkpoint
from train_fixtures import base_overrides, build_dataset, metrics, train

KEYS = ("lm_loss", "lm_accuracy", "lm_perplexity", "binary_loss", "binary_accuracy", "loss")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain_eval")
    data = build_dataset(root / "data")
    run = root / "run"
    res = train(base_overrides(data, run, **{"train.max_steps": 4, "train.eval_interval": 2, "train.eval_iters": 2,
                                             "checkpoint.save_interval": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    evals = {r["step"]: r for r in metrics(run, "valid")}
    assert sorted(evals) == [2, 4]
    return {"root": root, "data": data, "run": run, "evals": evals}


def evaluate_args(w, run_dir, **extra):
    """Only the data and batch: no model=..., no data.tokenizer (both come from the checkpoint)."""
    ov = {"task.mode": "evaluate", "data": "bert", "data.prefix": w["data"]["prefix"],
          "data.cache_dir": str(w["run"] / "cache"), "data.seq_length": 64, "train.device": "cpu",
          "train.global_batch_size": 8, "train.micro_batch_size": 4, "train.eval_iters": 2, "run_dir": str(run_dir)}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def test_evaluate_reproduces_the_training_runs_evaluations(trained):
    w, ckpts = trained, trained["run"] / "checkpoints"
    procs = {
        "tp1_step2": launch(evaluate_args(w, w["root"] / "tp1", **{"task.pretrained": ckpts / "step_2"})),
        # TP=2, two micro-batches of 2 per step instead of one of 4 ... still the same global batches
        "tp2_latest": launch(evaluate_args(w, w["root"] / "tp2", **{"task.pretrained": ckpts, "parallel.tensor": 2,
                                                                    "train.micro_batch_size": 2}), nproc=2),
    }
    out = finish(procs)
    for name, step, tol in (("tp1_step2", 2, 1e-6), ("tp2_latest", 4, 1e-5)):
        code, stdout, stderr = out[name]
        assert code == 0, (name, stderr[-3000:])
        assert "model: architecture from checkpoint" in stdout and "hidden_size=64" in stdout
        run_dir = w["root"] / name.split("_")[0]
        rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert len(rows) == 1, rows  # no training step was taken
        got, want = rows[0], w["evals"][step]
        assert (got["step"], got["split"], got["mode"]) == (step, "valid", "evaluate")
        for k in KEYS:
            assert got[k] == pytest.approx(want[k], rel=tol, abs=tol), (name, k)
        assert f"evaluate ({ckpts / f'step_{step}'}, step {step}, 2 x 8 samples)" in stdout
        assert not (run_dir / "checkpoints").exists()


def test_evaluate_refuses_what_it_cannot_score(trained, tmp_path):
    w = trained
    # a masked-LM-only checkpoint (no pooler / binary head), as converted from MegatronBertForMaskedLM
    state, meta = read_model_state(w["run"] / "checkpoints")
    mlm_only = {k: v for k, v in state.items() if not k.startswith(("binary_head.", "bert.pooler."))}
    assert len(mlm_only) < len(state)
    write_model_checkpoint(tmp_path / "mlm", mlm_only, {**meta, "head": "masked_lm"}, step=4)
    cases = {
        "predict": (["task.mode=predict"], "error: task.mode=predict is for fine-tuning tasks"),
        "no_weights": ([], "error: task.mode=evaluate needs weights: give task.pretrained=CHECKPOINT"),
        "no_binary_head": ([f"task.pretrained={tmp_path / 'mlm'}"],
                           "has no binary (SOP/NSP) head or pooler: give data.binary_head=none"),
        "mlm_only": ([f"task.pretrained={tmp_path / 'mlm'}", "data.binary_head=none"], None),
    }
    procs = {name: launch(evaluate_args(w, tmp_path / name) + extra) for name, (extra, _) in cases.items()}
    out = finish(procs)
    for name, (_, message) in cases.items():
        code, stdout, stderr = out[name]
        if message is None:
            assert code == 0, stderr[-3000:]
            row = json.loads((tmp_path / name / "metrics.jsonl").read_text())
            assert row["lm_loss"] > 0 and "binary_loss" not in row
        else:
            assert code == 2, (name, stdout[-2000:], stderr[-2000:])
            lines = [ln for ln in stderr.splitlines() if ln.strip()]
            assert len(lines) == 1 and message in lines[0], (name, stderr[-2000:])
