"""Our WordPiece tokenizer vs the reference BERT tokenizers (transformers), on a vocab the test builds."""
import os
import random
import unicodedata
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from megatron_bert.data.corpus import module_docstrings, stdlib_root  # noqa: E402
from megatron_bert.data.tokenizers import WordPieceTokenizer, load_tokenizer  # noqa: E402

MULTILINGUAL = """Café naïve résumé façade Ünïcödé ÀÉÎÕÜ Straße Ærøskøbing Ὀδυσσεύς Σίσυφος ΣΟΦΙΑ
北京大学 東京 日本語のテキストです。 한국어 문장 Привет, мир! Ёлка. İstanbul ıslak. Ελληνικά.
Quotes «like this» and “these” – dashes — ellipsis… 10,000 $5.99 50% e-mail foo@bar.com C++ A/B
"""

TRICKY = [
    "", "   ", "Hello, World!", "hello world", "HELLO WORLD", "don't stop-me now...",
    "Café naïve RÉSUMÉ", "e\u0301te\u0301 cafe\u0301", "\u0301leading mark", "İstanbul ISTANBUL ıi",
    "北京大学 is in 北京.", "mixed北京text", "日本語のテキスト", "한국어 문장",
    "tab\tnew\nline\rcr", "nbsp\u00a0here", "ideographic\u3000space", "thin\u2009space", "en\u2002space",
    "zero\u200bwidth", "zwj\u200dhere", "bom\ufeffinside", "nul\x00char", "vt\x0bff\x0cnel\x85", "line\u2028sep",
    "para\u2029sep", "private\ue000use", "replacement\ufffdchar", "del\x7fchar", "us\x1fsep",
    "ligature ﬁne ﬂow", "roman Ⅻ", "emoji 😀 ok", "math ∑ ∫ ≤", "«guillemets» “quotes” ‘single’",
    "ΣΟΦΙΑ", "a\u1fefb", "x" * 99, "y" * 100, "z" * 101, "word" * 30, "Ω" * 101,
    "[CLS] [SEP] [MASK] [PAD] [UNK] [mask]", "inside[MASK]word", "$5.99 + 10% = ?", "foo@bar.com",
    "a.b,c;d:e!f?g", "C++/C#", "under_score snake_case", "\u00e9\u0301", "Ωmega ωmega", "Ǆ ǅ ǆ",
]


def _sample_text():
    text = []
    for name in ("argparse.py", "textwrap.py", "shutil.py", "fractions.py", "subprocess.py", "pathlib.py"):
        text += module_docstrings(stdlib_root() / name)
    return "\n".join(text) + "\n" + MULTILINGUAL


@pytest.fixture(scope="module")
def vocabs(tmp_path_factory):
    """A realistic small vocab per casing, trained with the reference trainer on docstrings + extra text."""
    from tokenizers import BertWordPieceTokenizer

    text = _sample_text()
    assert len(text) > 50_000
    out = {}
    for lc in (True, False):
        d = tmp_path_factory.mktemp("uncased" if lc else "cased")
        trainer = BertWordPieceTokenizer(lowercase=lc)
        trainer.train_from_iterator(text.split("\n"), vocab_size=2500, min_frequency=1, limit_alphabet=400)
        trainer.save_model(str(d))
        out[lc] = d
    return out, text


def _references(d, lc):
    from transformers import BertTokenizer, BertTokenizerFast
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fast = BertTokenizerFast.from_pretrained(str(d), do_lower_case=lc)
        slow = BertTokenizerLegacy(vocab_file=str(d / "vocab.txt"), do_lower_case=lc)
        plain = BertTokenizer.from_pretrained(str(d), do_lower_case=lc)
    return fast, slow, plain


def _cases(text):
    rng = random.Random(1234)
    pool = (list("abcdefXYZ019 .,;:!?'\"()[]{}<>-_/\\@#$%^&*+=~`|") + list("éÀÜïñçßΣσςİıÆ北京日本テ한국ПрЁё") +
            ["\u0301", "\u0308", "\u200b", "\ufeff", "\x00", "\x0b", "\x85", "\u2028", "\u00a0", "\u3000", "\t",
             "\n", "\ue000", "\ufffd", "ﬁ", "\u1fef", "…", "😀", "\U00020000", "[MASK]", "[SEP]", "[mask]",
             "the", "ing", "x" * 60])
    fuzz = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(400)]
    lines = [ln for ln in text.split("\n") if ln.strip()]
    return TRICKY + lines[::7][:400] + fuzz


