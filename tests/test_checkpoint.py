"""Checkpoint internals, in process (fast): the metadata allow-list, the atomic step_<N>/latest
protocol, stale-temp handling, keep, async save semantics, inspect/consolidate functions.
End-to-end runs (resume, reshard, kill -9, signals, errors, CLI) are in test_checkpoint_train.py."""
import io
import json
import os
import pickle
import random
import time

import pytest
import torch

from checkpoint_checks import pickle_calling_os_system, pickle_dotted_os_system
from megatron_bert.checkpoint import (
    AsyncCheckpointSaver,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from megatron_bert.checkpoint import async_save as async_mod
from megatron_bert.checkpoint.__main__ import consolidate
from megatron_bert.checkpoint.__main__ import inspect as inspect_ckpt
from megatron_bert.checkpoint.manager import PAUSE_ENV
from megatron_bert.checkpoint.sharded import read_full_state, read_metadata
from parallel import ParallelState

# DCP's "assuming a single process" warning is filtered process-wide by the checkpoint package; pytest
# resets filters per test, so say it again here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 8)).square().sum().backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt, keep=0):
    rng = {"cpu": torch.full((16,), step, dtype=torch.uint8)}
    return save_checkpoint(root, step, model, opt, ParallelState.single(), {"consumed_samples": step * 8},
                           rng, keep=keep)


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# --------------------------------------------------------------------------- metadata allow-list
def test_metadata_reader_refuses_code_tensors_and_escaping_paths(tmp_path):
    model, opt = _model()
    ckpt = _save(tmp_path / "ck", 1, model, opt)
    md = read_metadata(ckpt)  # the real thing passes the allow-list
    assert "model.0.weight" in md.state_dict_metadata
    real = (ckpt / ".metadata").read_bytes()

    marker = tmp_path / "PWNED"
    crafted = {
        "os.system via REDUCE": pickle_calling_os_system(marker),
        "os.system via a dotted name inside an allowed DCP module": pickle_dotted_os_system(marker),
        "a tensor": pickle.dumps(torch.zeros(2)),
        "a plain dict": pickle.dumps({"state_dict_metadata": {}}),
        "random bytes": random.Random(3).randbytes(2000),
        "a truncated real file": real[: len(real) // 2],
        "a first frame claiming a terabyte": real[:3] + (1 << 40).to_bytes(8, "little") + real[11:],
        "a protocol-0 pickle": pickle.dumps({"state_dict_metadata": {}}, protocol=0),
    }
    # a well-formed metadata whose storage points outside the checkpoint directory
    md.storage_data = {k: type(v)(relative_path="../../etc/passwd", offset=v.offset, length=v.length)
                       for k, v in md.storage_data.items()}
    crafted["a storage path escaping the directory"] = pickle.dumps(md)
    for what, payload in crafted.items():
        (ckpt / ".metadata").write_bytes(payload)
        with pytest.raises(CheckpointError, match="checkpoint metadata in .* is corrupt") as e:
            read_metadata(ckpt)
        assert "\n" not in str(e.value), what
        with pytest.raises(CheckpointError):
            load_checkpoint(ckpt, model, opt, ParallelState.single())
        assert not marker.exists(), f"{what}: the pickle ran code"
    (ckpt / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="no DCP metadata file"):
        read_metadata(ckpt)


# --------------------------------------------------------------------------- directory protocol
def test_atomic_dirs_latest_keep_and_stale_temps(tmp_path):
    root = tmp_path / "ck"
    model, opt = _model()
    for step in (1, 2, 3):
        _save(root, step, model, opt, keep=2)
    assert [s for s, _ in list_checkpoints(root)] == [2, 3]
    assert (root / "latest").read_text().strip() == "step_3"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]

    # what a crash leaves behind: a complete-looking temp dir of a newer step, a step dir without meta.json
    import shutil
    shutil.copytree(root / "step_3", root / ".step_9.tmp")
    (root / "step_7").mkdir()
    assert latest_checkpoint(root) == root / "step_3"
    assert resolve_checkpoint(root) == root / "step_3"
    with pytest.raises(CheckpointError, match="temporary directory of an interrupted save"):
        resolve_checkpoint(root / ".step_9.tmp")
    # `latest` naming something that is gone / bogus → newest complete step dir
    (root / "latest").write_text("step_99\n")
    assert latest_checkpoint(root) == root / "step_3"
    (root / "latest").write_text("../elsewhere\n")
    assert latest_checkpoint(root) == root / "step_3"

    # the next save removes the leftover temp dir; keep never deletes the checkpoint just written,
    # even when an older run left a higher step number behind
    shutil.copytree(root / "step_3", root / "step_50")
    expected = _params(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    _save(root, 4, model, opt, keep=2)
    names = sorted(p.name for p in root.iterdir())
    assert ".step_9.tmp" not in names and not any(n.endswith(".old") for n in names), names
    assert "step_4" in names and (root / "latest").read_text().strip() == "step_4"
    assert [s for s, _ in list_checkpoints(root)] == [4, 50]

    # re-saving an existing step replaces it; the reloaded state is the saved one (model + AdamW)
    _save(root, 2, model, opt)
    fresh, fresh_opt = _model(seed=1)
    ckpt, meta, rng = load_checkpoint(root / "step_4", fresh, fresh_opt, ParallelState.single())
    assert meta["step"] == 4 and meta["consumed_samples"] == 32 and meta["saved_tp"] == 1
    assert torch.equal(rng["cpu"], torch.full((16,), 4, dtype=torch.uint8))
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key])
    assert not torch.equal(expected["0.weight"], fresh[0].weight)


