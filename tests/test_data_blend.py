"""Blends of pretraining corpora (data/blend.py): shares, order, determinism, config forms, errors,
and a TP=2 run on two corpora through the command line."""
import numpy as np
import pytest

from megatron_bert.data.blend import BlendedDataset, BlendError, build_blended_pretraining_datasets, parse_blend
from megatron_bert.data.dataset import build_pretraining_datasets
from megatron_bert.data.indexed import write_indexed_dataset
from test_data_dataset import BASE, SEQ, fake_tokenizer

OFFSET = 500_000  # member B's token ids start here: every token tells which corpus it came from


class _Member:
    """Stands in for a member dataset: sample j of member k is {"k": k, "j": j}."""

    def __init__(self, k, n):
        self.k, self.n = k, n

    def __len__(self):
        return self.n

    def __getitem__(self, j):
        return {"k": self.k, "j": j, "sample_id": np.array(j)}


@pytest.mark.parametrize("weights,period", [([0.7, 0.2, 0.1], 1000), ([3.0, 1.0], 1 << 20), ([1.0, 1e-9], 97)])
def test_every_prefix_holds_each_member_within_one_sample_and_members_read_in_order(weights, period):
    members = [_Member(k, 50 + k) for k in range(len(weights))]
    ds = BlendedDataset(members, weights, period=period)
    assert (ds.counts >= 1).all() and ds.period == ds.counts.sum()
    expect = np.asarray(weights) / sum(weights)
    assert np.abs(ds.weights - expect).max() <= 1.0 / period + 1e-12  # rounding of the slots only
    n = min(3 * ds.period + 17, 200_000)  # past period boundaries
    who = np.array([ds.locate(i)[0] for i in range(n)])
    counts = np.zeros((n, len(weights)))
    counts[np.arange(n), who] = 1
    seen = counts.cumsum(0)
    ideal = np.arange(1, n + 1)[:, None] * ds.weights[None, :]
    assert np.abs(seen - ideal).max() <= 1.0 + 1e-9
    for k in range(len(weights)):  # member k read 0, 1, 2, ... with no gap or repeat
        own = [ds.locate(i)[1] for i in np.flatnonzero(who == k)]
        assert own == list(range(len(own)))
    s = ds[12345]
    assert int(s["sample_id"]) == 12345 and (s["k"], s["j"]) == ds.locate(12345)
    with pytest.raises(IndexError):
        ds[-1]


