"""import-megatron: Megatron-LM checkpoints built here from known weights must import exactly.

The writer below lays the known weights out the way Megatron-LM does (per-rank shards, three fused-QKV
row orders by checkpoint_version, old and new module names, nested or flat dicts, args as an
argparse.Namespace) independently of the converter's own code.
"""
from __future__ import annotations

import argparse
import enum
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from convert_checks import build, perturb, tiny_config
from megatron_bert.checkpoint import read_model_state
from megatron_bert.config import ModelConfig
from megatron_bert.convert.__main__ import main
from parallel import ParallelState

CFG = tiny_config()  # vocab 1000 (padded 1024), hidden 64, 2 layers, 4 heads, ffn 256


@pytest.fixture(scope="module")
def known():
    model = build("pretraining", CFG, ParallelState.single(), seed=21)
    perturb(model, ParallelState.single(), seed=8)
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def fake_megatron_enum():
    """A class pickled as megatron.core.enums.ModelType (the real module is not installed)."""
    mods = {name: types.ModuleType(name) for name in ("megatron", "megatron.core", "megatron.core.enums")}
    ModelType = enum.Enum("ModelType", {"encoder_or_decoder": 1})
    ModelType.__module__ = "megatron.core.enums"
    mods["megatron.core.enums"].ModelType = ModelType
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    yield ModelType
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v


def megatron_shards(state, tp, version, names="legacy", form="nested", rows=None, dtype=torch.float32, args=True,
                    extra=None):
    """Per-rank Megatron-LM checkpoint dicts holding ``state`` (our names, full tensors)."""
    h, heads, L = CFG.hidden_size, CFG.num_attention_heads, CFG.num_layers
    hd, hl = h // heads, heads // tp
    enc, attn = ("transformer", "attention") if names == "legacy" else ("encoder", "self_attention")
    word, lm_bias = state["bert.embeddings.word_embeddings.weight"], state["lm_head.bias"]
    rows = rows or word.shape[0]
    if rows > word.shape[0]:  # Megatron padded further: its padding rows hold junk
        word = torch.cat([word, torch.full((rows - word.shape[0], h), 7.0)])
        lm_bias = torch.cat([lm_bias, torch.full((rows - lm_bias.shape[0],), 7.0)])
    word, lm_bias = word[:rows], lm_bias[:rows]

    def qkv(t, r):  # ours: rows (head, {q,k,v}, d); each rank holds whole heads in Megatron's order
        local = t.reshape(heads, 3, hd, *t.shape[1:])[r * hl:(r + 1) * hl]
        perm = {0: (1, 0, 2), 1: (0, 2, 1)}.get(int(version or 0), (0, 1, 2))
        local = local.permute(*perm, *range(3, local.dim()))
        return local.reshape(3 * hl * hd, *t.shape[1:])

    def chunk(t, r, dim=0):
        return t.chunk(tp, dim=dim)[r]

    shards = []
    for r in range(tp):
        layers = {}
        for i in range(L):
            p = f"bert.encoder.layers.{i}."
            for leaf in ("weight", "bias"):
                layers[f"layers.{i}.input_layernorm.{leaf}"] = state[p + f"input_layernorm.{leaf}"]
                layers[f"layers.{i}.{attn}.query_key_value.{leaf}"] = qkv(state[p + f"attention.query_key_value.{leaf}"], r)
                d = state[p + f"attention.dense.{leaf}"]
                layers[f"layers.{i}.{attn}.dense.{leaf}"] = chunk(d, r, 1) if leaf == "weight" else d
                layers[f"layers.{i}.post_attention_layernorm.{leaf}"] = state[p + f"post_attention_layernorm.{leaf}"]
                layers[f"layers.{i}.mlp.dense_h_to_4h.{leaf}"] = chunk(state[p + f"mlp.dense_h_to_4h.{leaf}"], r)
                d = state[p + f"mlp.dense_4h_to_h.{leaf}"]
                layers[f"layers.{i}.mlp.dense_4h_to_h.{leaf}"] = chunk(d, r, 1) if leaf == "weight" else d
        for leaf in ("weight", "bias"):
            layers[f"final_layernorm.{leaf}"] = state[f"bert.encoder.final_layernorm.{leaf}"]
        lm = {"bias": chunk(lm_bias, r)}
        for leaf in ("weight", "bias"):
            lm[f"dense.{leaf}"] = state[f"lm_head.dense.{leaf}"]
            lm[f"layernorm.{leaf}"] = state[f"lm_head.layernorm.{leaf}"]
        lang = {"embedding": {"word_embeddings": {"weight": chunk(word, r)},
                              "position_embeddings": {"weight": state["bert.embeddings.position_embeddings.weight"]},
                              "tokentype_embeddings": {"weight": state["bert.embeddings.token_type_embeddings.weight"]}},
                enc: layers,
                "pooler": {f"dense.{leaf}": state[f"bert.pooler.dense.{leaf}"] for leaf in ("weight", "bias")}}
        model = {"language_model": lang, "lm_head": lm,
                 "binary_head": {leaf: state[f"binary_head.{leaf}"] for leaf in ("weight", "bias")}}
        model = _cast(model, dtype)
        if form != "nested":
            model = _flatten(model)
        ckpt = {"model": model} if form != "flat_top" else {f"model.{k}": v for k, v in model.items()}
        if version:
            ckpt["checkpoint_version"] = version
        ckpt["iteration"] = 100
        if args:
            ckpt["args"] = argparse.Namespace(
                num_layers=L, hidden_size=h, num_attention_heads=heads, ffn_hidden_size=CFG.ffn_hidden_size,
                max_position_embeddings=CFG.max_position_embeddings, padded_vocab_size=rows, layernorm_epsilon=1e-6,
                tensor_model_parallel_size=tp, hidden_dropout=0.0, attention_dropout=0.05, init_method_std=0.01,
                params_dtype=dtype, **(extra or {}))
        shards.append(ckpt)
    return shards


