"""Fault injection on CPU (gloo), through torchrun, with the test-only hooks of megatron_bert/training/faults.py.

The runs of this module are started by the module fixture ``runs``, two at a time in a fixed order
(plus the hang run, which mostly sleeps: all at once was slower on 2 cores), and each test waits for its
own: an uninterrupted reference and a run whose rank 1 is SIGKILLed mid-step under
``--max-restarts=1``; a rank that hangs in the DP gradient all-reduce; NaN losses in fp32 (stop) and
fp16 (skip); checkpoint writes failing with ENOSPC / EACCES; and the bad-input table, run in one
fresh interpreter by tests/reliability_bad_inputs.py. RELIABILITY.md maps every row to its test
(kill -9 during a save and SIGTERM pre-emption are tests/test_checkpoint_train.py's).
"""
import functools
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import pytest
import torch

from checkpoint_checks import RunQueue, describe, metric_rows
from megatron_bert.checkpoint import list_checkpoints
from megatron_bert.checkpoint.sharded import read_full_state
from megatron_bert.training import faults
from reliability_bad_inputs import CASES
from train_fixtures import REPO, base_overrides, build_dataset, env

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
XFAIL: dict[str, str] = {}  # name -> reason, for known gaps (strict: a fixed gap fails until removed)


def _start(args: list[str], nproc: int, env_extra: dict, torchrun: tuple = ("--standalone",)) -> subprocess.Popen:
    if nproc == 0:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun, f"--nproc_per_node={nproc}",
               "-m", "megatron_bert.train", *args]
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env={**env(), **env_extra}, cwd=REPO)
    p.logs = (out, err)
    return p


# which runs each test waits for: only the runs of the selected tests are started
NEEDS = {"test_kill9_mid_step_restarts_group_and_matches_uninterrupted_run": ("ref", "elastic"),
         "test_hung_rank_times_out_with_one_line_naming_rank_phase_step_and_heartbeat": ("hang",),
         "test_nan_on_one_rank_fp32_stops_every_rank_after_max_bad_steps_keeping_last_good_checkpoint": ("nan_fp32",),
         "test_nan_fp16_skips_the_step_and_halves_the_loss_scale": ("nan_fp16",),
         "test_disk_full_is_retried_then_permission_denied_exits_keeping_previous_checkpoint": ("disk",),
         "test_bad_input_gives_one_error_line_and_keeps_the_checkpoint": ("bad_inputs",),
         "test_no_bad_input_ran_code": ("bad_inputs",)}


@pytest.fixture(scope="module")
def runs(request, tmp_path_factory):
    wanted = {run for item in request.session.items if item.module is sys.modules[__name__]
              for run in NEEDS.get(item.originalname, ())}
    root = tmp_path_factory.mktemp("reliability")
    data = build_dataset(root / "data")
    cache = str(root / "cache")

    def ov(name, **extra):
        return base_overrides(data, root / name, **{"data.cache_dir": cache, "train.heartbeat_interval": 0, **extra})

    tp2 = {"parallel.tensor": 2, "train.max_steps": 8, "checkpoint.save_interval": 3}
    specs = {  # name: (args, processes, environment, torchrun options)
        "ref": (ov("ref", **tp2), 2, {}, ("--standalone",)),
        # torch's shared rendezvous store keeps the first attempt's addresses: see RELIABILITY.md
        "elastic": (ov("elastic", **tp2), 2, {faults.ENV_KILL: "5@1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"},
                    ("--standalone", "--max-restarts=1")),
        "hang": (ov("hang", **{"train.max_steps": 6, "train.dist_timeout": 10, "train.heartbeat_interval": 1}),
                 2, {faults.ENV_HANG: "15:3@1"}, ("--standalone",)),
        "nan_fp32": (ov("nan_fp32", **{"parallel.tensor": 2, "train.max_steps": 10, "checkpoint.save_interval": 2,
                                       "train.max_bad_steps": 3}), 2, {faults.ENV_NAN: "4x100@1"}, ("--standalone",)),
        "nan_fp16": (ov("nan_fp16", **{"train.max_steps": 5, "train.precision": "fp16"}), 2,
                     {faults.ENV_NAN: "3@1"}, ("--standalone",)),
        "disk": (ov("disk", **{"parallel.tensor": 2, "train.max_steps": 6, "checkpoint.save_interval": 2,
                               "checkpoint.on_error": "retry", "checkpoint.retries": 1, "checkpoint.retry_wait": 0}),
                 2, {faults.ENV_SAVE: "ENOSPC:4@1,EACCES:6x2@0:meta.json"}, ("--standalone",)),
        "bad_inputs": ([str(REPO / "tests" / "reliability_bad_inputs.py"), str(root / "bad_inputs"),
                        str(root / "bad_inputs.json")], 0, {}, ()),
    }
    order = ("hang", "ref", "elastic", "bad_inputs", "nan_fp32", "nan_fp16", "disk")
    assert sorted(order) == sorted(specs)
    queue = RunQueue({name: functools.partial(_start, *specs[name]) for name in order if name in wanted},
                     limit=2, uncounted=("hang",))
    yield {"root": root, "queue": queue}
    queue.close()


