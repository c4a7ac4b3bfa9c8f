"""End-to-end fine-tuning through `python -m megatron_bert.train` (GLUE, NER, SQuAD, RACE) on CPU.

Each task gets a tiny, learnable data set written here (the label is a function of which words
occur), a "pretrained" checkpoint of a freshly initialised tiny BERT (`write_model_checkpoint`), and
one TP=2 training run (torchrun, 2 processes) whose loss must fall and whose metrics.jsonl must hold
eval lines with the task's metrics; then `task.mode=predict` must write the task's predictions file
from the fine-tuned checkpoint. One TP=1 × DP=2 run checks the first losses against TP=2 (keyed
dropout makes them agree to 1e-5) and the evaluation's logit gather over DP ranks. The training runs
are independent of each other and run two at a time (module fixture `world`).
"""
from __future__ import annotations

import functools
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from checkpoint_checks import RunQueue, describe, launch
from task_fixtures import write_vocab
from train_fixtures import REPO, env, metrics

SEQ = 32
POS, NEG = ["good", "great", "loved"], ["bad", "terrible", "hated"]
FILLER = "the a movie film story was it is".split()
PEOPLE, CITIES, ORGS = ["john", "mary", "smith", "jones"], ["paris", "london", "berlin"], ["acme"]
OTHER = "the cat sat on mat in a big small house river was and at by".split()


# --------------------------------------------------------------------------- data writers
def _sentence(rng: random.Random, keyword: str, n: int = 5) -> str:
    words = [rng.choice(FILLER) for _ in range(n)]
    words.insert(rng.randrange(n + 1), keyword)
    return " ".join(words)


def write_glue(d: Path, seed: int, n_train: int = 64, n_dev: int = 24) -> Path:
    """Generic TSV `text<TAB>label`: pos iff the sentence holds a positive word."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(d / name, "w") as f:
            for _ in range(n):
                y = rng.random() < 0.5
                f.write(f"{_sentence(rng, rng.choice(POS if y else NEG))}\t{'pos' if y else 'neg'}\n")
    return d


def write_stsb(d: Path, seed: int, n_train: int = 64, n_dev: int = 24) -> Path:
    """GLUE STS-B layout (header, 10 columns, float score): 4.0 when sentence1 is positive, else 1.0."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    cols = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2", "score"]
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(d / name, "w") as f:
            f.write("\t".join(cols) + "\n")
            for i in range(n):
                a, b = rng.random() < 0.5, rng.random() < 0.5
                s1, s2 = (_sentence(rng, rng.choice(POS if x else NEG), 3) for x in (a, b))
                f.write("\t".join([str(i), "g", "f", "2020", str(i), "s", "s", s1, s2, "4.0" if a else "1.0"]) + "\n")
    return d


def _ner_sentence(rng):
    words, tags = [], []
    for _ in range(rng.randint(4, 7)):
        kind = rng.random()
        if kind < 0.2:
            words += [rng.choice(PEOPLE[:2]), rng.choice(PEOPLE[2:])]
            tags += ["B-PER", "I-PER"]
        elif kind < 0.35:
            words.append(rng.choice(CITIES))
            tags.append("B-LOC")
        elif kind < 0.45:
            words += ["acme", "corp"]
            tags += ["B-ORG", "I-ORG"]
        else:
            words.append(rng.choice(OTHER))
            tags.append("O")
    return words, tags


def write_ner(d: Path, seed: int, n_train: int = 48, n_dev: int = 16) -> Path:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.txt", n_train), ("dev.txt", n_dev)):
        with open(d / name, "w") as f:
            f.write("-DOCSTART- -X- O O\n\n")
            for _ in range(n):
                for w, t in zip(*_ner_sentence(rng)):
                    f.write(f"{w} NN O {t}\n")
                f.write("\n")
    return d


def _squad_file(path: Path, rng, n: int):
    paragraphs = []
    for i in range(n):
        words = [rng.choice(OTHER) for _ in range(rng.randint(6, 12))]
        city = rng.choice(CITIES)
        words.insert(rng.randrange(len(words) + 1), city)
        context = " ".join(words)
        start = (" " + context + " ").index(f" {city} ")
        paragraphs.append({"context": context, "qas": [
            {"id": f"q{i}", "question": "where is it", "answers": [{"text": city, "answer_start": start}]}]})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))


