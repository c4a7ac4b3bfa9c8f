"""SentencePiece: training with BERT specials, loading, encode/decode round-trip, offsets."""
import types
from pathlib import Path

import numpy as np
import pytest

from megatron_bert.data.sentences import split_sentences
from megatron_bert.data.tokenizers import SentencePieceTokenizer, load_tokenizer, train_sentencepiece

WORDS = ("the quick brown fox jumps over lazy dog data model parallel tensor training python library "
         "function returns value string list object module class method argument error file path "
         "naïve café résumé").split()


def _sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        words = rng.choice(WORDS, int(rng.integers(4, 14)))
        yield " ".join(words).capitalize() + rng.choice([".", "!", "?"])


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    path = train_sentencepiece(_sentences(3000), d / "tok", vocab_size=300, model_type="unigram")
    return path


def test_train_writes_model_atomically_with_bert_specials(sp_model, tmp_path):
    assert sp_model.endswith("tok.model")
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert 50 <= tok.vocab_size <= 300  # soft limit: a tiny corpus gives fewer pieces
    leftovers = [p.name for p in Path(sp_model).parent.rglob("*.tmp*")]  # only this fixture's dir
    assert not leftovers
    # files as input (one sentence per line), BPE
    txt = tmp_path / "in.txt"
    txt.write_text("\n".join(_sentences(500, seed=1)) + "\n")
    bpe = load_tokenizer(train_sentencepiece([txt], tmp_path / "bpe", vocab_size=150, model_type="bpe"))
    assert bpe.mask_id == 4 and 4 in bpe.encode("fox [MASK]")


def test_encode_decode_round_trip_and_offsets(sp_model):
    tok = load_tokenizer(sp_model)
    for text in list(_sentences(50, seed=7)) + ["  Leading the   quick   fox! naïve café.", "x"]:
        ids = tok.encode(text)
        assert ids and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == " ".join(text.split())  # nmt_nfkc collapses whitespace
        ids2, offsets = tok.encode_with_offsets(text)
        assert ids2 == ids and len(offsets) == len(ids)
        for piece, (s, e) in zip(tok.convert_ids_to_tokens(ids), offsets):
            visible = piece.replace("\u2581", "")
            if visible and tok.unk_id not in ids:
                assert text[s:e] == visible, (piece, text[s:e])
        assert tok.tokenize(text) == tok.convert_ids_to_tokens(ids)
    # user-defined specials are recognised in raw text; skip_special_tokens drops them on decode
    ids = tok.encode("fox [MASK] dog")
    assert tok.mask_id in ids
    assert "[MASK]" not in tok.decode(ids, skip_special_tokens=True)


def test_word_start_mask_and_sentence_split(sp_model):
    tok = load_tokenizer(sp_model)
    wsm = tok.word_start_mask
    pieces = tok.convert_ids_to_tokens(range(tok.vocab_size))
    assert wsm.shape == (tok.vocab_size,)
    for i, p in enumerate(pieces):
        if i > 4:
            assert wsm[i] == p.startswith("\u2581"), p
    assert wsm[:5].all()
    assert 0 < wsm.sum() < tok.vocab_size
    assert split_sentences("Mr. Smith went to Washington. He met Dr. J. Doe at 3.5 p.m. today! Did he?\n\n"
                           "New paragraph without period\nstill same e.g. this one") == [
        "Mr. Smith went to Washington.", "He met Dr. J. Doe at 3.5 p.m. today!", "Did he?",
        "New paragraph without period\nstill same e.g. this one"]


def test_missing_specials_and_missing_file(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=_sentences(500), model_prefix=str(tmp_path / "plain"),
                                   vocab_size=100, hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="no piece for"):
        load_tokenizer(tmp_path / "plain.model")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope.model")


def test_offsets_fallback_for_old_sentencepiece(sp_model):
    """sentencepiece < 0.2.1 has no 'offset_mapping'; offsets then come from the immutable proto, whose
    begin/end are UTF-8 byte offsets. Emulate that API and check we get the same char offsets."""
    from megatron_bert.data.sentencepiece_tok import _encode_offsets

    tok = load_tokenizer(sp_model)

    class OldProcessor:
        def encode(self, text, out_type=int):
            if out_type == "offset_mapping":
                raise ValueError("Invalid return_type")
            return tok.sp.encode(text, out_type=out_type)

        def encode_as_immutable_proto(self, text):
            r = tok.sp.encode(text, out_type="offset_mapping")
            nbytes = lambda k: len(text[:k].encode("utf-8"))  # noqa: E731
            pieces = [types.SimpleNamespace(id=i, begin=nbytes(s), end=nbytes(e))
                      for i, (s, e) in zip(r["ids"], r["offsets"])]
            return types.SimpleNamespace(pieces=pieces)

    for text in ["naïve café — the fox", "plain ascii text", "日本 fox ü"]:
        new = _encode_offsets(tok.sp, text)
        old = _encode_offsets(OldProcessor(), text)
        assert old == new and len(new[0]) == len(new[1])