def _result(runs, name, timeout=300):
    return runs["queue"].wait(name, timeout=timeout), runs["root"] / name


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error: ") or ln.startswith("[rank")]


# --------------------------------------------------------------------------- elastic restart
def test_kill9_mid_step_restarts_group_and_matches_uninterrupted_run(runs):
    (rc, _, err), ref_dir = _result(runs, "ref")
    assert rc == 0, err[-3000:]
    res, run = _result(runs, "elastic")
    rc, out, err = res
    assert rc == 0, describe(res)
    # the survivor says what happened in one line; the killed rank says nothing
    # the survivor says what happened in one line (where exactly it notices depends on timing); rank 1 was killed
    lines = _error_lines(err)
    assert len(lines) == 1 and re.fullmatch(
        r"error: rank 0: lost contact with another rank in (forward/backward|gradient-norm all-reduce) \(step 5\) — "
        r"it crashed or was killed \(see its log\); under torchrun --max-restarts=N the group restarts from the "
        r"latest checkpoint", lines[0]), describe(res)
    assert f"resumed from {run / 'checkpoints' / 'step_3'} (step 3, 24 samples" in out

    ref = {r["step"]: r for r in metric_rows(ref_dir)}
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] + [4, 5, 6, 7, 8]  # attempt 1 died inside step 5
    for r in rows:  # fp32 + keyed dropout: the resumed steps are bit-identical to the uninterrupted run
        want = ref[r["step"]]
        assert (r["loss"], r["grad_norm"], r["consumed_samples"]) == (
            want["loss"], want["grad_norm"], want["consumed_samples"]), r["step"]
    ours, theirs = (read_full_state(d / "checkpoints" / "step_8") for d in (run, ref_dir))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


# --------------------------------------------------------------------------- hang
def test_hung_rank_times_out_with_one_line_naming_rank_phase_step_and_heartbeat(runs):
    """Rank 1 sleeps 15 s before the DP gradient all-reduce of step 3 (TP=1 × DP=2: the DP group is a
    new_group, so this also checks train.dist_timeout reaches the sub-groups, whose torch default is 30 min)."""
    res, run = _result(runs, "hang")
    rc, out, err = res
    assert rc != 0, describe(res)
    lines = _error_lines(err)
    assert lines[0] == ("error: rank 0: timed out after 10 s in data-parallel gradient all-reduce (step 3) — another "
                        "rank is stuck or died; raise train.dist_timeout if steps are legitimately slow"), describe(res)
    assert all(ln.startswith("error: rank 1: lost contact with another rank in data-parallel gradient all-reduce "
                             "(step 3)") for ln in lines[1:]), lines  # the sleeper, once it wakes up
    assert [r["step"] for r in metric_rows(run)] == [1, 2]
    assert "heartbeat: step 2, last step " in out and "(rank 0 in data-parallel gradient all-reduce, step 3)" in out
    beats = {r: json.loads((run / "heartbeat" / f"rank_{r}").read_text()) for r in (0, 1)}
    for r, beat in beats.items():
        assert (beat["step"], beat["phase"], beat["phase_step"]) == (2, faults.GRAD_ALLREDUCE, 3), beat
    assert beats[1]["last_step_s_ago"] >= 5