def _cast(d, dtype):
    return {k: _cast(v, dtype) if isinstance(v, dict) else v.to(dtype) for k, v in d.items()}


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def write_layout(shards, root, layout, legacy_format=False):
    """Save rank dicts as Megatron does; return the path to hand to import-megatron."""
    root.mkdir(parents=True, exist_ok=True)
    save = lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=not legacy_format)  # noqa: E731
    if layout == "file":
        assert len(shards) == 1
        save(shards[0], root / "model_optim_rng.pt")
        return root / "model_optim_rng.pt"
    it = "release" if layout in ("release", "zip") else "iter_0000100"
    for r, s in enumerate(shards):
        (root / it / f"mp_rank_{r:02d}").mkdir(parents=True)
        save(s, root / it / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text("release" if it == "release" else "100")
    if layout != "zip":
        return root
    zpath = root.with_suffix(".zip")
    with zipfile.ZipFile(zpath, "w") as z:  # like the NGC release: a top folder, the iteration file, release/
        for f in sorted(root.rglob("*")):
            if f.is_file():
                z.write(f, f"megatron_bert_345m/{f.relative_to(root).as_posix()}")
    return zpath


def imported(out):
    state, meta = read_model_state(out)
    return state, meta, ModelConfig.from_dict(meta["model"])


def assert_same(state, known, vocab_rows=1024):
    assert set(state) == set(known)
    for k, v in known.items():
        want = v[:vocab_rows] if k in ("bert.embeddings.word_embeddings.weight", "lm_head.bias") else v
        got = state[k][:want.shape[0]]
        assert torch.equal(got, want), f"{k} differs (max {(got - want).abs().max().item():.3g})"


CASES = [  # id, tp, checkpoint_version, names, form, layout
    ("v0-tp1-legacy-nested-zip", 1, None, "legacy", "nested", "zip"),
    ("v0-tp2-renamed-nested-iter", 2, 0, "renamed", "nested", "iter"),
    ("v1-tp2-legacy-flat-release", 2, 1.0, "legacy", "flat", "release"),
    ("v1-tp1-renamed-flattop-file", 1, 1.0, "renamed", "flat_top", "file"),
    ("v2-tp2-renamed-nested-zip", 2, 2.0, "renamed", "nested", "zip"),
    ("v3-tp1-legacy-flat-iter", 1, 3.0, "legacy", "flat", "iter"),
]


@pytest.mark.parametrize("tp,version,names,form,layout", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_import_megatron_exact(tmp_path, known, fake_megatron_enum, tp, version, names, form, layout):
    extra = {"model_type": fake_megatron_enum.encoder_or_decoder} if tp == 2 else {}
    shards = megatron_shards(known, tp, version, names, form, extra=extra)
    if layout == "iter":  # a training checkpoint also holds optimizer and RNG state (numpy arrays)
        for s in shards:
            s["optimizer"] = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}
            s["rng_state"] = [{"np_rng_state": np.random.RandomState(0).get_state(), "random_rng_state": (3, (1, 2), None)}]
    src = write_layout(shards, tmp_path / "meg", layout, legacy_format=(layout == "file"))
    assert main(["import-megatron", str(src), str(tmp_path / "out"), "--vocab-size", "1000"]) == 0
    state, meta, cfg = imported(tmp_path / "out")
    assert_same(state, known)
    assert meta["head"] == "pretraining" and meta["converted_from"]["tensor_parallel"] == tp
    assert (cfg.vocab_size, cfg.num_layers, cfg.num_attention_heads, cfg.ffn_hidden_size) == (1000, 2, 4, 256)
    assert (cfg.layernorm_epsilon, cfg.hidden_dropout, cfg.attention_dropout, cfg.init_std) == (1e-6, 0.0, 0.05, 0.01)


def test_wrong_version_would_scramble_qkv(tmp_path, known):
    """The QKV check can fail: a version-0 file labelled 2.0 does not import to the known weights."""
    shards = megatron_shards(known, 1, 0)
    shards[0]["checkpoint_version"] = 2.0
    assert main(["import-megatron", str(write_layout(shards, tmp_path / "m", "release")), str(tmp_path / "o")]) == 0
    state, _, _ = imported(tmp_path / "o")
    qkv = "bert.encoder.layers.0.attention.query_key_value.weight"
    assert not torch.equal(state[qkv], known[qkv])


def test_vocab_repadding_and_fp16(tmp_path, known, capsys):
    # Megatron padded to 1152 rows; the true vocab (1000) comes from --vocab-file: 128 rows are dropped.
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(995)]) + "\n")
    half = {k: v.half().float() for k, v in known.items()}
    shards = megatron_shards(known, 2, 2.0, rows=1152, dtype=torch.float16)
    src = write_layout(shards, tmp_path / "m", "iter")
    assert main(["import-megatron", str(src), str(tmp_path / "o"), "--vocab-file", str(vocab)]) == 0
    assert "re-padded the vocabulary from 1152 to 1024" in capsys.readouterr().err
    state, meta, cfg = imported(tmp_path / "o")
    assert cfg.vocab_size == 1000 and meta["tokenizer"].endswith("vocab.txt")
    assert_same(state, half)
    # Megatron padded to only 1000 rows (divisible-by 8): 24 zero rows are appended.
    shards = megatron_shards(known, 1, 2.0, rows=1000)
    assert main(["import-megatron", str(write_layout(shards, tmp_path / "m2", "release")), str(tmp_path / "o2")]) == 0
    state, _, cfg = imported(tmp_path / "o2")
    assert cfg.vocab_size == 1000 and state["lm_head.bias"].shape == (1024,)
    assert_same(state, known, vocab_rows=1000)
    assert not state["bert.embeddings.word_embeddings.weight"][1000:].any() and not state["lm_head.bias"][1000:].any()


def test_no_args_and_no_binary_head(tmp_path, known, capsys):
    """An args-less release (like the first NGC one): heads from --num-attention-heads, vocab = padded size;
    without binary head and pooler the model imports as masked_lm."""
    shards = megatron_shards(known, 1, None, args=False)
    del shards[0]["model"]["binary_head"], shards[0]["model"]["language_model"]["pooler"]
    src = write_layout(shards, tmp_path / "m", "zip")
    assert main(["import-megatron", str(src), str(tmp_path / "o"), "--num-attention-heads", "4"]) == 0
    assert "true vocabulary size is unknown" in capsys.readouterr().err
    state, meta, cfg = imported(tmp_path / "o")
    assert meta["head"] == "masked_lm" and cfg.vocab_size == 1024 and cfg.layernorm_epsilon == 1e-5
    assert_same(state, {k: v for k, v in known.items() if not k.startswith(("binary_head", "bert.pooler"))})
