"""`python -m megatron_bert.preprocess`: bad input handling, output contents, workers, strict mode."""
import json
import subprocess
import sys

import numpy as np
import pytest

from megatron_bert.data.indexed import IndexedDataset
from megatron_bert.data.sentences import split_sentences
from megatron_bert.data.tokenizers import load_tokenizer

WORDS = "the a cat dog sat on mat it was happy . , ! ? and then ran away".split()


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    toks = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + letters + ["##" + c for c in letters]
            + ["##s", "##ing"])
    p = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    p.write_text("\n".join(dict.fromkeys(toks)) + "\n")
    return p


def run(*args):
    r = subprocess.run([sys.executable, "-m", "megatron_bert.preprocess", *map(str, args)],
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in r.stderr, r.stderr
    return r


GOOD = ["The cat sat on the mat. It was happy!", "A dog ran away. Then the cat sat. The end?",
        "Cats and dogs."]


def write_bad_jsonl(path):
    lines = [json.dumps({"text": GOOD[0]}).encode(),          # 1 ok
             b'{"text": "unterminated',                       # 2 invalid JSON
             json.dumps({"body": "x"}).encode(),              # 3 missing key
             json.dumps({"text": 42}).encode(),               # 4 non-string
             json.dumps({"text": GOOD[1]}).encode(),          # 5 ok
             json.dumps({"text": "   \n "}).encode(),         # 6 empty
             json.dumps({"text": "bin\u0000ary\u0001\u0002"}).encode(),  # 7 binary
             b'{"text": "caf\xe9 latin-1"}',                  # 8 non-UTF-8
             b"",                                             # (blank line, ignored)
             json.dumps({"text": GOOD[2]}).encode()]          # 10 ok
    path.write_bytes(b"\n".join(lines) + b"\n")


def test_bad_input_is_skipped_and_reported(tmp_path, vocab):
    src = tmp_path / "in.jsonl"
    write_bad_jsonl(src)
    r = run("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", vocab)
    assert r.returncode == 0, r.stderr
    err = r.stderr
    assert "skipped 6 bad documents" in err
    for reason in ["invalid JSON: 1 (lines 2)", "missing key 'text': 1 (lines 3)",
                   "value of 'text' is int, not a string: 1 (lines 4)", "empty document: 1 (lines 6)",
                   "binary content: 1 (lines 7)", "non-UTF-8 bytes: 1 (lines 8)"]:
        assert reason in err, (reason, err)
    assert "docs/s" in err and "MB/s" in err and "3 documents" in err
    # contents: the good documents, sentence by sentence, tokenized exactly like the tokenizer does
    tok = load_tokenizer(vocab)
    ds = IndexedDataset(tmp_path / "out")
    assert ds.num_documents == 3 and ds.dtype == np.uint16
    sents = [s for doc in GOOD for s in split_sentences(doc)]
    assert len(ds) == len(sents) == 6
    for i, s in enumerate(sents):
        assert ds[i].tolist() == tok.encode(s)
    assert [ds.document_range(d) for d in range(3)] == [(0, 2), (2, 5), (5, 6)]


def test_strict_mode_stops_with_one_line(tmp_path, vocab):
    src = tmp_path / "in.jsonl"
    write_bad_jsonl(src)
    r = run("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", vocab, "--strict")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{src}:2:" in lines[0] and "invalid JSON" in lines[0]
    assert not list(tmp_path.glob("out*"))  # nothing half-written


@pytest.mark.parametrize("what", ["input", "tokenizer"])
def test_missing_files(tmp_path, vocab, what):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": GOOD[0]}) + "\n")
    args = {"input": src, "tokenizer": vocab}
    args[what] = tmp_path / "missing.file"
    r = run("--input", args["input"], "--output-prefix", tmp_path / "out", "--tokenizer", args["tokenizer"])
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not found" in lines[0] and "missing.file" in lines[0]


def test_all_bad_input_fails_clearly(tmp_path, vocab):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b"\xff\xfe\x00\x01binary\n")
    r = run("--input", src, "--output-prefix", tmp_path / "out", "--tokenizer", vocab)
    assert r.returncode == 1 and "no valid documents" in r.stderr
    assert not list(tmp_path.glob("out*"))


def test_plain_text_and_workers_identical(tmp_path, vocab):
    rng = np.random.default_rng(0)
    blocks = []
    for d in range(300):
        sents = [" ".join(rng.choice(WORDS[:10], int(rng.integers(3, 9)))).capitalize() + "." for _ in
                 range(int(rng.integers(1, 5)))]
        blocks.append("\n".join(sents))
    blocks[17] = "caf\udce9"  # becomes invalid UTF-8 bytes below
    raw = "\n\n\n".join(blocks).encode("utf-8", "surrogateescape")
    src = tmp_path / "docs.txt"
    src.write_bytes(raw)
    outs = {}
    for w in (1, 2):
        r = run("--input", src, "--output-prefix", tmp_path / f"w{w}", "--tokenizer", vocab, "--workers", w,
                "--quiet")
        assert r.returncode == 0, r.stderr
        assert "skipped 1 bad documents" in r.stderr and "non-UTF-8" in r.stderr
        outs[w] = [(tmp_path / f"w{w}{ext}").read_bytes() for ext in (".bin", ".idx")]
    assert outs[1] == outs[2]
    ds = IndexedDataset(tmp_path / "w1")
    assert ds.num_documents == 299
    # line numbers in plain text refer to the first line of the block
    first_line = raw[:raw.index(b"caf\xe9")].count(b"\n") + 1
    assert f"lines {first_line})" in r.stderr