def write_squad(d: Path, seed: int, n_train: int = 48, n_dev: int = 16) -> Path:
    """The answer is the (only) city in the context."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    _squad_file(d / "train-v1.1.json", rng, n_train)
    _squad_file(d / "dev-v1.1.json", rng, n_dev)
    return d


def write_race(d: Path, seed: int, n_train: int = 48, n_dev: int = 16) -> Path:
    """JSON lines, 2 questions per article; the right option is the one holding a positive word."""
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for name, n in (("train.jsonl", n_train), ("dev.jsonl", n_dev)):
        with open(d / name, "w") as f:
            for a in range(n // 2):
                options, answers = [], []
                for _ in range(2):
                    right = rng.randrange(4)
                    options.append([rng.choice(POS) if j == right else rng.choice(NEG) for j in range(4)])
                    answers.append("ABCD"[right])
                article = " ".join(rng.choice(OTHER) for _ in range(8))
                f.write(json.dumps({"id": f"a{a}", "article": article, "questions": ["what was it", "it was _ ."],
                                    "options": options, "answers": answers}) + "\n")
    return d


def write_pretrained(root: Path) -> dict:
    """A tiny WordPiece vocab and a freshly initialised BERT written as a pretraining checkpoint."""
    from megatron_bert.checkpoint import write_model_checkpoint
    from megatron_bert.config import ModelConfig, ModelRuntime
    from megatron_bert.data.tokenizers import load_tokenizer
    from megatron_bert.model import MegatronBertForPreTraining
    from parallel import ParallelState

    root.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(root)
    cfg = ModelConfig(vocab_size=load_tokenizer(vocab).vocab_size, hidden_size=64, num_layers=2,
                      num_attention_heads=4, max_position_embeddings=64)
    model = MegatronBertForPreTraining(cfg, ParallelState.single(), ModelRuntime(seed=7))
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    ckpt = write_model_checkpoint(root / "pretrained", state, {"model": cfg.to_dict(), "head": "pretraining",
                                                               "tokenizer": vocab})
    return {"ckpt": str(ckpt.parent), "vocab": vocab}


def write_glue_test(d: Path, seed: int, n: int = 12) -> list[str]:
    """Unlabeled `test.tsv` (header `text`); returns the true labels for checking predictions."""
    rng = random.Random(seed)
    truth = []
    with open(d / "test.tsv", "w") as f:
        f.write("text\n")
        for _ in range(n):
            y = rng.random() < 0.5
            truth.append("pos" if y else "neg")
            f.write(_sentence(rng, rng.choice(POS if y else NEG)) + "\n")
    return truth


# --------------------------------------------------------------------------- runs
# name -> (Hydra task, data writer, extra overrides, steps, eval metric keys)
TASKS = {
    "glue": ("glue", write_glue, {"checkpoint.best_metric": "accuracy"}, 40, ("loss", "accuracy", "f1")),
    # run at TP=1 inside the single-process batch below (regression is an extra to the four tasks)
    "stsb": ("glue", write_stsb, {"task.dataset": "stsb", "model.hidden_dropout": 0.0, "parallel.tensor": 1}, 20,
             ("loss", "pearson", "spearman")),
    "ner": ("ner", write_ner, {}, 20, ("loss", "precision", "recall", "f1", "f1_PER", "f1_LOC", "f1_ORG")),
    "squad": ("squad", write_squad, {}, 20, ("loss", "exact_match", "f1")),
    "race": ("race", write_race, {}, 20, ("loss", "accuracy")),
}


# the TP=2 runs of these tasks (`finetuned`), and the TP=1 × DP=2 glue run of test_tp1_dp2_...
TP2_RUNS = ("glue", "ner", "squad", "race")
DP2_TEST = "test_tp1_dp2_matches_tp2_and_gathers_eval_in_order"


@pytest.fixture(scope="module")
def world(request, tmp_path_factory):
    """Data, the pretrained checkpoint, and the training runs, started two at a time (checkpoint_checks.RunQueue:
    they do not depend on each other, and one TP=2 run alone leaves a core idle for much of its start-up).
    `finetuned` and test_tp1_dp2_... wait for the run they read."""
    root = tmp_path_factory.mktemp("finetune")
    w = {"root": root, **write_pretrained(root), "runs": {}}
    for i, (name, (_, writer, _, _, _)) in enumerate(TASKS.items()):
        w[f"data_{name}"] = str(writer(root / f"data_{name}", seed=10 + i))
    w["glue_test_truth"] = write_glue_test(Path(w["data_glue"]), seed=99)
    starters = {name: functools.partial(launch, overrides(w, name, root / f"run_{name}"), nproc=2) for name in TP2_RUNS}
    if any(item.module is sys.modules[__name__] and item.originalname == DP2_TEST for item in request.session.items):
        starters["glue_dp2"] = functools.partial(
            launch, overrides(w, "glue", root / "run_glue_dp2", **{"parallel.tensor": 1,
                                                                "optim.distributed_optimizer": True}), nproc=2)
    order = ("glue", "glue_dp2", "ner", "squad", "race")  # the two 40-step runs together
    w["queue"] = RunQueue({name: starters[name] for name in order if name in starters}, limit=2)
    yield w
    w["queue"].close()


def overrides(world, name: str, run_dir: Path, **extra) -> list[str]:
    task, _, task_extra, steps, _ = TASKS[name]
    ov = {"task": task, "task.data_dir": world[f"data_{name}"], "task.pretrained": world["ckpt"],
          "task.max_seq_length": SEQ, "train.device": "cpu", "train.max_steps": steps,
          "train.micro_batch_size": 4, "train.global_batch_size": 16, "train.lr": 3e-3,
          "train.log_interval": 1, "train.eval_interval": steps // 2, "optim.warmup_steps": 2,
          "optim.lr_schedule": "constant", "parallel.tensor": 2, "parallel.dropout_impl": "keyed",
          "checkpoint.save_interval": 0, "run_dir": str(run_dir), **task_extra}
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


def _wait(world, run: str) -> Path:
    """Wait for the run `run` started by `world`; returns its run dir."""
    if run not in world["runs"]:
        res = world["queue"].wait(run, timeout=480)
        assert res[0] == 0, f"{run}: {describe(res)}"
        world["runs"][run] = world["root"] / f"run_{run}"
        world["stdout"] = {**world.get("stdout", {}), run: res[1]}
    return world["runs"][run]


def finetuned(world, name: str) -> Path:
    """The TP=2 run of `name` (one per module); returns the run dir."""
    return _wait(world, name)


def _mean(xs):
    return sum(xs) / len(xs)


def check_training_run(name: str, run_dir: Path) -> None:
    _, _, _, steps, keys = TASKS[name]
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    losses = [r["loss"] for r in rows]
    first, last = _mean(losses[:3]), _mean(losses[-3:])
    assert last < 0.6 * first, f"{name}: loss did not fall: first {losses[:3]} last {losses[-3:]}"
    evals = metrics(run_dir, split="valid")
    assert [e["step"] for e in evals] == [steps // 2, steps]
    for e in evals:
        assert set(keys) <= set(e), f"{name}: eval line {e} lacks {set(keys) - set(e)}"
        assert all(isinstance(e[k], float) for k in keys)
    final = evals[-1]
    if name != "stsb":  # the toy regression only learns the mean in so few steps
        assert final["loss"] < evals[0]["loss"] or final["loss"] < 0.05
        score = final.get("accuracy", final.get("f1"))
        assert score >= (90.0 if name == "squad" else 0.9), f"{name}: final eval {final}"
    ckpts = run_dir / "checkpoints"
    meta = json.loads((ckpts / (ckpts / "latest").read_text().strip() / "meta.json").read_text())
    head = {"glue": "sequence_classification", "stsb": "sequence_classification", "ner": "token_classification",
            "squad": "question_answering", "race": "multiple_choice"}[name]
    assert meta["head"] == head and meta["step"] == steps
    if name == "glue":  # checkpoint.best_metric=accuracy: the first eval with the top accuracy is kept as best
        top = max(evals, key=lambda e: e["accuracy"])
        assert (ckpts / "best").read_text().strip() == f"step_{top['step']}"
        assert json.loads((ckpts / f"step_{top['step']}" / "meta.json").read_text())["best"]["value"] == top["accuracy"]
        assert meta["head_kwargs"] == {"num_labels": 2, "problem_type": "single_label_classification"}
        assert meta["label_names"] == ["neg", "pos"]
    if name == "stsb":
        assert meta["head_kwargs"] == {"num_labels": 1, "problem_type": "regression"}
    if name == "ner":
        assert meta["label_names"] == ["O", "B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER"]
        assert meta["head_kwargs"] == {"num_labels": 6}


def test_tp1_dp2_matches_tp2_and_gathers_eval_in_order(world):
    """TP=1 × DP=2 (2 processes) vs TP=2: same first losses (keyed dropout, globally normalised loss),
    and the DP-sharded evaluation scores the learned model as well (logits gathered in order). The DP
    run shards its optimizer (optim.distributed_optimizer): the pretrained weights load into the
    masters' DP slices, the fresh head is sliced from its init, and every replica is gathered."""
    ref, run_dir = finetuned(world, "glue"), _wait(world, "glue_dp2")
    a, b = metrics(ref), metrics(run_dir)
    for step in range(5):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-5, f"step {step + 1}: {a[step]} vs {b[step]}"
        assert abs(a[step]["grad_norm"] - b[step]["grad_norm"]) <= 1e-4 * max(1.0, a[step]["grad_norm"])
    assert "distributed optimizer: fp32 masters + AdamW moments" in world["stdout"]["glue_dp2"]
    ea, eb = metrics(ref, "valid"), metrics(run_dir, "valid")
    assert abs(ea[0]["loss"] - eb[0]["loss"]) <= 1e-4, (ea[0], eb[0])
    assert eb[-1]["accuracy"] >= 0.9, eb[-1]


