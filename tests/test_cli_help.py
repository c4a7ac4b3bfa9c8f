"""The entry point's own flags: --help lists every config group with its options and every key,
--cfg job prints the resolved (validated) config, any other dash argument is one error line."""
import pytest
import yaml

from megatron_bert.train import main
from megatron_bert.training.config import compose


def _run(argv, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_lists_groups_options_and_keys(capsys, monkeypatch):
    code, out, err = _run(["--help"], capsys, monkeypatch)
    assert code == 0 and err == ""
    assert "usage: torchrun --nproc_per_node=N -m megatron_bert.train [key=value ...]" in out
    assert "  model=1.3b|3.9b|345m|base|tiny  (default: tiny)" in out
    assert "  optim=adamw|lamb  (default: adamw)" in out
    cfg = compose([])
    for section in ("model", "parallel", "data", "task", "optim", "train", "checkpoint"):
        line = next(ln for ln in out.splitlines() if ln.startswith(f"  {section}.*: "))
        assert line.split(": ", 1)[1].split(", ") == list(cfg[section].keys())
    assert _run(["-h", "model=base"], capsys, monkeypatch)[1] == out


def test_cfg_job_prints_the_resolved_config(capsys, monkeypatch):
    code, out, err = _run(["--cfg", "job", "model=base", "parallel.tensor=2", "optim=lamb"], capsys, monkeypatch)
    assert code == 0 and err == ""
    cfg = yaml.safe_load(out)
    assert cfg["model"]["hidden_size"] == 768 and cfg["parallel"]["tensor"] == 2
    assert cfg["optim"]["name"] == "lamb" and cfg["optim"]["eps"] == 1e-6
    assert cfg["run_dir"] == "runs/pretrain-base"  # interpolations resolved


@pytest.mark.parametrize("argv,message", [
    (["--foo"], "error: unknown option --foo: arguments are key=value overrides"),
    (["-m", "train.lr=1e-4,3e-4"], "error: -m: Hydra's multirun is not used here; python launch/sweep.py"),
    (["--cfg"], "error: --cfg: only --cfg job (print the resolved config) is supported"),
    (["--cfg", "hydra"], "error: --cfg hydra: only --cfg job"),
    (["--cfg", "job", "train.lr=-1"], "error: train.lr=-1.0 must be > 0"),
])
def test_bad_flags_give_one_line(argv, message, capsys, monkeypatch):
    code, out, err = _run(argv, capsys, monkeypatch)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and out == "" and len(lines) == 1 and lines[0].startswith(message), err
