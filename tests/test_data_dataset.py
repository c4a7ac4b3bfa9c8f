"""BERT pretraining samples: format, masking statistics, SOP/NSP, determinism, caching, splits."""
import json
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from megatron_bert.data.dataset import build_index, build_pretraining_datasets
from megatron_bert.data.indexed import IndexedDataset, write_indexed_dataset

SEQ = 64
BASE = 10  # data token ids are BASE + global token position: every token tells where it came from


def fake_tokenizer(vocab_size=1 << 20, seed=0):
    wsm = np.random.default_rng(seed).random(vocab_size) < 0.7  # ~30% of ids continue a word
    wsm[:BASE] = True
    return types.SimpleNamespace(vocab_size=vocab_size, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4,
                                 word_start_mask=wsm)


def make_data(path, n_docs=120, seed=0, max_sent=9):
    rng = np.random.default_rng(seed)
    docs, pos = [], 0
    for d in range(n_docs):
        n_sent = 1 if d % 10 == 0 else int(rng.integers(2, max_sent))  # some single-sentence documents
        doc = []
        for _ in range(n_sent):
            n = int(rng.integers(3, 30))
            doc.append(np.arange(pos, pos + n) + BASE)
            pos += n
        docs.append(doc)
    return write_indexed_dataset(path / "data", docs, vocab_size=1 << 20)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def tok():
    return fake_tokenizer()


def check_layout(s, tok):
    """[CLS] A [SEP] B [SEP] [PAD]...: types, attention, and no prediction on special positions."""
    ids, tt, am, lab = s["input_ids"], s["token_type_ids"], s["attention_mask"], s["labels"]
    assert all(s[k].dtype == np.int64 and s[k].shape == (SEQ,) for k in ("input_ids", "token_type_ids",
                                                                        "attention_mask", "labels"))
    assert s["binary_label"].shape == () and s["sample_id"].shape == ()
    n = int(am.sum())
    assert (am[:n] == 1).all() and (am[n:] == 0).all()
    seps = np.flatnonzero(ids == tok.sep_id)
    assert ids[0] == tok.cls_id and (ids == tok.cls_id).sum() == 1
    assert len(seps) == 2 and seps[1] == n - 1
    assert (tt[:seps[0] + 1] == 0).all() and (tt[seps[0] + 1:n] == 1).all() and (tt[n:] == 0).all()
    assert (ids[n:] == tok.pad_id).all()
    special_pos = np.r_[0, seps, np.arange(n, SEQ)]
    assert (lab[special_pos] == -100).all()
    return seps


def original_tokens(s):
    orig = s["input_ids"].copy()
    m = s["labels"] != -100
    orig[m] = s["labels"][m]
    return orig


def test_sample_format_and_masking_statistics(data, tok):
    train, _ = build_pretraining_datasets(data, tok, SEQ, seed=1)
    eligible = predicted = masked = random_ = kept = 0
    for i in range(400):
        s = train[i]
        assert int(s["sample_id"]) == i
        seps = check_layout(s, tok)
        ids, lab = s["input_ids"], s["labels"]
        n = int(s["attention_mask"].sum())
        e = n - 3
        p = lab != -100
        eligible += e
        predicted += p.sum()
        assert p.sum() == max(1, round(0.15 * e))      # exact budget per sample
        masked += (ids[p] == tok.mask_id).sum()
        kept += (ids[p] == lab[p]).sum()
        random_ += ((ids[p] != lab[p]) & (ids[p] != tok.mask_id)).sum()
        assert not np.isin(ids[p], [tok.cls_id, tok.sep_id, tok.pad_id]).any()  # random tokens are ordinary
        assert len(seps) == 2
    assert abs(predicted / eligible - 0.15) < 0.01
    assert abs(masked / predicted - 0.8) < 0.03
    assert abs(random_ / predicted - 0.1) < 0.02
    assert abs(kept / predicted - 0.1) < 0.02


def test_sop_label_matches_segment_order(data, tok):
    train, _ = build_pretraining_datasets(data, tok, SEQ, seed=2, masked_lm_prob=0.0)
    labels = []
    for i in range(300):
        s = train[i]
        seps = check_layout(s, tok)
        ids = s["input_ids"]
        a, b = ids[1:seps[0]] - BASE, ids[seps[0] + 1:seps[1]] - BASE
        assert len(a) and len(b)
        assert (np.diff(a) == 1).all() and (np.diff(b) == 1).all()  # consecutive sentences, trimmed at ends
        label = int(s["binary_label"])
        labels.append(label)
        if label == 0:
            assert a.max() < b.min()    # A precedes B in the document
        else:
            assert b.max() < a.min()    # swapped
    assert 0.4 < np.mean(labels) < 0.6


def test_nsp_random_next_comes_from_another_document(data, tok):
    ds = IndexedDataset(data)
    tok_pos_doc = np.repeat(np.arange(ds.num_documents), np.diff(
        np.r_[ds.sentence_offsets[ds.doc_index[:-1]], ds.num_tokens]))
    train, _ = build_pretraining_datasets(data, tok, SEQ, seed=3, binary_head="nsp", masked_lm_prob=0.0)
    labels = []
    for i in range(300):
        s = train[i]
        seps = check_layout(s, tok)
        ids = s["input_ids"]
        a, b = ids[1:seps[0]] - BASE, ids[seps[0] + 1:seps[1]] - BASE
        doc_a, doc_b = set(tok_pos_doc[a]), set(tok_pos_doc[b])
        assert len(doc_a) == 1
        label = int(s["binary_label"])
        labels.append(label)
        if label == 0:
            assert doc_a == doc_b and a.max() < b.min()
        else:
            assert doc_a.isdisjoint(doc_b)
    assert 0.4 < np.mean(labels) < 0.6