@pytest.mark.parametrize("name", ["glue", "ner", "squad", "race"])
def test_finetune_tp2_loss_falls_and_eval_lines(world, name):
    check_training_run(name, finetuned(world, name))


# --------------------------------------------------------------------------- single-process batch
# The evaluate / predict / error runs go through `megatron_bert.train.main` one after the other in
# ONE fresh interpreter (each CLI start costs seconds of imports on a shared 2-core box); a run's
# stderr goes to its own file and its return value is the exit status the CLI would give.
BATCH = r"""
import contextlib, json, sys, traceback
from megatron_bert.train import main
codes = {}
for name, job in json.loads(sys.argv[1]).items():
    with open(job["stderr"], "w") as err, contextlib.redirect_stderr(err):
        try:
            codes[name] = main(job["argv"])
        except BaseException:
            traceback.print_exc()
            codes[name] = "exception"
print("CODES " + json.dumps(codes))
"""


def _argv(**kv) -> list[str]:
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="module")
def batch(world):
    root = world["root"] / "batch"
    root.mkdir()
    common = {"task.max_seq_length": SEQ, "train.device": "cpu", "checkpoint.dir": "null", "train.micro_batch_size": 4}
    jobs = {"stsb": overrides(world, "stsb", root / "stsb")}
    for name in ("glue", "ner", "squad", "race"):
        jobs[f"predict_{name}"] = _argv(task=TASKS[name][0], **{
            "task.mode": "predict", "task.data_dir": world[f"data_{name}"],
            "task.pretrained": finetuned(world, name) / "checkpoints", "run_dir": root / f"predict_{name}", **common})
    glue_ckpt = finetuned(world, "glue") / "checkpoints"
    jobs["evaluate_glue"] = _argv(task="glue", **{
        "task.mode": "evaluate", "task.data_dir": world["data_glue"], "task.pretrained": glue_ckpt,
        "task.predictions_file": root / "evaluate_glue" / "dev_predictions.jsonl", "run_dir": root / "evaluate_glue",
        **common})
    bad = Path(world["data_glue"]) / "bad.tsv"
    bad.write_text("good movie\tpos\nbad film\tneg\nit was\tgood\tfun\tpos\n")
    jobs["malformed"] = _argv(task="glue", **{
        "task.train_file": bad, "task.valid_file": Path(world["data_glue"]) / "dev.tsv",
        "task.pretrained": world["ckpt"], "run_dir": root / "malformed", **common})
    jobs["evaluate_pretrained"] = _argv(task="glue", **{
        "task.mode": "evaluate", "task.data_dir": world["data_glue"], "task.pretrained": world["ckpt"],
        "run_dir": root / "evaluate_pretrained", **common})
    for job in jobs:
        jobs[job] = {"argv": [str(a) for a in jobs[job]], "stderr": str(root / f"{job}.stderr")}
    res = subprocess.run([sys.executable, "-c", BATCH, json.dumps(jobs)], capture_output=True, text=True,
                         timeout=240, env=env(), cwd=REPO)
    codes = [ln for ln in res.stdout.splitlines() if ln.startswith("CODES ")]
    assert res.returncode == 0 and codes, f"batch failed\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    out = {"root": root, "codes": json.loads(codes[-1][6:]),
           "stderr": {j: Path(jobs[j]["stderr"]).read_text() for j in jobs}, "stdout": res.stdout}
    return out