# --------------------------------------------------------------------------- numerical faults
def test_nan_on_one_rank_fp32_stops_every_rank_after_max_bad_steps_keeping_last_good_checkpoint(runs):
    """NaN loss on rank 1 (TP=2) from step 4: every rank skips steps 4, 5, 6 and stops together with one
    line; the save due at step 4 waits for a finite step, so step_2 stays the last checkpoint."""
    res, run = _result(runs, "nan_fp32")
    rc, out, err = res
    assert rc != 0, describe(res)
    root = run / "checkpoints"
    assert _error_lines(err) == [
        "error: 3 consecutive steps had a non-finite loss or gradient (last at step 6): stopping; the last good "
        f"checkpoint {root / 'step_2'} is kept — lower train.lr or use train.precision=fp32"], describe(res)
    assert "exitcode  : 3" in err  # TrainingStopped
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["skipped"] == 0 and math.isfinite(r["grad_norm"]) for r in rows[:3])
    assert all(r["skipped"] == 1 and r["grad_norm"] is None and r["loss"] is None for r in rows[3:])  # rank 0's view
    assert [s for s, _ in list_checkpoints(root)] == [2] and (root / "latest").read_text().strip() == "step_2"
    assert sorted(os.listdir(root)) == ["latest", "step_2"]
    assert all(torch.isfinite(t).all() for t in read_full_state(root / "step_2").values())


def test_nan_fp16_skips_the_step_and_halves_the_loss_scale(runs):
    res, run = _result(runs, "nan_fp16")
    rc, out, err = res
    assert rc == 0, describe(res)
    rows = {r["step"]: r for r in metric_rows(run)}
    assert sorted(rows) == [1, 2, 3, 4, 5]
    bad = rows[3]  # injected on rank 1 of TP=1 × DP=2; rank 0 logs the skip
    assert bad["skipped"] == 1 and bad["grad_norm"] is None and bad["loss_scale"] == rows[2]["loss_scale"] / 2
    for s in (2, 4, 5):
        assert rows[s]["skipped"] == 0 and math.isfinite(rows[s]["loss"]), rows[s]
    assert rows[5]["loss_scale"] == bad["loss_scale"]
    final = read_full_state(run / "checkpoints" / "step_5")
    assert all(torch.isfinite(t).all() for t in final.values())


# --------------------------------------------------------------------------- disk faults
def test_disk_full_is_retried_then_permission_denied_exits_keeping_previous_checkpoint(runs):
    """checkpoint.on_error=retry, retries=1. Step 4: rank 1's shard write fails once with ENOSPC, the retry
    succeeds. Step 6: rank 0's meta.json write fails with EACCES on both attempts (a failure on one rank
    only, after the shards): every rank agrees, the run exits with one line, step_4 stays `latest`."""
    res, run = _result(runs, "disk")
    rc, out, err = res
    assert rc != 0, describe(res)
    root = run / "checkpoints"
    assert ("warning: could not save checkpoint step_4: rank 1: OSError: [Errno 28] No space left on device "
            "(injected by MEGATRON_BERT_FAULT_SAVE)") in out
    assert "retrying in 0 s (attempt 2 of 2)" in out and f"saved checkpoint {root / 'step_4'}" in out
    lines = _error_lines(err)
    assert len(lines) == 1 and lines[0].startswith(
        "error: could not save checkpoint step_6: rank 0: PermissionError: [Errno 13] Permission denied"), describe(res)
    assert f"the last good checkpoint {root / 'step_4'} is kept" in lines[0]
    assert "exitcode  : 2" in err
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(root)) == ["latest", "step_2", "step_4"]  # no half-written step_6 / temp dir
    assert (root / "latest").read_text().strip() == "step_4"


