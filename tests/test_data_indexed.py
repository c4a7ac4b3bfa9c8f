"""mmap indexed dataset: format round-trip, dtype choice, corruption detection."""
import os
import pickle

import numpy as np
import pytest

from megatron_bert.data.indexed import (IndexCorruptError, IndexedDataset, IndexedDatasetWriter, best_dtype,
                                        write_indexed_dataset)


def random_docs(rng, n_docs, vocab):
    docs = []
    for _ in range(n_docs):
        n_sent = int(rng.integers(1, 8))
        docs.append([rng.integers(0, vocab, int(rng.integers(1, 40))) for _ in range(n_sent)])
    return docs


@pytest.mark.parametrize("vocab,dtype", [(30522, np.uint16), (65535, np.uint16), (65536, np.int32),
                                         (250_000, np.int32)])
def test_round_trip_and_dtype(tmp_path, vocab, dtype):
    rng = np.random.default_rng(vocab)
    docs = random_docs(rng, 50, vocab)
    docs[3][0] = np.array([vocab - 1, 0])  # extreme ids survive the narrow dtype
    prefix = write_indexed_dataset(tmp_path / "ds", docs, vocab_size=vocab)
    ds = IndexedDataset(prefix)
    assert ds.dtype == np.dtype(dtype) == np.dtype(best_dtype(vocab))
    assert os.path.getsize(prefix + ".bin") == sum(s.size for d in docs for s in d) * ds.dtype.itemsize
    assert ds.num_documents == len(docs)
    assert len(ds) == sum(len(d) for d in docs)
    flat = [s for d in docs for s in d]
    for i in rng.permutation(len(flat))[:60]:                    # random access
        np.testing.assert_array_equal(ds[i], flat[i])
    for d, doc in enumerate(docs):
        got = ds.get_document(d)
        assert len(got) == len(doc)
        for a, b in zip(got, doc):
            np.testing.assert_array_equal(a, b)
        s, e = ds.document_range(d)
        np.testing.assert_array_equal(ds.get_tokens(s, e), np.concatenate(doc))
    np.testing.assert_array_equal(ds.sentence_lengths, [s.size for s in flat])
    with pytest.raises(IndexError):
        ds[len(ds)]
    # workers get the dataset by pickle: it must reopen, not copy, and read the same data
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 500
    np.testing.assert_array_equal(clone[7], ds[7])


def test_empty_sentences_and_documents_are_dropped(tmp_path):
    with IndexedDatasetWriter(tmp_path / "x", vocab_size=100) as w:
        assert w.add_document([[1, 2], [], [3]]) == 2
        assert w.add_document([[], []]) == 0
        w.add_document([[4]])
    ds = IndexedDataset(tmp_path / "x")
    assert ds.num_documents == 2 and len(ds) == 3
    np.testing.assert_array_equal(ds.get_tokens(0, 3), [1, 2, 3, 4])
    assert ds.document_range(1) == (2, 3)


def test_out_of_range_id_rejected(tmp_path):
    w = IndexedDatasetWriter(tmp_path / "x", vocab_size=1000)
    with pytest.raises(ValueError, match="out of range"):
        w.add_document([[70000]])
    w.abort()
    assert not list(tmp_path.iterdir())  # abort leaves nothing behind


@pytest.mark.parametrize("damage", ["truncate_idx", "truncate_bin", "bad_magic", "tiny_idx", "missing_bin"])
def test_corrupt_files_give_clear_errors(tmp_path, damage):
    prefix = write_indexed_dataset(tmp_path / "ds", random_docs(np.random.default_rng(0), 20, 1000),
                                   vocab_size=1000)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    if damage == "truncate_idx":
        os.truncate(idx, os.path.getsize(idx) - 5)
    elif damage == "truncate_bin":
        os.truncate(bin_, os.path.getsize(bin_) - 2)
    elif damage == "tiny_idx":
        os.truncate(idx, 10)
    elif damage == "bad_magic":
        with open(idx, "r+b") as f:
            f.write(b"NOTANIDX")
    else:
        os.unlink(bin_)
    err = FileNotFoundError if damage == "missing_bin" else IndexCorruptError
    with pytest.raises(err) as ei:
        IndexedDataset(prefix)
    msg = str(ei.value)
    assert ("truncated" in msg or "magic" in msg or "missing" in msg) and str(tmp_path) in msg


def test_failed_write_leaves_previous_dataset_intact(tmp_path):
    prefix = write_indexed_dataset(tmp_path / "ds", [[[1, 2, 3]]], vocab_size=10)
    with pytest.raises(RuntimeError):
        with IndexedDatasetWriter(prefix, vocab_size=10) as w:
            w.add_document([[4, 5]])
            raise RuntimeError("crash mid-write")
    np.testing.assert_array_equal(IndexedDataset(prefix)[0], [1, 2, 3])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]