def _job_ok(batch, job):
    assert batch["codes"][job] == 0, f"{job}: exit {batch['codes'][job]}\n{batch['stderr'][job][-3000:]}"


def test_regression_stsb_layout_trains(world, batch):
    """GLUE STS-B layout: float labels, MSE loss, pearson/spearman eval lines, regression head meta (TP=1)."""
    _job_ok(batch, "stsb")
    check_training_run("stsb", batch["root"] / "stsb")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()]


def test_predict_glue_unlabeled_test_split(world, batch):
    """predict mode prefers the test split (unlabeled): jsonl {id, prediction}, one row per example, right."""
    _job_ok(batch, "predict_glue")
    rows = _jsonl(batch["root"] / "predict_glue" / "predictions.jsonl")
    truth = world["glue_test_truth"]
    assert len(rows) == len(truth) and all(set(r) == {"id", "prediction"} for r in rows), rows[:3]
    assert [r["id"] for r in rows] == [f"test.tsv:{i}" for i in range(2, len(truth) + 2)]
    right = sum(r["prediction"] == t for r, t in zip(rows, truth))
    assert right >= 0.9 * len(truth), (rows, truth)
    assert metrics(batch["root"] / "predict_glue", "valid") == []  # no labels, no metrics line


def test_evaluate_glue_reshards_and_matches_training_eval(world, batch):
    """evaluate mode at TP=1 on the TP=2 fine-tuned checkpoint: the same metrics as the run's last eval."""
    _job_ok(batch, "evaluate_glue")
    (line,) = metrics(batch["root"] / "evaluate_glue", "valid")
    final = metrics(finetuned(world, "glue"), "valid")[-1]
    assert line["mode"] == "evaluate" and line["step"] == final["step"] == TASKS["glue"][3]
    assert abs(line["loss"] - final["loss"]) <= 1e-4 and line["accuracy"] == final["accuracy"], (line, final)
    rows = _jsonl(batch["root"] / "evaluate_glue" / "dev_predictions.jsonl")
    assert len(rows) == 24 and all(set(r) == {"id", "prediction", "label"} for r in rows)
    assert sum(r["prediction"] == r["label"] for r in rows) == round(line["accuracy"] * 24)


