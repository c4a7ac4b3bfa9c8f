"""Converter CLI: clear one-line errors (exit code 2, no traceback), the pickle allow-list, safetensors I/O."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from convert_checks import build, tiny_config
from megatron_bert.checkpoint import write_model_checkpoint
from megatron_bert.convert import ConversionError
from megatron_bert.convert.__main__ import main
from megatron_bert.convert.safetensors_io import load_file, save_file
from parallel import ParallelState

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv) -> str:
    """main(argv) must fail with exit code 2 and exactly one stderr line 'error: ...'; returns it."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


class Evil:
    """Pickles as a call to os.system: the converter must refuse instead of running it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _small_megatron(extra=None) -> dict:
    w = {"language_model.embedding.word_embeddings.weight": torch.zeros(128, 8)}
    return {"model": {**w, **(extra or {})}, "checkpoint_version": 3.0}


def test_megatron_source_errors(tmp_path, capsys):
    line = run_main(capsys, "import-megatron", tmp_path / "nope", tmp_path / "o")
    assert "does not exist" in line
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(bytes(range(256)) * 8)
    assert "not a PyTorch checkpoint" in run_main(capsys, "import-megatron", rnd, tmp_path / "o")
    txt = tmp_path / "notes.txt"
    txt.write_text("hello, I am a text file\n")
    assert "not a PyTorch checkpoint" in run_main(capsys, "import-megatron", txt, tmp_path / "o")
    z = tmp_path / "other.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("release/readme.txt", "nothing here")
    assert "without any mp_rank_XX/model_optim_rng.pt" in run_main(capsys, "import-megatron", z, tmp_path / "o")
    (tmp_path / "emptydir").mkdir()
    assert "holds no mp_rank_XX" in run_main(capsys, "import-megatron", tmp_path / "emptydir", tmp_path / "o")


@pytest.mark.parametrize("legacy", [False, True], ids=["zipfile-format", "legacy-format"])
def test_disallowed_pickle_global_is_refused(tmp_path, capsys, legacy):
    marker = tmp_path / "pwned"
    ckpt = _small_megatron()
    ckpt["args"] = Evil(marker)
    f = tmp_path / "model_optim_rng.pt"
    torch.save(ckpt, f, _use_new_zipfile_serialization=not legacy)
    line = run_main(capsys, "import-megatron", f, tmp_path / "o")
    assert "not on the allow-list" in line and "system" in line
    assert not marker.exists()


def test_megatron_layout_errors(tmp_path, capsys):
    f = tmp_path / "a.pt"
    bad = {f"language_model.mystery.block{i}.weight": torch.zeros(2) for i in range(12)}
    torch.save(_small_megatron(bad), f)
    line = run_main(capsys, "import-megatron", f, tmp_path / "o")
    assert "unknown key layout" in line and "unexpected keys (12)" in line and "mystery.block0.weight" in line
    assert "block11" not in line  # the first ten only
    # args disagree with the tensors about the padded vocabulary
    import argparse
    ckpt = _small_megatron({"language_model.embedding.position_embeddings.weight": torch.zeros(4, 8)})
    ckpt["args"] = argparse.Namespace(padded_vocab_size=256, num_attention_heads=2, hidden_size=8)
    torch.save(ckpt, f)
    assert "padded vocabulary is 256 but the tensors have 128" in run_main(capsys, "import-megatron", f, tmp_path / "o")
    # one shard of a TP=2 checkpoint given alone
    ckpt["args"] = argparse.Namespace(tensor_model_parallel_size=2, num_attention_heads=2)
    torch.save(ckpt, f)
    assert "tensor parallel size 2 but 1 rank file" in run_main(capsys, "import-megatron", f, tmp_path / "o")
    # an incomplete model: layers missing
    torch.save(_small_megatron({"language_model.embedding.position_embeddings.weight": torch.zeros(4, 8)}), f)
    line = run_main(capsys, "import-megatron", f, tmp_path / "o", "--num-attention-heads", "2")
    assert "missing" in line and "final_layernorm" in line


def _hf_dir(tmp_path, config: dict, tensors: dict | None = None) -> Path:
    d = tmp_path / "hf"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    if tensors is not None:
        save_file(tensors, d / "model.safetensors")
    return d


HF_BASE = {"model_type": "megatron-bert", "architectures": ["MegatronBertModel"], "vocab_size": 10, "hidden_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 4}


def _hf_base_tensors(vocab_rows=10):
    layer = {f"encoder.layer.0.{m}.weight": torch.zeros(o, i) for m, (o, i) in {
        "attention.self.query": (8, 8), "attention.self.key": (8, 8), "attention.self.value": (8, 8),
        "attention.output.dense": (8, 8), "intermediate.dense": (16, 8), "output.dense": (8, 16)}.items()}
    layer.update({k.replace(".weight", ".bias"): torch.zeros(v.shape[0]) for k, v in layer.items()})
    layer.update({f"encoder.layer.0.{m}.{leaf}": torch.zeros(8) for m in ("attention.ln", "ln") for leaf in ("weight", "bias")})
    return {**layer, "embeddings.word_embeddings.weight": torch.zeros(vocab_rows, 8),
            "embeddings.position_embeddings.weight": torch.zeros(4, 8),
            "embeddings.token_type_embeddings.weight": torch.zeros(2, 8),
            "encoder.ln.weight": torch.ones(8), "encoder.ln.bias": torch.zeros(8),
            "pooler.dense.weight": torch.zeros(8, 8), "pooler.dense.bias": torch.zeros(8)}


def test_hf_errors(tmp_path, capsys):
    assert "does not exist" in run_main(capsys, "import-hf", tmp_path / "nope", tmp_path / "o")
    (tmp_path / "noconf").mkdir()
    assert "no config.json" in run_main(capsys, "import-hf", tmp_path / "noconf", tmp_path / "o")
    d = _hf_dir(tmp_path, {**HF_BASE, "model_type": "bert", "architectures": ["BertForPreTraining"]})
    line = run_main(capsys, "import-hf", d, tmp_path / "o")
    assert "post-LN" in line and "only megatron-bert (pre-LN) checkpoints convert exactly" in line
    d = _hf_dir(tmp_path, HF_BASE)
    assert "no model.safetensors or pytorch_model.bin" in run_main(capsys, "import-hf", d, tmp_path / "o")
    d = _hf_dir(tmp_path, HF_BASE, _hf_base_tensors(vocab_rows=12))
    assert "vocab_size=10 but the word embeddings have 12 rows" in run_main(capsys, "import-hf", d, tmp_path / "o")
    d = _hf_dir(tmp_path, HF_BASE, {**_hf_base_tensors(), "encoder.extra.weight": torch.zeros(2)})
    assert "unexpected keys (1): encoder.extra.weight" in run_main(capsys, "import-hf", d, tmp_path / "o")
    (d / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "not a valid safetensors file" in run_main(capsys, "import-hf", d, tmp_path / "o")
    d = _hf_dir(tmp_path, {**HF_BASE, "hidden_act": "swish"})
    assert "hidden_act='swish'" in run_main(capsys, "import-hf", d, tmp_path / "o")


def test_hf_minimal_import_and_existing_output(tmp_path, capsys):
    d = _hf_dir(tmp_path, HF_BASE, _hf_base_tensors())
    assert main(["import-hf", str(d), str(tmp_path / "o")]) == 0
    assert "appended 118 zero rows" in capsys.readouterr().err
    line = run_main(capsys, "import-hf", d, tmp_path / "o")
    assert "already holds checkpoints" in line and "--force" in line
    assert main(["import-hf", str(d), str(tmp_path / "o"), "--force"]) == 0


def test_export_errors(tmp_path, capsys, monkeypatch):
    assert "does not exist" in run_main(capsys, "export-hf", tmp_path / "nope", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    assert "holds no complete checkpoint" in run_main(capsys, "export-hf", tmp_path / "empty", tmp_path / "o")
    # a checkpoint whose tensors do not match its head
    cfg = tiny_config(num_layers=1, hidden_size=32, num_attention_heads=2)
    state = {k: v.detach() for k, v in build("question_answering", cfg, ParallelState.single()).named_parameters()}
    write_model_checkpoint(tmp_path / "ck", state, {"model": cfg.to_dict(), "head": "pretraining", "head_kwargs": {}})
    line = run_main(capsys, "export-hf", tmp_path / "ck", tmp_path / "o")
    assert "does not match head 'pretraining'" in line and "unexpected 2 (qa_outputs.weight, qa_outputs.bias)" in line
    monkeypatch.setenv("MEGATRON_BERT_DEBUG", "1")
    with pytest.raises(ConversionError):
        main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "o")])


def test_cli_subprocess_errors_are_one_line(tmp_path):
    """The real command: exit code 2, one stderr line, nothing on stdout, no traceback or warnings."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MEGATRON_BERT_DEBUG", None)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80" + bytes(range(255)) * 4)  # looks like a pickle at first glance
    for src, want in ((tmp_path / "missing.zip", "does not exist: give a Megatron-LM checkpoint directory"),
                      (junk, "is not a PyTorch checkpoint")):
        p = subprocess.run([sys.executable, "-m", "megatron_bert.convert", "import-megatron", str(src),
                            str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and p.stdout == "", (p.returncode, p.stdout, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], p.stderr


def test_safetensors_io_interoperates(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).bfloat16(),
               "f16": torch.randn(2, 2, generator=g).half(), "i64": torch.arange(5), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "mask": torch.tensor([True, False, True])}
    save_file(tensors, tmp_path / "ours.safetensors", {"format": "pt"})
    theirs = st.load_file(tmp_path / "ours.safetensors")
    st.save_file(tensors, tmp_path / "ref.safetensors")
    mine = load_file(tmp_path / "ref.safetensors")
    for k, t in tensors.items():
        assert theirs[k].dtype == t.dtype and torch.equal(theirs[k], t), k
        assert mine[k].dtype == t.dtype and torch.equal(mine[k], t), k
    data = (tmp_path / "ref.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-4])
    with pytest.raises(ConversionError, match="truncated or corrupt"):
        load_file(tmp_path / "cut.safetensors")
