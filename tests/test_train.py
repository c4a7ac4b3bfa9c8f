"""End-to-end trainer runs on CPU: TP/DP equivalence over 20 steps, multi-node rendezvous, config errors.
Independent subprocess runs are started concurrently (see checkpoint_checks.launch / finish)."""
import socket
import subprocess
import sys

import pytest

from checkpoint_checks import describe, finish, kill_tree, launch
from train_fixtures import REPO, base_overrides, build_dataset, env, metrics


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("train_data"))


def test_losses_match_across_tp_and_dp_with_dropout(dataset, tmp_path):
    """20 steps, dropout on, fp32: TP=1, TP=2, TP=2 + sequence parallel and TP=2×DP=2 see the same losses.
    The four runs do not depend on each other and are started at once (start-up dominates them)."""
    runs = {
        "tp1": (1, {}),
        "tp2": (2, {"parallel.tensor": 2}),
        "tp2_sp": (2, {"parallel.tensor": 2, "parallel.sequence_parallel": True}),
        "tp2_dp2": (4, {"parallel.tensor": 2}),
    }
    procs = {name: launch(base_overrides(dataset, tmp_path / name, **{"train.max_steps": 20, **extra}), nproc=nproc)
             for name, (nproc, extra) in runs.items()}
    results = finish(procs, timeout=480)
    losses = {}
    for name in runs:
        assert results[name][0] == 0, f"{name}: {describe(results[name])}"
        rows = metrics(tmp_path / name)
        assert [r["step"] for r in rows] == list(range(1, 21))
        losses[name] = [(r["loss"], r["grad_norm"]) for r in rows]
    ref = losses["tp1"]
    assert ref[-1][0] < ref[0][0], "loss should fall over 20 steps"
    for name, got in losses.items():
        for step, ((l1, g1), (l2, g2)) in enumerate(zip(ref, got), 1):
            assert abs(l1 - l2) <= 1e-5, f"{name} step {step}: loss {l2} vs tp1 {l1}"
            assert abs(g1 - g2) <= 1e-4 * max(1.0, g1), f"{name} step {step}: grad norm {g2} vs tp1 {g1}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_two_processes_each_c10d_rendezvous(dataset, tmp_path):
    """Two torchrun 'nodes' on localhost (c10d rendezvous), 2 processes each: TP=2 × DP=2."""
    port = _free_port()
    ov = base_overrides(dataset, tmp_path / "run", **{"parallel.tensor": 2, "train.max_steps": 3})
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=2",
             "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test-multinode",
             "-m", "megatron_bert.train", *ov] for _ in range(2)]
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(), cwd=REPO)
             for c in cmds]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{out[-2000:]}\n{err[-2000:]}"
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert "dp=0/2" in "".join(o for o, _ in outs) or "dp=1/2" in "".join(o for o, _ in outs)


BAD_CONFIGS = [
    (["parallel.tensor=3"], {"WORLD_SIZE": "4", "RANK": "0"}, "parallel.tensor=3 does not divide the world size 4"),
    (["train.global_batch_size=10", "train.micro_batch_size=4"], {}, "train.global_batch_size=10 is not divisible"),
    (["model=huge"], {}, "model= must be one of"),
    (["train.lr=-0.1"], {}, "train.lr=-0.1 must be > 0"),
    (["train.lrr=0.1"], {}, "Could not override 'train.lrr'"),
    (["train.precision=fp8"], {}, "train.precision='fp8' is not one of"),
    (["model.num_attention_heads=3"], {}, "not divisible by model.num_attention_heads"),
    (["parallel.tensor=4", "model.num_attention_heads=6", "model.hidden_size=96"], {"WORLD_SIZE": "4"},
     "num_attention_heads (6) is not divisible by parallel.tensor (4)"),
    (["train.device=cuda"], {"CUDA_VISIBLE_DEVICES": ""}, "device=cuda was asked for but no CUDA GPU is visible"),
]


@pytest.fixture(scope="module")
def bad_config_runs(request, tmp_path_factory):
    """`python -m megatron_bert.train` of every selected BAD_CONFIGS case, all started at once (each is
    seconds of imports on a 2-core box, one after another they were most of this file's time); each
    test waits for its own."""
    wanted = {tuple(item.callspec.params["overrides"]) for item in request.session.items
              if item.module is sys.modules[__name__] and "bad_config_runs" in item.fixturenames}
    root = tmp_path_factory.mktemp("bad_config")
    procs = {tuple(ov): launch([f"run_dir={root / f'case{i}'}", *ov], env_extra=env_extra)
             for i, (ov, env_extra, _) in enumerate(BAD_CONFIGS) if tuple(ov) in wanted}
    yield procs
    for p in procs.values():
        if p.poll() is None:
            kill_tree(p.pid)
            p.wait()


@pytest.mark.parametrize("overrides,env_extra,message", BAD_CONFIGS)
def test_bad_config_gives_one_line_before_any_process_group(bad_config_runs, overrides, env_extra, message):
    rc, _, err = finish({"run": bad_config_runs[tuple(overrides)]}, timeout=180)["run"]
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