def test_predict_ner_conll_file(world, batch):
    _job_ok(batch, "predict_ner")
    text = (batch["root"] / "predict_ner" / "predictions.txt").read_text()
    sentences = [s.splitlines() for s in text.strip("\n").split("\n\n")]
    assert len(sentences) == 16 and text.endswith("\n\n")
    tags = {"O", "B-PER", "I-PER", "B-LOC", "B-ORG", "I-ORG"}
    lines = [ln.split(" ") for s in sentences for ln in s]
    assert all(len(p) == 3 and p[1] in tags and p[2] in tags for p in lines), lines[:5]
    assert sum(p[1] == p[2] for p in lines) >= 0.9 * len(lines)
    (line,) = metrics(batch["root"] / "predict_ner", "valid")
    assert line["mode"] == "predict" and line["f1"] >= 0.9


def test_predict_squad_json(world, batch):
    _job_ok(batch, "predict_squad")
    preds = json.loads((batch["root"] / "predict_squad" / "predictions.json").read_text())
    gold = {qa["id"]: qa["answers"][0]["text"] for p in json.loads(
        (Path(world["data_squad"]) / "dev-v1.1.json").read_text())["data"][0]["paragraphs"] for qa in p["qas"]}
    assert set(preds) == set(gold) and all(isinstance(v, str) for v in preds.values())
    assert sum(preds[q] == gold[q] for q in gold) >= 0.9 * len(gold), (preds, gold)
    nbest = json.loads((batch["root"] / "predict_squad" / "predictions_nbest.json").read_text())
    assert set(nbest) == set(gold) and nbest["q0"][0]["text"] == preds["q0"]


def test_predict_race_jsonl(world, batch):
    _job_ok(batch, "predict_race")
    rows = _jsonl(batch["root"] / "predict_race" / "predictions.jsonl")
    assert len(rows) == 16 and all(set(r) == {"id", "prediction", "label"} for r in rows)
    assert all(r["prediction"] in "ABCD" for r in rows) and rows[0]["id"] == "a0:0"
    assert sum(r["prediction"] == r["label"] for r in rows) >= 14


@pytest.mark.parametrize("job,message", [
    ("malformed", "bad.tsv:3: expected 2 tab-separated columns, found 4"),
    ("evaluate_pretrained", "has a 'pretraining' head, not a fine-tuned 'sequence_classification' one"),
])
def test_bad_input_gives_one_line_error(batch, job, message):
    assert batch["codes"][job] not in (0, "exception"), batch["stderr"][job]
    lines = [ln for ln in batch["stderr"][job].splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], batch["stderr"][job]