# --------------------------------------------------------------------------- bad inputs
@pytest.fixture(scope="module")
def bad_inputs(runs):
    res, _ = _result(runs, "bad_inputs")
    assert res[0] == 0, describe(res)
    return json.loads((runs["root"] / "bad_inputs.json").read_text())


@pytest.mark.parametrize("name,overrides,env_extra,expected", [
    pytest.param(*case, id=case[0], marks=[pytest.mark.xfail(reason=XFAIL[case[0]], strict=True)] if case[0] in XFAIL
                 else []) for case in CASES])
def test_bad_input_gives_one_error_line_and_keeps_the_checkpoint(bad_inputs, name, overrides, env_extra, expected):
    r = bad_inputs[name]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert r["rc"] == 2, r
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r["stderr"]
    assert r["checkpoint_unchanged"], r["checkpoint_diff"]


def test_no_bad_input_ran_code(bad_inputs):
    assert bad_inputs["_pwned"] is False


def test_reliability_md_lists_every_case_and_test():
    text = (REPO / "RELIABILITY.md").read_text()
    missing = [c[0] for c in CASES if f"`{c[0]}`" not in text]
    missing += [name for name in globals() if name.startswith("test_") and name not in text]
    assert not missing, f"RELIABILITY.md does not mention: {missing}"


def test_fault_hooks_are_inert_unless_set(monkeypatch):
    from torch.distributed.checkpoint import filesystem

    for var in (faults.ENV_NAN, faults.ENV_KILL, faults.ENV_HANG, faults.ENV_SAVE):
        monkeypatch.delenv(var, raising=False)
    original = filesystem.FileSystem.create_stream
    assert faults.install() is None and faults.ACTIVE is None
    assert filesystem.FileSystem.create_stream is original
    monkeypatch.setenv(faults.ENV_NAN, "4x2@1,9")
    monkeypatch.setenv("RANK", "1")
    hooks = faults.install()
    assert [hooks.nan_loss(s) for s in range(3, 11)] == [False, True, True, False, False, False, True, False]
    monkeypatch.setenv(faults.ENV_SAVE, "ENOSPACE:3")
    with pytest.raises(ValueError, match="unknown errno name 'ENOSPACE'"):
        faults.install()
    monkeypatch.delenv(faults.ENV_SAVE)
    monkeypatch.delenv(faults.ENV_NAN)
    assert faults.install() is None


def test_all_finite_guard_used_before_every_save():
    from parallel import ParallelState

    ps = ParallelState.single()
    assert faults.all_finite([torch.ones(3), torch.zeros(2, 2)], ps)
    for bad in (float("nan"), float("inf"), -float("inf")):
        assert not faults.all_finite([torch.ones(3), torch.tensor([1.0, bad])], ps)


def test_collective_errors_become_one_line_naming_rank_phase_and_step(monkeypatch):
    """The texts torch's gloo backend raises (seen in the runs above) → faults.explain's line; others → None."""
    for var in ("TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    timeout = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation")
    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:11680")
    refused = RuntimeError("Gloo connectFullMesh failed with [../pair.cc:152] timed out connecting: SO_ERROR: "
                           "Connection refused, remote=[127.0.0.1]:45464")
    assert str(faults.explain(timeout, 3, "evaluation", 7, 2.5)) == (
        "rank 3: timed out after 2.5 s in evaluation (step 7) — another rank is stuck or died; "
        "raise train.dist_timeout if steps are legitimately slow")
    assert str(faults.explain(lost, 0, "checkpoint save", 4, 600)).startswith(
        "rank 0: lost contact with another rank in checkpoint save (step 4) — it crashed or was killed")
    assert str(faults.explain(refused, 1, "process-group start-up", 0, 600)) == (
        "rank 1: could not connect to the other ranks in process-group start-up — are they all running and reachable?")
    assert faults.explain(RuntimeError("CUDA out of memory"), 0, "forward/backward", 1, 600) is None
    assert faults.restart_warning() is None
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in faults.restart_warning()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert faults.restart_warning() is None  # said once, by the first attempt
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in str(faults.explain(refused, 1, "process-group start-up", 0, 600))