# --------------------------------------------------------------------------- mixed precision
class _MasterWeights:
    """Stand-in for a mixed-precision optimizer (the interface the checkpoint code relies on):
    bf16 model parameters, fp32 masters in ``master_of`` owned by the AdamW in ``state``/``param_groups``."""

    def __init__(self, model):
        self.master_of = {p: torch.nn.Parameter(p.detach().float().clone()) for p in model.parameters()}
        model.to(torch.bfloat16)
        self.master_of = {p: m for p, m in zip(model.parameters(), self.master_of.values())}
        self.optimizer = torch.optim.AdamW(list(self.master_of.values()), lr=1e-2)
        self.state, self.param_groups = self.optimizer.state, self.optimizer.param_groups

    def step(self):
        for p, m in self.master_of.items():
            m.grad = p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for p, m in self.master_of.items():
                p.copy_(m)


def _mixed(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    opt = _MasterWeights(model)
    model(torch.randn(3, 8, dtype=torch.bfloat16)).float().square().sum().backward()
    opt.step()
    return model, opt


def test_mixed_precision_checkpoints_hold_the_fp32_masters_and_their_moments(tmp_path):
    from megatron_bert.checkpoint.sharded import tensor_index

    model, opt = _mixed(0)
    ckpt = _save(tmp_path / "ck", 1, model, opt)
    assert {dtype for _, dtype, _ in tensor_index(ckpt).values()} == {torch.float32}
    fresh, fresh_opt = _mixed(1)
    load_checkpoint(ckpt, fresh, fresh_opt, ParallelState.single())
    for (p, m), (q, n) in zip(opt.master_of.items(), fresh_opt.master_of.items()):
        assert torch.equal(m, n), "the fp32 master must come back bit for bit"
        assert q.dtype == torch.bfloat16 and torch.equal(q, n.to(torch.bfloat16))
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[m][key], fresh_opt.state[n][key]), key
    # weights only (fine-tuning from a checkpoint): masters and model get them, the moments do not
    other, other_opt = _mixed(2)
    load_checkpoint(ckpt, other, other_opt, ParallelState.single(), strict=False, load_optimizer=False)
    for (p, m), n in zip(opt.master_of.items(), other_opt.master_of.values()):
        assert torch.equal(m, n) and not torch.equal(opt.state[m]["exp_avg"], other_opt.state[n]["exp_avg"])


# --------------------------------------------------------------------------- async save
def test_async_save_copies_first_writes_later_and_publishes_last(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    model, opt = _model()
    _save(root, 1, model, opt)
    saved_params = _params(model)
    saved_moments = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}

    real_write = async_mod.write_state
    monkeypatch.setattr(async_mod, "write_state", lambda *a, **k: (time.sleep(0.4), real_write(*a, **k)))
    monkeypatch.setenv(PAUSE_ENV, "2:0.6")  # the writer also pauses before the rename
    saver = AsyncCheckpointSaver(ParallelState.single(), log=lambda s: None)
    t0 = time.perf_counter()
    final, held = saver.save(root, 2, model, opt, {"consumed_samples": 16}, {"cpu": torch.ones(4, dtype=torch.uint8)})
    assert time.perf_counter() - t0 < 0.35 and held < 0.35, "save() must not wait for the write"
    assert saver.pending == final == root / "step_2"
    # training goes on and changes the live tensors while the write is pending
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
            opt.state[p]["exp_avg"].mul_(0)
    pointer = root / "latest"
    assert pointer.read_text() == "step_1\n" and not final.exists()
    time.sleep(0.6)  # shards are written now, the rename is still pending
    assert (root / ".step_2.tmp" / ".metadata").exists() and pointer.read_text() == "step_1\n"
    saver.wait()
    assert saver.pending is None and pointer.read_text() == "step_2\n" and latest_checkpoint(root) == final
    full = read_full_state(final)
    for n in saved_params:
        assert torch.equal(full[f"model.{n}"], saved_params[n]), n
        assert torch.equal(full[f"optim.{n}.exp_avg"], saved_moments[n]), n
    assert json.loads((final / "meta.json").read_text())["step"] == 2

    # a failing background write surfaces at the next wait(), and `latest` stays where it was
    def broken(*a, **k):
        raise CheckpointError("could not write checkpoint: disk full")

    monkeypatch.setattr(async_mod, "write_state", broken)
    saver.save(root, 3, model, opt, {"consumed_samples": 24})
    with pytest.raises(CheckpointError, match="disk full"):
        saver.close()
    assert pointer.read_text() == "step_2\n" and not (root / "step_3").exists()


# --------------------------------------------------------------------------- inspect / consolidate
def test_inspect_and_consolidate_functions(tmp_path):
    model, opt = _model()
    ckpt = _save(tmp_path / "ck", 5, model, opt)
    buf = io.StringIO()
    inspect_ckpt(tmp_path / "ck", out=buf)
    text = buf.getvalue()
    assert "step: 5" in text and "consumed_samples: 40" in text and "TP=1 DP=1" in text
    assert "model.0.weight" in text and "[16, 8]" in text and "float32" in text
    out = consolidate(ckpt, tmp_path / "out" / "full.pt")
    data = torch.load(out, weights_only=True)
    assert set(data) == {"model", "optimizer", "meta"} and data["meta"]["step"] == 5
    for n, p in model.named_parameters():
        assert torch.equal(data["model"][n], p.detach())
        assert torch.equal(data["optimizer"][f"{n}.exp_avg_sq"], opt.state[p]["exp_avg_sq"])
    small = torch.load(consolidate(ckpt, tmp_path / "m.pt", model_only=True), weights_only=True)
    assert set(small) == {"model", "meta"}
    with pytest.raises(CheckpointError, match="is a directory"):
        consolidate(ckpt, tmp_path)