def test_whole_word_masking_masks_complete_words(data, tok):
    train, _ = build_pretraining_datasets(data, tok, SEQ, seed=4, whole_word_masking=True)
    total_pred = total_elig = 0
    for i in range(200):
        s = train[i]
        seps = check_layout(s, tok)
        orig = original_tokens(s)
        pred = s["labels"] != -100
        n = int(s["attention_mask"].sum())
        total_pred += pred.sum()
        total_elig += n - 3
        for j in range(1, n - 1):
            # a continuation piece is predicted iff the piece before it (same segment) is predicted
            if j - 1 not in (0, seps[0]) and j not in seps and not tok.word_start_mask[orig[j]]:
                assert pred[j] == pred[j - 1], (i, j)
    assert abs(total_pred / total_elig - 0.15) < 0.02


def test_single_segment_mode_and_max_predictions(data, tok):
    train, _ = build_pretraining_datasets(data, tok, SEQ, seed=5, binary_head=None, max_predictions=3)
    for i in range(50):
        s = train[i]
        ids, tt = s["input_ids"], s["token_type_ids"]
        n = int(s["attention_mask"].sum())
        assert ids[0] == tok.cls_id and ids[n - 1] == tok.sep_id and (ids == tok.sep_id).sum() == 1
        assert (tt == 0).all() and int(s["binary_label"]) == 0
        assert 1 <= (s["labels"] != -100).sum() <= 3


def test_split_multi_epoch_and_cache(data, tok, tmp_path):
    train, valid = build_pretraining_datasets(data, tok, SEQ, seed=6, valid_fraction=0.1, cache_dir=tmp_path)
    assert len(train) > 0 and len(valid) > 0
    tdocs, vdocs = set(train.mapping[:, 0].tolist()), set(valid.mapping[:, 0].tolist())
    assert tdocs.isdisjoint(vdocs) and 8 <= len(vdocs) <= 14
    ds = IndexedDataset(data)
    assert all(np.diff(ds.doc_index)[d] >= 2 for d in tdocs | vdocs)  # single-sentence docs are skipped
    # mapping rows: consecutive sentences of one document
    for d, first, end, target in train.mapping:
        assert ds.doc_index[d] <= first < end <= ds.doc_index[d + 1] and end - first >= 2
    # every epoch visits every row exactly once, in a different order
    n = len(train)
    rows = [train._position(i) for i in range(3 * n)]
    assert sorted(rows[:n]) == sorted(rows[n:2 * n]) == list(range(n)) and rows[:n] != rows[n:2 * n]
    assert int(train[5 * n + 3]["sample_id"]) == 5 * n + 3
    # cached in cache_dir; a rebuild loads the same mapping; other parameters get another file
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and all(f.endswith(".npy") for f in files)
    again = build_index(data, SEQ, 6, valid_fraction=0.1, cache_dir=tmp_path)
    assert isinstance(again["train"], np.memmap)
    np.testing.assert_array_equal(again["train"], train.mapping)
    build_index(data, SEQ + 8, 6, valid_fraction=0.1, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 4
    # valid samples differ from train samples with the same index
    assert not np.array_equal(train[0]["input_ids"], valid[0]["input_ids"])


def test_short_seq_prob_changes_targets(data, tok):
    train, _ = build_pretraining_datasets(data, tok, 128, seed=7, short_seq_prob=0.5)
    targets = train.mapping[:, 3]
    assert (targets == 125).mean() > 0.3 and (targets < 125).mean() > 0.3
    for i in range(30):
        assert int(train[i]["attention_mask"].sum()) <= 128


def test_same_sample_in_separate_process(data, tok, tmp_path):
    train, _ = build_pretraining_datasets(data, tok, SEQ, seed=11, cache_dir=tmp_path)
    ids = [0, 7, 123, 10_000]
    code = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_data_dataset import fake_tokenizer
        from megatron_bert.data.dataset import build_pretraining_datasets
        train, _ = build_pretraining_datasets({data!r}, fake_tokenizer(), {SEQ}, seed=11, cache_dir={str(tmp_path)!r})
        print(json.dumps([{{k: v.tolist() for k, v in train[i].items()}} for i in {ids}]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = json.loads(out.stdout)
    for i, other in zip(ids, theirs):
        mine = {k: v.tolist() for k, v in train[i].items()}
        assert mine == other
    # a different seed gives different samples
    other_seed, _ = build_pretraining_datasets(data, tok, SEQ, seed=12, cache_dir=tmp_path)
    assert not np.array_equal(other_seed[7]["input_ids"], train[7]["input_ids"])


def test_errors(tmp_path, tok):
    prefix = write_indexed_dataset(tmp_path / "one", [[[10, 11, 12]]] * 3, vocab_size=100)
    with pytest.raises(ValueError, match="no training samples"):
        build_pretraining_datasets(prefix, tok, SEQ, seed=0)
    with pytest.raises(ValueError, match="binary_head"):
        build_pretraining_datasets(prefix, tok, SEQ, seed=0, binary_head="mlm")
    small = types.SimpleNamespace(**{**vars(tok), "vocab_size": 11})
    with pytest.raises(ValueError, match="different tokenizer"):
        build_pretraining_datasets(prefix, small, SEQ, seed=0)
