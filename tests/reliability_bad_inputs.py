"""Bad inputs, one fresh interpreter: ``python tests/reliability_bad_inputs.py WORKDIR OUT.json``.

Trains a 2-step checkpoint in-process (the *protected* checkpoint), damages copies of the data and of
that checkpoint, then calls ``megatron_bert.train.main(argv)`` in-process for every row of ``CASES``
(single process: the errors come before any process group) with stdout/stderr captured at the file
descriptor level. Every run points ``checkpoint.dir`` at the protected checkpoint and asks for 3
steps, so a bad input that slipped through would resume from step 2 and save step 3 next to it.
OUT.json holds, per case: the exit code, the captured stderr, and whether the protected directory
(every file's bytes, ``latest``) is unchanged. tests/test_reliability.py checks the rows; RELIABILITY.md lists them.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (id, overrides, extra environment, text the one error line must contain)
# Placeholders: {data} {tok} (good dataset / tokenizer), {ckpt} (protected root), {step} (its step_2),
# {bad} (directory of damaged copies).
CASES = [
    # ---- config: types, ranges, choices, layouts (all before any process group)
    ("cfg-wrong-type-int", ["train.max_steps=ten"], {}, "train.max_steps"),
    ("cfg-wrong-type-bool", ["parallel.sequence_parallel=maybe"], {}, "parallel.sequence_parallel"),
    ("cfg-unknown-appended-key", ["+train.foo=1"], {}, "foo"),
    ("cfg-override-without-value", ["train.lr"], {}, "train.lr"),
    ("cfg-dash-option", ["--lr=1e-4"], {}, "unknown option --lr=1e-4: arguments are key=value overrides"),
    ("cfg-negative-max-steps", ["train.max_steps=-1"], {}, "train.max_steps=-1 must be >= 0"),
    ("cfg-zero-micro-batch", ["train.micro_batch_size=0"], {}, "must be >= 1"),
    ("cfg-zero-log-interval", ["train.log_interval=0"], {}, "train.log_interval=0 must be >= 1"),
    ("cfg-negative-save-interval", ["checkpoint.save_interval=-5"], {}, "must be >= 0"),
    ("cfg-bad-max-time", ["train.max_time=1h"], {}, "train.max_time='1h' is not seconds or HH:MM:SS"),
    ("cfg-warmup-fraction-range", ["optim.warmup_fraction=2"], {}, "optim.warmup_fraction=2.0 must be in [0, 1]"),
    ("cfg-decay-fraction-range", ["optim.lr_schedule=wsd", "optim.decay_fraction=1.5"], {},
     "optim.decay_fraction=1.5 must be in [0, 1]"),
    ("cfg-grad-reduce-param-without-zero", ["optim.grad_reduce_dtype=param"], {},
     "optim.grad_reduce_dtype=param is a mode of the distributed optimizer"),
    ("cfg-optimizer-choice", ["optim.name=sgd"], {}, "optim.name='sgd' is not one of adamw, lamb"),
    ("cfg-decay-style-choice", ["optim.decay_style=exp"], {}, "optim.decay_style='exp' is not one of linear, cosine, 1-sqrt"),
    ("cfg-min-lr-above-lr", ["optim.min_lr=1"], {}, "optim.min_lr=1.0 must be in [0, train.lr]"),
    ("cfg-recompute-choice", ["parallel.recompute=some"], {}, "parallel.recompute='some' is not one of"),
    ("cfg-dropout-range", ["model.hidden_dropout=1.5"], {}, "model.hidden_dropout must be in [0, 1)"),
    ("cfg-zero-layers", ["model.num_layers=0"], {}, "model.num_layers must be >= 1"),
    ("cfg-zero-tensor-parallel", ["parallel.tensor=0"], {}, "parallel.tensor=0 must be >= 1"),
    ("cfg-ffn-vs-tp", ["parallel.tensor=2", "model.ffn_hidden_size=255"], {"WORLD_SIZE": "2"},
     "model.ffn_hidden_size (255) is not divisible by parallel.tensor (2)"),
    ("cfg-seq-above-max-positions", ["data.seq_length=1024"], {},
     "data.seq_length=1024 must be in [1, model.max_position_embeddings=512]"),
    ("cfg-seq-vs-tp-with-sp", ["parallel.tensor=2", "parallel.sequence_parallel=true", "data.seq_length=63"],
     {"WORLD_SIZE": "2"}, "data.seq_length=63 must be divisible by parallel.tensor=2"),
    ("cfg-masked-lm-prob", ["data.masked_lm_prob=0"], {}, "data.masked_lm_prob=0.0 must be in (0, 1]"),
    ("cfg-max-ngrams", ["data.max_ngrams=0"], {}, "data.max_ngrams=0 must be >= 1"),
    ("cfg-ngram-distribution-choice", ["data.ngram_distribution=poisson"], {},
     "data.ngram_distribution='poisson' is not one of harmonic, geometric"),
    ("cfg-dist-timeout", ["train.dist_timeout=0"], {}, "train.dist_timeout=0.0 must be > 0"),
    ("cfg-max-bad-steps", ["train.max_bad_steps=0"], {}, "train.max_bad_steps=0 must be >= 1"),
    ("cfg-heartbeat-interval", ["train.heartbeat_interval=-1"], {}, "train.heartbeat_interval=-1.0 must be >= 0"),
    ("cfg-on-error-choice", ["checkpoint.on_error=ignore"], {},
     "checkpoint.on_error='ignore' is not one of exit, retry"),
    ("cfg-negative-retries", ["checkpoint.retries=-1"], {}, "checkpoint.retries=-1 must be >= 0"),
    ("cfg-checkpoint-dir-is-file", ["checkpoint.dir={bad}/a_file"], {}, "is not a directory"),
    ("cfg-profile-steps-order", ["train.profile_steps=[5,2]"], {}, "train.profile_steps=[5, 2] must be [START,END]"),
    ("cfg-profile-rank-outside", ["train.profile_ranks=[4]"], {}, "train.profile_ranks=[4] names ranks outside 0..0"),
    ("cfg-best-mode-choice", ["checkpoint.best_mode=up"], {}, "checkpoint.best_mode='up' is not one of auto, max, min"),
    ("cfg-early-stop-without-metric", ["train.early_stop_patience=3"], {},
     "train.early_stop_patience=3 needs checkpoint.best_metric"),
    ("cfg-best-metric-without-eval", ["checkpoint.best_metric=lm_loss", "train.eval_iters=0"], {},
     "checkpoint.best_metric=lm_loss needs evaluations, but train.eval_iters=0 turns them off"),
    # found at the first evaluation (the metric names are the task's): step 3 trains, nothing is saved
    ("run-best-metric-unknown", ["checkpoint.best_metric=nope"], {},
     "checkpoint.best_metric=nope is not a metric of this evaluation (it reports: "),
    ("cfg-bad-fault-spec", [], {"MEGATRON_BERT_FAULT_NAN": "soon"}, "MEGATRON_BERT_FAULT_NAN='soon' is not"),
    # ---- data
    ("data-missing-prefix", ["data.prefix={bad}/nope/docs"], {}, "nope/docs"),
    ("data-prefix-unset", ["data.prefix=null"], {}, "data.prefix is not set"),
    ("data-blend-member-missing", ["data.prefix=[0.5,{data},0.5,{bad}/nope/docs]"], {}, "nope/docs.idx"),
    ("data-blend-out-of-order", ["data.prefix=[0.5,{data},{data}]"], {}, "mixes weights and paths out of order"),
    ("data-blend-zero-weight", ["data.prefix=[0,{data}]"], {}, "weights must be finite and > 0"),
    ("data-valid-prefix-zero-weight", ["data.valid_prefix=[0,{data}]"], {}, "data.valid_prefix: the weight of"),
    ("data-valid-prefix-missing", ["data.valid_prefix={bad}/nope/docs"], {}, "nope/docs.idx"),
    ("data-truncated-idx", ["data.prefix={bad}/trunc_idx/docs"], {}, "truncated"),
    ("data-truncated-bin", ["data.prefix={bad}/trunc_bin/docs"], {}, "truncated or corrupt data"),
    ("data-missing-bin", ["data.prefix={bad}/no_bin/docs"], {}, "indexed dataset file missing"),
    ("data-not-an-index", ["data.prefix={bad}/bad_magic/docs"], {}, "not a megatron-bert index"),
    ("data-empty-dataset", ["data.prefix={bad}/empty/docs"], {}, "no training samples"),
    ("data-tokenizer-mismatch", ["data.tokenizer={bad}/small_vocab.txt"], {}, "exceed the tokenizer's vocab"),
    ("data-tokenizer-missing", ["data.tokenizer={bad}/nope.model"], {}, "tokenizer file not found"),
    ("data-tokenizer-unset", ["data.tokenizer=null"], {}, "data.tokenizer is not set"),
    ("data-tokenizer-corrupt", ["data.tokenizer={bad}/garbage.model"], {}, "is not a readable SentencePiece model"),
    ("data-tokenizer-dir-empty", ["data.tokenizer={bad}/empty_dir"], {}, "no vocab.txt or *.model tokenizer file"),
    # ---- checkpoints (resume from damaged copies; the protected one must stay as it was)
    ("ckpt-resume-path-is-file", ["checkpoint.resume={bad}/a_file"], {}, "is not a directory"),
    ("ckpt-resume-temp-dir", ["checkpoint.resume={bad}/.step_2.tmp"], {}, "temporary directory of an interrupted save"),
    ("ckpt-resume-dir-without-checkpoint", ["checkpoint.resume={bad}/empty_dir"], {}, "holds no complete checkpoint"),
    ("ckpt-corrupt-meta-json", ["checkpoint.resume={bad}/bad_meta/step_2"], {}, "meta.json is unreadable"),
    ("ckpt-unknown-format-version", ["checkpoint.resume={bad}/bad_version/step_2"], {}, "has checkpoint format 99"),
    ("ckpt-missing-shard", ["checkpoint.resume={bad}/no_shard/step_2"], {}, "truncated, corrupt or missing"),
    ("ckpt-corrupt-rng", ["checkpoint.resume={bad}/bad_rng/step_2"], {}, "rank_00000.pt is unreadable"),
    ("ckpt-dotted-pickle-global", ["checkpoint.resume={bad}/dotted/step_2"], {}, "is not allowed"),
    ("ckpt-other-hidden-size", ["checkpoint.resume={step}", "model.hidden_size=128"], {},
     "hidden_size: checkpoint 64 vs config 128"),
    ("ckpt-pretrained-missing", ["checkpoint.resume=none", "task.pretrained={bad}/nope"], {}, "does not exist"),
    # ---- disk faults while saving (single process, checkpoint.on_error=exit): resume step_2, fail saving step_3
    ("disk-full-on-save", [], {"MEGATRON_BERT_FAULT_SAVE": "ENOSPC:3"},
     "could not save checkpoint step_3: rank 0: OSError: [Errno 28] No space left on device"),
    ("disk-full-on-async-save", ["checkpoint.async_save=true"],
     {"MEGATRON_BERT_FAULT_SAVE": "ENOSPC:3:distcp"}, "could not save checkpoint step_3: rank 0: OSError: [Errno 28]"),
    ("disk-permission-denied-meta", [], {"MEGATRON_BERT_FAULT_SAVE": "EACCES:3:meta.json"},
     "could not save checkpoint step_3: rank 0: PermissionError: [Errno 13] Permission denied"),
]


def base(data: dict, run: Path, cache: Path, ckpt: Path) -> list[str]:
    sys.path.insert(0, str(HERE))
    from train_fixtures import base_overrides

    return base_overrides(data, run, **{"train.max_steps": 3, "data.cache_dir": str(cache),
                                        "checkpoint.dir": str(ckpt), "train.heartbeat_interval": 0})


@contextlib.contextmanager
def captured():
    """stdout/stderr of Python *and* of C libraries (fd 1/2) into temporary files: yields a dict filled on exit."""
    out: dict = {}
    files = [tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")]
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(files[0].fileno(), 1)
    os.dup2(files[1].fileno(), 2)
    try:
        with contextlib.redirect_stdout(files[0]), contextlib.redirect_stderr(files[1]):
            yield out
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for f in files:
            f.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        for key, f in zip(("stdout", "stderr"), files):
            f.seek(0)
            out[key] = f.read()
            f.close()


def snapshot(root: Path) -> dict:
    """Every path under ``root`` → the sha1 of its bytes (``"dir"`` for directories)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def prepare(work: Path, data: dict, step: Path) -> Path:
    """Damaged copies of the dataset, tokenizer and checkpoint under ``work/bad``."""
    from checkpoint_checks import pickle_dotted_os_system

    from megatron_bert.data.indexed import IndexedDataset, write_indexed_dataset

    bad = work / "bad"
    bad.mkdir()
    (bad / "a_file").write_text("not a directory\n")
    (bad / "empty_dir").mkdir()
    src = Path(data["prefix"])
    def bad_magic(p):
        Path(f"{p}.idx").write_bytes(b"NOTANIDX" + Path(f"{p}.idx").read_bytes()[8:])

    for name, damage in {"trunc_idx": lambda p: os.truncate(f"{p}.idx", os.path.getsize(f"{p}.idx") - 5),
                         "trunc_bin": lambda p: os.truncate(f"{p}.bin", os.path.getsize(f"{p}.bin") // 2),
                         "no_bin": lambda p: os.unlink(f"{p}.bin"), "bad_magic": bad_magic}.items():
        (bad / name).mkdir()
        for ext in (".idx", ".bin"):
            shutil.copy(f"{src}{ext}", bad / name / f"docs{ext}")
        damage(bad / name / "docs")
    (bad / "empty").mkdir()
    write_indexed_dataset(bad / "empty" / "docs", [[[10, 11, 12]]] * 3, vocab_size=300)
    assert int(IndexedDataset(src).tokens.max()) >= 20  # so a 20-token vocab cannot cover the data
    (bad / "small_vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                                                  + [f"w{i}" for i in range(15)]) + "\n")
    (bad / "garbage.model").write_bytes(random.Random(1).randbytes(2048))  # seeded: one path every run

    def ckpt_copy(name, damage):
        d = bad / name / "step_2"
        shutil.copytree(step, d)
        damage(d)

    shutil.copytree(step, bad / ".step_2.tmp")
    ckpt_copy("bad_meta", lambda d: (d / "meta.json").write_bytes(b"{\"step\": 2, trunc"))
    ckpt_copy("bad_version", lambda d: (d / "meta.json").write_text(
        json.dumps({**json.loads((d / "meta.json").read_text()), "format_version": 99})))
    ckpt_copy("no_shard", lambda d: [p.unlink() for p in d.glob("*.distcp")])
    ckpt_copy("bad_rng", lambda d: (d / "rng" / "rank_00000.pt").write_bytes(random.Random(2).randbytes(512)))
    ckpt_copy("dotted", lambda d: (d / ".metadata").write_bytes(pickle_dotted_os_system(work / "PWNED")))
    return bad


def main(work: Path, out_json: Path) -> int:
    sys.path.insert(0, str(HERE))
    from train_fixtures import build_dataset

    import megatron_bert.training.metrics  # noqa: F401  (outside captured(): MetricsWriter's default stream is sys.stdout)
    from megatron_bert.train import main as train_main

    data = build_dataset(work.parent / "data") if not (work.parent / "data" / "docs.idx").exists() \
        else {"prefix": str(work.parent / "data" / "docs"), "tokenizer": str(work.parent / "data" / "spm.model")}
    cache, ckpt = work / "cache", work / "protected"
    with captured() as first:
        rc = train_main(base(data, work / "first", cache, ckpt) + ["train.max_steps=2", "checkpoint.save_interval=2"])
    if rc != 0 or (ckpt / "latest").read_text().strip() != "step_2":
        print(f"could not make the protected checkpoint (exit {rc})\n{first}", file=sys.stderr)
        return 1
    bad = prepare(work, data, ckpt / "step_2")
    before = snapshot(ckpt)
    subs = {"data": data["prefix"], "tok": data["tokenizer"], "ckpt": str(ckpt), "step": str(ckpt / "step_2"),
            "bad": str(bad)}
    results = {}
    for i, (name, overrides, env, _) in enumerate(CASES):
        argv = base(data, work / f"run{i}", cache, ckpt) + [o.format(**subs) for o in overrides]
        saved_env = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with captured() as res:
                try:
                    rc = train_main(argv)
                except BaseException as e:  # a crash is a failed row, not a failed driver
                    rc = f"raised {type(e).__name__}: {e}"
        finally:
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        after = snapshot(ckpt)
        results[name] = {"rc": rc, "stderr": res["stderr"], "stdout": res["stdout"][-2000:],
                         "checkpoint_unchanged": after == before,
                         "checkpoint_diff": sorted(set(after.items()) ^ set(before.items()))[:6]}
    results["_pwned"] = (work / "PWNED").exists()
    out_json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
