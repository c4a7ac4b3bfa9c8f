"""Checkpointing end to end through `python -m megatron_bert.train` / torchrun on CPU (fp32, dropout on).

One uninterrupted TP=2 run of 20 steps (saving every 5 steps) is the reference for:
bit-exact resume at TP=2 (with async save, compared tensor by tensor with the sync save), resharding
to TP=1 / TP=4 / TP=2×DP=2, kill -9 during a save, SIGTERM on one rank, train.max_time, one-line
errors and the inspect / consolidate command. Runs that do not depend on each other are started
concurrently to keep the wall time down (the reference trains while the kill -9 / SIGTERM test, which does
not need it, runs).
"""
import os
import random
import shutil
import signal
import sys

import pytest
import torch

from checkpoint_checks import (
    LatestWatcher,
    describe,
    finish,
    kill_tree,
    launch,
    metric_rows,
    pickle_calling_os_system,
    rank_pid,
    wait_for,
)
from megatron_bert.checkpoint import latest_checkpoint, list_checkpoints, read_meta
from megatron_bert.checkpoint.__main__ import consolidate
from megatron_bert.checkpoint.__main__ import main as cli_main
from megatron_bert.checkpoint.manager import PAUSE_ENV
from megatron_bert.checkpoint.sharded import read_full_state, tensor_index
from train_fixtures import base_overrides, build_dataset, metrics

STEPS = 20
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # see test_checkpoint.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_data")
    return {**build_dataset(root), "cache": str(root / "cache")}


def overrides(data, run_dir, **extra):
    return base_overrides(data, run_dir, **{"train.max_steps": STEPS, "data.cache_dir": data["cache"], **extra})


def _ok(res):
    if isinstance(res, tuple):
        assert res[0] == 0, describe(res)
    else:
        assert res.returncode == 0, describe((res.returncode, res.stdout, res.stderr))


@pytest.fixture(scope="module")
def ref_run(data, tmp_path_factory):
    """Starts the reference run (`ref`) without waiting for it."""
    run = tmp_path_factory.mktemp("ref") / "run"
    p = launch(overrides(data, run, **{"parallel.tensor": 2, "checkpoint.save_interval": 5}), nproc=2)
    yield run, p
    if p.poll() is None:
        kill_tree(p.pid)
        p.wait()


@pytest.fixture(scope="module", autouse=True)
def _ref_starts_first(request):
    """The reference run starts with the module's first test (kill -9 / SIGTERM, which does not need it and
    runs meanwhile) when a selected test needs it."""
    if any(item.module is sys.modules[__name__] and "ref" in item.fixturenames for item in request.session.items):
        request.getfixturevalue("ref_run")


@pytest.fixture(scope="module")
def ref(ref_run):
    """20 straight steps at TP=2 (2 processes), saving every 5; step_10 is what the other runs resume from."""
    run, p = ref_run
    _ok(finish({"ref": p})["ref"])
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    root = run / "checkpoints"
    assert [s for s, _ in list_checkpoints(root)] == [10, 15, 20]  # checkpoint.keep=3 (the default)
    assert (root / "latest").read_text().strip() == "step_20"
    return {"run": run, "root": root, "rows": {r["step"]: r for r in rows}}


def _check_errors_one_line(res, what):
    rc, _, err = res
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc not in (0, None), f"{what}: expected a failure\n{describe(res)}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{what}: not one line\n{describe(res)}"
    assert "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------- crash + signals