@pytest.mark.parametrize("lc", [True, False], ids=["uncased", "cased"])
def test_matches_reference_tokenizers(vocabs, lc):
    dirs, text = vocabs
    ours = load_tokenizer(dirs[lc] / "vocab.txt")
    assert isinstance(ours, WordPieceTokenizer) and ours.lower_case is lc  # casing inferred from the vocab
    fast, slow, plain = _references(dirs[lc], lc)
    assert ours.vocab_size == len(fast.get_vocab())
    for name in ("cls", "sep", "mask", "pad", "unk"):
        assert getattr(ours, f"{name}_id") == getattr(fast, f"{name}_token_id")
    slow_checked = 0
    cases = _cases(text)
    for t in cases:
        ids, offsets = ours.encode_with_offsets(t)
        ref = fast(t, add_special_tokens=False, return_offsets_mapping=True)
        assert ids == ref["input_ids"], repr(t)
        assert [tuple(o) for o in offsets] == [tuple(o) for o in ref["offset_mapping"]], repr(t)
        assert ours.encode(t) == ids
        assert ours.tokenize(t) == fast.tokenize(t) == plain.tokenize(t)
        assert ours.decode(ids) == fast.decode(ids)
        assert ours.decode(ids, clean_up_spaces=False) == " ".join(ours.tokenize(t)).replace(" ##", "")
        # The legacy pure-Python reference differs from the fast one (which we follow) in two documented
        # ways: it NFC-composes the text first and lower-cases Σ to final ς by context.
        if unicodedata.normalize("NFC", t) == t and not (lc and "Σ" in t):
            assert ours.tokenize(t) == slow.tokenize(t), repr(t)
            slow_checked += 1
    assert slow_checked > len(cases) // 2, (slow_checked, len(cases))


def test_offsets_point_into_original_text(vocabs):
    dirs, _ = vocabs
    tok = load_tokenizer(dirs[True] / "vocab.txt")
    text = "  Héllo\u200b, WORLD!  Cafe\u0301 北京 "
    ids, offsets = tok.encode_with_offsets(text)
    toks = tok.convert_ids_to_tokens(ids)
    assert len(toks) == len(offsets)
    for piece, (s, e) in zip(toks, offsets):
        span = text[s:e]
        assert span.strip() == span and span
        if piece != "[UNK]":
            # Normalising the original span gives back the piece (lower-cased, accents stripped).
            norm = "".join(c for c in unicodedata.normalize("NFD", span.lower())
                           if unicodedata.category(c) not in ("Mn", "Cf"))
            assert norm == piece.removeprefix("##"), (piece, span)
    assert text[offsets[0][0]:offsets[0][1]].lower().startswith("h")
    assert offsets == sorted(offsets)


def test_long_words_and_word_start_mask(vocabs):
    dirs, _ = vocabs
    tok = load_tokenizer(dirs[True] / "vocab.txt")
    assert tok.tokenize("a" * 101) == ["[UNK]"]
    assert tok.encode_with_offsets("x " + "a" * 101)[1][-1] == (2, 103)
    wsm = tok.word_start_mask
    assert wsm.shape == (tok.vocab_size,) and wsm.dtype == bool
    for i in range(tok.vocab_size):
        assert wsm[i] == (not tok.convert_ids_to_tokens([i])[0].startswith("##"))
    assert wsm[tok.cls_id] and 0 < wsm.sum() < tok.vocab_size


def test_lower_case_inference_and_override(tmp_path):
    base = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]"]
    (tmp_path / "lower.txt").write_text("\n".join(base + ["the", "##s", "é"]) + "\n")
    (tmp_path / "cased.txt").write_text("\n".join(base + ["the", "The", "##s"]) + "\n")
    assert load_tokenizer(tmp_path / "lower.txt").lower_case is True
    assert load_tokenizer(tmp_path / "cased.txt").lower_case is False
    forced = load_tokenizer(tmp_path / "lower.txt", lower_case=False)
    assert forced.lower_case is False and forced.tokenize("The") == ["[UNK]"]
    assert load_tokenizer(tmp_path / "lower.txt").tokenize("Thes") == ["the", "##s"]
    (tmp_path / "nospecial.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="special"):
        load_tokenizer(tmp_path / "nospecial.txt")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "missing.txt")