def test_lower_case_flag_and_json_key(tmp_path, vocab):
    src = tmp_path / "in.json"
    src.write_text(json.dumps({"body": "THE CAT SAT."}) + "\n")
    r = run("--input", src, "--output-prefix", tmp_path / "lc", "--tokenizer", vocab, "--json-key", "body")
    assert r.returncode == 0, r.stderr
    tok = load_tokenizer(vocab)
    assert IndexedDataset(tmp_path / "lc")[0].tolist() == tok.encode("the cat sat.")
    r = run("--input", src, "--output-prefix", tmp_path / "cs", "--tokenizer", vocab, "--json-key", "body",
            "--no-lower-case", "--format", "jsonl")
    assert r.returncode == 0
    assert set(IndexedDataset(tmp_path / "cs")[0].tolist()) == {tok.unk_id, tok.vocab["."]}


def test_several_inputs_globs_and_compressed_files_make_one_dataset(tmp_path, vocab):
    """Files, a glob and .gz/.bz2/.xz shards (JSON lines and plain text) → the bytes of one run on the
    concatenated JSON lines, with 1 and 2 workers; a bad document is reported as file:line."""
    import bz2
    import gzip
    import lzma

    rng = np.random.default_rng(1)
    docs = [" ".join(" ".join(rng.choice(WORDS[:10], int(rng.integers(3, 9)))).capitalize() + "."
                     for _ in range(int(rng.integers(1, 5)))) for _ in range(40)]
    shards = [docs[:10], docs[10:20], docs[20:30], docs[30:]]
    jsonl = [b"\n".join(json.dumps({"text": d}).encode() for d in part) + b"\n" for part in shards]
    bad = b'{"text": "unterminated\n'
    d = tmp_path / "shards"
    d.mkdir()
    (d / "s0.jsonl").write_bytes(jsonl[0])
    with_bad = jsonl[1].replace(b"\n", b"\n" + bad, 1)  # line 2 of s1 is broken
    (d / "s1.jsonl.gz").write_bytes(gzip.compress(with_bad))
    (d / "s2.txt.bz2").write_bytes(bz2.compress("\n\n".join(shards[2]).encode()))
    (d / "s3.jsonl.xz").write_bytes(lzma.compress(jsonl[3]))
    ref = tmp_path / "all.jsonl"
    ref.write_bytes(jsonl[0] + with_bad + jsonl[2] + jsonl[3])
    r = run("--input", ref, "--output-prefix", tmp_path / "ref", "--tokenizer", vocab, "--quiet")
    assert r.returncode == 0, r.stderr
    want = [(tmp_path / f"ref{ext}").read_bytes() for ext in (".bin", ".idx")]
    for w in (1, 2):
        r = run("--input", d / "s0.jsonl", d / "s[12].*", d / "s3.jsonl.xz", "--output-prefix", tmp_path / f"w{w}",
                "--tokenizer", vocab, "--workers", w, "--quiet")
        assert r.returncode == 0, r.stderr
        assert [(tmp_path / f"w{w}{ext}").read_bytes() for ext in (".bin", ".idx")] == want
        assert f"invalid JSON: 1 (lines {d / 's1.jsonl.gz'}:2)" in r.stderr and "from 4 input files" in r.stderr
    assert IndexedDataset(tmp_path / "w1").num_documents == 40
    r = run("--input", d / "*", "--output-prefix", tmp_path / "strict", "--tokenizer", vocab, "--strict")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and f"{d / 's1.jsonl.gz'}:2: invalid JSON" in lines[0], r.stderr


@pytest.mark.parametrize("case", ["no-match", "directory", "truncated-gz"])
def test_bad_inputs_lists_are_one_line(tmp_path, vocab, case):
    import gzip

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": GOOD[0]}) + "\n")
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress((json.dumps({"text": GOOD[1]}) + "\n").encode() * 50)[:-20])
    arg, text = {"no-match": (tmp_path / "nothing*.jsonl", "no input file matches"),
                 "directory": (tmp_path, "is a directory"),
                 "truncated-gz": (tmp_path / "cut.jsonl.gz", "cannot read it")}[case]
    r = run("--input", good, arg, "--output-prefix", tmp_path / "out", "--tokenizer", vocab, "--workers", 2)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and text in lines[0], r.stderr
    assert not list(tmp_path.glob("out*"))