def test_kill9_during_save_keeps_previous_then_sigterm_on_one_rank_stops_all(data, tmp_path):
    """kill -9 (every process) while the save of step 10 sits between writing and renaming:
    `latest` still names step_5, which loads; resume=auto ignores the leftover .step_10.tmp and the
    next save removes it. Then SIGTERM to rank 1 only: all ranks stop at the same step and save it."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    args = overrides(data, run, **{"parallel.tensor": 2, "train.max_steps": 1000, "checkpoint.save_interval": 5,
                                   "checkpoint.keep": 2})
    p = launch(args, nproc=2, env_extra={PAUSE_ENV: "10:120"})
    try:
        wait_for(lambda: (root / ".step_10.tmp" / "meta.json").exists(), 240, "the save of step 10", p)
        assert p.poll() is None
    finally:
        kill_tree(p.pid)  # kill -9, torchrun and both workers
        p.wait()
    assert p.returncode != 0
    assert (root / "latest").read_text().strip() == "step_5"
    assert not (root / "step_10").exists() and (root / ".step_10.tmp" / ".metadata").exists()
    assert latest_checkpoint(root) == root / "step_5"
    first = metric_rows(run)
    assert [r["step"] for r in first] == list(range(1, 11))

    p = launch(args, nproc=2)  # checkpoint.resume=auto
    try:
        wait_for(lambda: len(metric_rows(run)) >= len(first) + 7, 240, "the resumed run to reach step 12", p)
        pid = wait_for(lambda: rank_pid(p.pid, 1), 10, "rank 1's process")
        os.kill(pid, signal.SIGTERM)
        res = finish({"run": p}, timeout=180)["run"]
    finally:
        if p.poll() is None:
            kill_tree(p.pid)
    _ok(res)
    out = res[1]
    assert f"resumed from {root / 'step_5'} (step 5," in out
    second = metric_rows(run)[len(first):]
    assert second[0]["step"] == 6
    for r in second[:5]:  # steps 6..10 again, from the checkpoint: bit-exact
        assert (r["loss"], r["grad_norm"]) == (first[r["step"] - 1]["loss"], first[r["step"] - 1]["grad_norm"])
    stop = second[-1]["step"]
    assert 12 <= stop < 1000 and f"stopping at step {stop}: signal" in out
    assert (root / "latest").read_text().strip() == f"step_{stop}" and read_meta(root / f"step_{stop}")["step"] == stop
    names = sorted(os.listdir(root))
    assert not [n for n in names if n.startswith(".")], names
    assert len([n for n in names if n.startswith("step_")]) == 2, names  # keep=2


# --------------------------------------------------------------------------- resume + async save
def test_resume_is_bit_exact_and_async_save_equals_sync_save(data, ref, tmp_path):
    """10 + save + fresh processes + 10 at TP=2 == 20 straight steps (loss and grad norm, ==).
    The resumed run saves asynchronously (step 15, 20); the writer of step 15 is held for 2 s
    before the rename, so training goes on meanwhile (and changes the live tensors) while `latest`
    must never name an incomplete checkpoint; both async checkpoints must equal the reference's
    sync ones bit for bit."""
    run = tmp_path / "resumed"
    root = run / "checkpoints"
    p = launch(overrides(data, run, **{"parallel.tensor": 2, "checkpoint.resume": ref["root"] / "step_10",
                                       "checkpoint.save_interval": 5, "checkpoint.async_save": True}),
               nproc=2, env_extra={PAUSE_ENV: "15:2"})
    watcher = LatestWatcher(root, run, nranks=2)
    watcher.start()
    res = finish({"run": p})["run"]
    watcher.stop.set()
    watcher.join()
    _ok(res)
    out = res[1]
    assert f"resumed from {ref['root'] / 'step_10'} (step 10, 80 samples" in out

    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(11, STEPS + 1))
    for r in rows:
        want = ref["rows"][r["step"]]
        assert (r["loss"], r["grad_norm"]) == (want["loss"], want["grad_norm"]), f"step {r['step']}"
        assert r["consumed_samples"] == want["consumed_samples"]

    assert "saving checkpoint" in out and f"saved checkpoint {root / 'step_15'} (async" in out
    assert not watcher.bad, f"`latest` named an incomplete checkpoint: {watcher.bad}"
    pending = [step for step, names, _ in watcher.snapshots if ".step_15.tmp" in names and "step_15" not in names]
    assert pending and max(pending) >= 16, "training should go on while step_15 is written"
    assert sorted(os.listdir(root)) == ["latest", "step_15", "step_20"]  # no temp dirs left
    assert (root / "latest").read_text().strip() == "step_20"

    for step in (15, 20):
        sync, async_ = read_full_state(ref["root"] / f"step_{step}"), read_full_state(root / f"step_{step}")
        assert sync.keys() == async_.keys()
        for k in sync:
            assert torch.equal(sync[k], async_[k]), f"step {step}: {k}"
        m_sync, m_async = read_meta(ref["root"] / f"step_{step}"), read_meta(root / f"step_{step}")
        for key in ("step", "consumed_samples", "saved_tp", "saved_dp", "model", "scaler"):
            assert m_sync[key] == m_async[key], key


# --------------------------------------------------------------------------- reshard
def test_reshard_tp2_checkpoint_to_tp1_tp4_and_tp2_dp2(data, ref, tmp_path):
    src = ref["root"] / "step_10"
    layouts = {"tp1": (1, 1), "tp4": (4, 4), "tp2_dp2": (4, 2)}  # name: (processes, TP)
    procs = {name: launch(overrides(data, tmp_path / name, **{"parallel.tensor": tp, "checkpoint.resume": src}),
                          nproc=n) for name, (n, tp) in layouts.items()}
    results = finish(procs)
    for name, (n, tp) in layouts.items():
        _ok(results[name])
        assert f"saved at TP=2 DP=1, now TP={tp} DP={n // tp}" in results[name][1]
        rows = metrics(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(11, STEPS + 1)), name
        for r in rows:
            want = ref["rows"][r["step"]]
            assert abs(r["loss"] - want["loss"]) <= 1e-5, f"{name} step {r['step']}: {r['loss']} vs {want['loss']}"
            assert abs(r["grad_norm"] - want["grad_norm"]) <= 1e-4 * max(1.0, want["grad_norm"]), name

    # the consolidated TP=2 checkpoint (full tensors) matches what the TP=1 run saved at the same step
    cons = torch.load(consolidate(ref["root"] / "step_20", tmp_path / "tp2_full.pt"), weights_only=True)
    tp1 = read_full_state(tmp_path / "tp1" / "checkpoints" / "step_20")
    assert set(cons["model"]) == {k[len("model."):] for k in tp1 if k.startswith("model.")}
    for name, t in cons["model"].items():
        assert t.shape == tp1[f"model.{name}"].shape, name
        assert torch.allclose(t, tp1[f"model.{name}"], atol=1e-3, rtol=0), name


# --------------------------------------------------------------------------- errors, max_time, CLI
def test_clear_errors_max_time_and_consolidate_command(data, ref, tmp_path):
    src = ref["root"] / "step_10"
    marker = tmp_path / "PWNED"

    def damaged(name, damage):
        d = tmp_path / name / "step_10"
        shutil.copytree(src, d)
        damage(d)
        return d

    def truncate(d):
        shard = max(d.glob("*.distcp"), key=lambda f: f.stat().st_size)
        os.truncate(shard, shard.stat().st_size // 2)

    truncated = damaged("truncated", truncate)
    # fixed bytes: os.urandom's once made the unpickler allocate until MemoryError (two stderr lines)
    garbage = damaged("garbage", lambda d: (d / ".metadata").write_bytes(random.Random(5).randbytes(4096)))
    evil = damaged("evil", lambda d: (d / ".metadata").write_bytes(pickle_calling_os_system(marker)))

    errors = {  # name: (extra overrides, env, expected text)
        "other model size": ([f"checkpoint.resume={src}", "model.num_layers=3"], {},
                             "is for a different model (num_layers: checkpoint 2 vs config 3)"),
        "truncated shard": ([f"checkpoint.resume={truncated}"], {}, "a shard file is truncated, corrupt or missing"),
        "corrupt metadata": ([f"checkpoint.resume={garbage}"], {}, f"checkpoint metadata in {garbage} is corrupt"),
        "code in metadata": ([f"checkpoint.resume={evil}"], {}, "posix.system, which is not allowed"),
        "missing directory": ([f"checkpoint.resume={tmp_path / 'nope'}"], {},
                              f"checkpoint path {tmp_path / 'nope'} does not exist"),
        "TP does not divide heads": ([f"checkpoint.resume={src}", "parallel.tensor=8"], {"WORLD_SIZE": "8"},
                                     "num_attention_heads (4) is not divisible by parallel.tensor (8)"),
    }
    procs = {name: launch(overrides(data, tmp_path / f"run{i}") + extra, env_extra=env)
             for i, (name, (extra, env, _)) in enumerate(errors.items())}
    timed = tmp_path / "timed"
    procs["max_time"] = launch(overrides(data, timed, **{"train.max_steps": 1000, "train.max_time": 2,
                                                         "checkpoint.save_interval": 0}))
    full = tmp_path / "out" / "full.pt"
    procs["consolidate"] = launch(["consolidate", str(src), str(full)], module="megatron_bert.checkpoint")
    results = finish(procs)

    for name, (_, _, expected) in errors.items():
        line = _check_errors_one_line(results[name], name)
        assert expected in line, f"{name}: {line}"
        assert results[name][0] == 2
    assert not marker.exists(), "the crafted metadata ran code"

    _ok(results["max_time"])
    rows = metric_rows(timed)
    stop = rows[-1]["step"]
    assert 1 <= stop < 1000 and f"stopping at step {stop}: train.max_time reached" in results["max_time"][1]
    assert latest_checkpoint(timed / "checkpoints") == timed / "checkpoints" / f"step_{stop}"

    _ok(results["consolidate"])
    assert results["consolidate"][1].strip() == f"wrote {full}"
    obj = torch.load(full, weights_only=True)
    index = tensor_index(src)
    assert obj["meta"]["step"] == 10 and obj["meta"]["saved_tp"] == 2 and obj["meta"]["model"]["num_layers"] == 2
    assert {f"model.{k}" for k in obj["model"]} | {f"optim.{k}" for k in obj["optimizer"]} == set(index)
    for k, t in obj["model"].items():
        assert tuple(t.shape) == index[f"model.{k}"][0] and t.dtype == index[f"model.{k}"][1]


def test_inspect_command_and_its_errors(ref, tmp_path, capsys):
    """`python -m megatron_bert.checkpoint` is `sys.exit(main())`; the subprocess path is covered above."""
    assert cli_main(["inspect", str(ref["root"])]) == 0
    text = capsys.readouterr().out
    for expected in ("step: 20", "consumed_samples: 160", "saved with: TP=2 DP=1", "num_layers: 2", "hidden_size: 64"):
        assert expected in text, expected
    index = tensor_index(ref["root"] / "step_20")
    lines = {ln.split()[0]: ln for ln in text.splitlines() if ln.startswith("  ") and ln.split()[0] in index}
    assert set(lines) == set(index)
    for name, (shape, dtype, _) in index.items():
        assert f"[{', '.join(map(str, shape))}]" in lines[name] and str(dtype).replace("torch.", "") in lines[name]

    evil = tmp_path / "evil"
    shutil.copytree(ref["root"] / "step_10", evil)
    (evil / ".metadata").write_bytes(pickle_calling_os_system(tmp_path / "PWNED"))
    for argv, expected in ((["inspect", str(tmp_path / "nope")], "does not exist"),
                           (["consolidate", str(evil), str(tmp_path / "x.pt")], "posix.system, which is not allowed"),
                           (["consolidate", str(ref["root"]), str(tmp_path)], "is a directory")):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "x.pt").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
