"""Shared helpers for the tests/test_tasks_*.py files: a tiny WordPiece vocabulary and the tokenizer
built from it through the project's `load_tokenizer` (DESIGN.md interface)."""
from __future__ import annotations

import os
import string

import pytest

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """the a an of to in is was and on at by for with it he she they what who where when which
cat cats sat mat dog dogs ran fast slow big small house river city paris france london england
capital population born year question answer context window long text city museum cafe
john smith mary jones acme corp new york germany berlin played football music good bad movie
great terrible loved hated film story sentence pair label true false yes no""".split()
PIECES = ["##s", "##ed", "##ing", "##er", "##ly"]
CJK = list("北京大学东是中国的首都")


def write_vocab(directory) -> str:
    """vocab.txt with specials, whole words, every ASCII letter/digit/punctuation char and its
    ## continuation (so any ASCII text tokenizes without [UNK]) and a few CJK characters."""
    chars = list(string.ascii_lowercase + string.digits) + list(string.punctuation)
    tokens = SPECIALS + WORDS + PIECES + chars + ["##" + c for c in string.ascii_lowercase + string.digits] + CJK
    seen, vocab = set(), []
    for t in tokens:
        if t not in seen:
            seen.add(t)
            vocab.append(t)
    path = os.path.join(str(directory), "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    return path


def build_tokenizer(directory):
    return _load(write_vocab(directory))


def _load(vocab_path):
    from megatron_bert.data.tokenizers import load_tokenizer

    return load_tokenizer(vocab_path, lower_case=True)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    return build_tokenizer(tmp_path_factory.mktemp("vocab"))


def write(directory, name: str, text: str) -> str:
    path = os.path.join(str(directory), name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return path
