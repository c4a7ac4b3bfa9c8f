"""Built-in corpus (stdlib docstrings + pydoc topics) and the cached quickstart pipeline."""
import json
import subprocess
import sys
import time
from collections import Counter

import numpy as np

from megatron_bert.data.corpus import clean_text, prepare_quickstart, pydoc_topics, stdlib_files
from megatron_bert.data.dataset import build_pretraining_datasets
from megatron_bert.data.indexed import IndexedDataset
from megatron_bert.data.tokenizers import load_tokenizer


def test_file_selection_and_topics():
    files = stdlib_files()
    names = {str(p) for p in files}
    assert len(files) > 300
    for bad in ("/test/", "/idlelib/", "/lib2to3/", "site-packages", "/tests/"):
        assert not any(bad in n for n in names), bad
    assert any(n.endswith("/json/__init__.py") for n in names)
    topics = pydoc_topics()
    assert len(topics) > 50 and sum(map(len, topics.values())) > 200_000


def test_clean_text_drops_code_and_doctests():
    doc = """Summary line of the function.

    More prose that explains what happens, wrapped
    over two lines.

    >>> f(1)
    2

    Example::

        x = f(1)
        print(x)

    result = compute(a, b)
    The last paragraph survives."""
    paras = clean_text(doc)
    assert paras == ["Summary line of the function.",
                     "More prose that explains what happens, wrapped over two lines.",
                     "The last paragraph survives."]


def test_corpus_cli_produces_text(tmp_path):
    out = tmp_path / "c.jsonl"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "megatron_bert.data.corpus", "--output", str(out),
                        "--max-mb", "0.3"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.time() - t0 < 30
    docs = [json.loads(line)["text"] for line in out.read_text(encoding="utf-8").splitlines()]
    size = out.stat().st_size
    assert 0.2e6 < size <= 0.3e6 and "MB" in r.stderr
    assert len(docs) > 30 and all(len(d) >= 300 for d in docs)
    assert not any(">>>" in d for d in docs)
    words = " ".join(docs).split()
    assert len(words) > 25_000
    # English prose: the commonest words are the usual function words
    common = {w for w, _ in Counter(w.lower() for w in words).most_common(10)}
    assert {"the", "a", "of", "to"} <= common
    # deterministic
    out2 = tmp_path / "c2.jsonl"
    subprocess.run([sys.executable, "-m", "megatron_bert.data.corpus", "--output", str(out2), "--max-mb", "0.3"],
                   capture_output=True, timeout=120, check=True)
    assert out.read_bytes() == out2.read_bytes()


def test_prepare_quickstart_end_to_end_and_cached(tmp_path):
    logs = []
    t0 = time.time()
    res = prepare_quickstart(tmp_path / "qs", max_mb=0.4, vocab_size=2000, log=logs.append)
    first = time.time() - t0
    assert first < 30, first
    tok = load_tokenizer(res["tokenizer"])
    assert tok.vocab_size > 1000 and tok.convert_ids_to_tokens([tok.mask_id]) == ["[MASK]"]
    ds = IndexedDataset(res["prefix"])
    assert ds.num_documents > 30 and ds.num_tokens > 50_000 and ds.dtype == np.uint16
    text = tok.decode(ds.get_tokens(*ds.document_range(0)).tolist())
    assert len(text.split()) > 20
    train, valid = build_pretraining_datasets(res["prefix"], tok, 128, seed=0, cache_dir=tmp_path / "cache")
    assert len(train) > 100 and len(valid) > 0
    assert train[0]["input_ids"][0] == tok.cls_id

    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "qs").iterdir()}
    t0 = time.time()
    again = prepare_quickstart(tmp_path / "qs", max_mb=0.4, vocab_size=2000, log=logs.append)
    assert time.time() - t0 < 2 and again["prefix"] == res["prefix"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "qs").iterdir()} == mtimes
    assert not [p for p in (tmp_path / "qs").iterdir() if ".tmp" in p.name]
    # a damaged dataset is detected and only that step is redone
    (tmp_path / "qs" / "stdlib_docs.bin").write_bytes(b"\x00")
    prepare_quickstart(tmp_path / "qs", max_mb=0.4, vocab_size=2000, log=logs.append)
    assert IndexedDataset(res["prefix"]).num_tokens == ds.num_tokens
    assert (tmp_path / "qs" / "spm.model").stat().st_mtime_ns == mtimes["spm.model"]