def test_parse_blend_forms_and_errors():
    assert parse_blend("/d/wiki") == [(None, "/d/wiki")]
    assert parse_blend(2024) == [(None, "2024")]
    assert parse_blend(["/d/a", "/d/b"]) == [(None, "/d/a"), (None, "/d/b")]
    assert parse_blend([0.7, "/d/a", 3, "/d/b"]) == [(0.7, "/d/a"), (3.0, "/d/b")]
    for bad, text in (([0.5, "/a", "/b"], "out of order"), (["/a", 0.5], "out of order"),
                      ([0.5, 0.5], "out of order"), ([0, "/a"], "must be finite and > 0"),
                      ([-1, "/a"], "must be finite and > 0"), ([float("nan"), "/a"], "finite"),
                      ([], "names no dataset"), ({"a": 1}, "not a path or a list")):
        with pytest.raises(BlendError, match=text):
            parse_blend(bad)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two indexed corpora whose token ids say where they came from: A = BASE + position, B = OFFSET + position."""
    root = tmp_path_factory.mktemp("blend")
    rng = np.random.default_rng(3)
    out = []
    for name, base, n_docs in (("a", BASE, 90), ("b", OFFSET, 40)):
        docs, pos = [], 0
        for _ in range(n_docs):
            doc = []
            for _ in range(int(rng.integers(2, 8))):
                n = int(rng.integers(3, 30))
                doc.append(np.arange(pos, pos + n) + base)
                pos += n
            docs.append(doc)
        (root / name).mkdir()
        out.append(write_indexed_dataset(root / name / "data", docs, vocab_size=1 << 20))
    return out


def _source(sample):
    ids = sample["input_ids"][sample["labels"] == -100]
    ids = ids[ids >= BASE]
    return set((ids >= OFFSET).astype(int).tolist())


def test_blended_samples_are_the_members_samples(corpora, tmp_path):
    a, b = corpora
    tok = fake_tokenizer()
    kw = dict(cache_dir=tmp_path)
    train, valid = build_blended_pretraining_datasets([(0.75, a), (0.25, b)], tok, SEQ, 7, **kw)
    plain_a, _ = build_pretraining_datasets(a, tok, SEQ, 7, **kw)
    own_b, _ = build_pretraining_datasets(b, tok, SEQ, 7, stream=1, **kw)
    plain_b, _ = build_pretraining_datasets(b, tok, SEQ, 7, **kw)
    assert isinstance(train, BlendedDataset) and isinstance(valid, BlendedDataset)
    assert len(train) == len(plain_a) + len(own_b)
    from_b = 0
    for i in range(400):  # past one epoch of B: its own index wraps into its next epoch
        k, j = train.locate(i)
        s = train[i]
        ref = (plain_a, own_b)[k][j]  # member 0 keeps the plain dataset's samples; member 1 its own stream
        for key in ("input_ids", "labels", "token_type_ids", "binary_label"):
            assert np.array_equal(s[key], ref[key]), (i, key)
        assert int(s["sample_id"]) == i and _source(s) == {k}
        from_b += k
    assert abs(from_b - 100) <= 1
    # member 1's own stream: same documents as the plain dataset, drawn differently
    differs = sum(not np.array_equal(own_b[j]["input_ids"], plain_b[j]["input_ids"]) for j in range(20))
    assert differs >= 15
    assert {_source(valid[i]).pop() for i in range(40)} == {0, 1}
    # weights by size when none are given
    by_size, _ = build_blended_pretraining_datasets([(None, a), (None, b)], tok, SEQ, 7, **kw)
    assert np.allclose(by_size.weights, np.array([len(plain_a), len(own_b)]) / len(by_size), atol=1e-6)
    # one member: exactly the plain dataset
    one, _ = build_blended_pretraining_datasets([(None, a)], tok, SEQ, 7, **kw)
    assert not isinstance(one, BlendedDataset) and np.array_equal(one[5]["input_ids"], plain_a[5]["input_ids"])


def test_blend_of_two_corpora_trains_at_tp2_from_the_command_line(tmp_path):
    """data.prefix=[W,PATH,W,PATH] through Hydra and torchrun (2 gloo ranks, TP=2): the log names the
    blend and its shares, training runs, and a resume at TP=1 with other weights continues and notes
    the changed sample stream; a weight of 0 is one line before any process starts."""
    from megatron_bert.preprocess import preprocess
    from train_fixtures import base_overrides, build_dataset, metrics, train, write_corpus

    first = build_dataset(tmp_path / "a")
    second = str(tmp_path / "b" / "docs")
    (tmp_path / "b").mkdir()
    preprocess(str(write_corpus(tmp_path / "b" / "corpus.jsonl", docs=60, seed=1)), second, first["tokenizer"],
               workers=1, log=lambda s: None)
    blend = f"[0.8,{first['prefix']},0.2,{second}]"
    ov = base_overrides(first, tmp_path / "run", **{"data.prefix": blend, "parallel.tensor": 2,
                                                     "train.max_steps": 3})
    res = train(ov, nproc=2)
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert f"a blend of 0.800 × {first['prefix']}" in log and f"0.200 × {second}" in log, log[-3000:]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    # resumed at TP=1 with other weights: it continues from step 3 and says the sample stream changed
    reweighted = f"[0.5,{first['prefix']},0.5,{second}]"
    res = train(base_overrides(first, tmp_path / "run", **{"data.prefix": reweighted, "train.max_steps": 4}))
    assert res.returncode == 0, res.stderr[-3000:]
    log = res.stdout + res.stderr
    assert "resumed from" in log and "(step 3, 24 samples" in log, log[-3000:]
    assert "note: the data settings differ from the checkpoint's (data.prefix: [0.8," in log, log[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [1, 2, 3, 4]
    bad = train(base_overrides(first, tmp_path / "bad", **{"data.prefix": f"[0,{second}]"}))
    assert bad.returncode != 0
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "weights must be finite and > 0" in lines[0], bad.stderr


def test_sample_stream_changes_name_the_keys_a_resume_changed():
    from megatron_bert.training.checkpointing import sample_stream_changes

    saved = {"data": {"prefix": "/d/a", "seq_length": 128, "masked_lm_prob": 0.15}, "train": {"seed": 1}}
    now = {"data": {"prefix": [0.5, "/d/a", 0.5, "/d/b"], "seq_length": 128, "masked_lm_prob": 0.15,
                    "short_seq_prob": 0.2}, "train": {"seed": 2}}
    assert sample_stream_changes(saved, now) == ["data.prefix: '/d/a' → [0.5, '/d/a', 0.5, '/d/b']",
                                                 "train.seed: 1 → 2"]
    assert sample_stream_changes(saved, saved) == [] and sample_stream_changes({}, now) == []


def test_a_separate_validation_corpus_validates_and_every_train_document_trains(tmp_path):
    """data.valid_prefix: the validation samples are all of that corpus's, the train samples all of data.prefix's
    (no documents held out), as the log says; the evaluation reads it."""
    import re

    from megatron_bert.data import load_tokenizer
    from megatron_bert.preprocess import preprocess
    from train_fixtures import base_overrides, build_dataset, metrics, train, write_corpus

    first = build_dataset(tmp_path / "a")
    held_out = str(tmp_path / "b" / "docs")
    (tmp_path / "b").mkdir()
    preprocess(str(write_corpus(tmp_path / "b" / "corpus.jsonl", docs=60, seed=1)), held_out, first["tokenizer"],
               workers=1, log=lambda s: None)
    run = tmp_path / "run"
    res = train(base_overrides(first, run, **{"data.valid_prefix": held_out, "train.max_steps": 2,
                                              "train.eval_interval": 2}))
    assert res.returncode == 0, res.stderr[-3000:]
    m = re.search(r"data: (\d+) train samples per epoch from (\S+) / (\d+) valid from (\S+) \(data.valid_prefix\)",
                  res.stdout)
    assert m and (m.group(2), m.group(4)) == (first["prefix"], held_out), res.stdout[-2000:]
    tok = load_tokenizer(first["tokenizer"])
    kw = dict(valid_fraction=0.0, cache_dir=run / "cache")
    all_train, _ = build_pretraining_datasets(first["prefix"], tok, 64, 1234, **kw)
    all_held_out, _ = build_pretraining_datasets(held_out, tok, 64, 1234, **kw)
    split_train, _ = build_pretraining_datasets(first["prefix"], tok, 64, 1234, valid_fraction=0.02,
                                                cache_dir=run / "cache")
    assert (int(m.group(1)), int(m.group(3))) == (len(all_train), len(all_held_out))
    assert len(all_train) > len(split_train)  # the 2% the default split holds out now trains
    assert [r["step"] for r in metrics(run, "valid")] == [2]
