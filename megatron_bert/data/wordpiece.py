"""BERT WordPiece tokenizer (pure Python + `regex`), output-compatible with the reference one.

Pipeline, matching what the reference BERT tokenizer does (and what `tokenizers`' BertNormalizer +
BertPreTokenizer + WordPiece do):

1. special tokens ([CLS], [SEP], [MASK], [PAD], [UNK]) written literally in the raw text are kept whole;
2. "clean": control/format/private-use chars, NUL and U+FFFD are deleted (they do NOT split a word),
   every whitespace char becomes a separator;
3. CJK ideographs become single-char words;
4. uncased: accents are stripped (NFD, drop Mn marks) then lower-cased, char by char;
5. split on whitespace and punctuation (every punctuation char is its own word);
6. greedy longest-match WordPiece per word; a word longer than 100 chars or with an unmatchable
   piece becomes a single [UNK].

All normalisation is per character, so a word's pieces only depend on the word itself: we pre-split
the *original* text with one regex, normalise each raw word separately and cache the result keyed by
the raw word. Offsets are therefore spans of the original text for free (each normalised char remembers
the original char it came from), including lower-cased / accent-stripped text.

Where the two reference implementations disagree we follow the Rust one (`tokenizers`, what
transformers' BertTokenizer/BertTokenizerFast use): the old pure-Python tokenizer additionally
NFC-composes the text (so cased "e"+U+0301 becomes "é"), lower-cases a word-final Σ to ς, deletes
unassigned code points and splits CJK from U+2B820 on. Known remaining difference: characters added to
Unicode after the reference's (older) tables -- rare scripts, a few new punctuation marks -- are classified
with Python's newer Unicode data here.
"""
from __future__ import annotations

import re
import unicodedata

import numpy as np
import regex

from .tokenizer_base import TokenizerBase

SPECIAL_TOKENS = ("[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]")

# Whitespace that separates words. Other White_Space chars (\x0b, \x0c, \x85) are control chars and
# get deleted *without* splitting, exactly like the reference cleaning step.
_WS = r"\t\n\r\p{Zs}\u2028\u2029"
# ASCII symbols count as punctuation for BERT even when Unicode calls them symbols ($, +, <, ^, ...).
_PUNCT = r"\p{P}!-/:-@\[-`{-~"
# CJK ideograph blocks that BERT splits into single characters (not kana / hangul). The reference
# (Rust) starts the Extension E range at U+2B920, not U+2B820 (the old Python tokenizer uses U+2B820);
# we follow it so that ids and offsets match transformers' BertTokenizer exactly.
_CJK = (r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002b73f"
        r"\U0002b740-\U0002b81f\U0002b920-\U0002ceaf\U0002f800-\U0002fa1f")
_IS_SPLIT = regex.compile(f"[{_WS}{_PUNCT}{_CJK}]")
# Characters that the cleaning step deletes: control, format, private-use and surrogate chars plus U+FFFD
# (tab/newline/CR are whitespace). Unassigned code points (Cn) are kept, as the reference does.
_REMOVED = regex.compile(r"[[\p{Cc}\p{Cf}\p{Co}\p{Cs}\ufffd]--[\t\n\r]]", flags=regex.V1)
_MAX_CACHE = 1 << 19
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _pretokenizer(specials):
    """Regex yielding special tokens, raw words, and single punctuation/CJK chars (whitespace skipped)."""
    alts = [regex.escape(s) for s in sorted(specials, key=len, reverse=True)]
    alts += [f"[^{_WS}{_PUNCT}{_CJK}]+", f"[{_PUNCT}{_CJK}]"]
    return regex.compile("|".join(alts))


def _ascii_pretokenizer(specials):
    """The same split for pure-ASCII text with the stdlib `re`, about twice as fast as the Unicode one.
    ASCII whitespace that splits is tab, LF, CR and space (VT and FF are control chars: deleted)."""
    punct = r"!-/:-@\[-`{-~"
    alts = [re.escape(s) for s in sorted(specials, key=len, reverse=True)]
    alts += [f"[^\t\n\r {punct}]+", f"[{punct}]"]
    return re.compile("|".join(alts))


class WordPieceTokenizer(TokenizerBase):
    """BERT WordPiece over a `vocab.txt` (one token per line, id = line number)."""

    def __init__(self, vocab_file, lower_case=None, strip_accents=None, max_chars_per_word=100):
        with open(vocab_file, encoding="utf-8", newline="") as f:
            # id = line number; a CRLF file's "\r" is not part of the token.
            tokens = [line.rstrip("\n").removesuffix("\r") for line in f]
        self.vocab_file = str(vocab_file)
        self.vocab = {t: i for i, t in enumerate(tokens)}  # a duplicated token keeps its last id, as the reference
        self.inv_vocab = tokens
        missing = [s for s in SPECIAL_TOKENS if s not in self.vocab]
        if missing:
            raise ValueError(f"{vocab_file}: vocabulary lacks special token(s) {', '.join(missing)}")
        if lower_case is None:
            lower_case = infer_lower_case(tokens)
        self.lower_case = bool(lower_case)
        self.strip_accents = self.lower_case if strip_accents is None else bool(strip_accents)
        self.max_chars_per_word = max_chars_per_word
        self.cls_id, self.sep_id, self.mask_id, self.pad_id, self.unk_id = (
            self.vocab[s] for s in SPECIAL_TOKENS)
        self._specials = {s: self.vocab[s] for s in SPECIAL_TOKENS}
        self._pre = _pretokenizer(SPECIAL_TOKENS)
        self._pre_ascii = _ascii_pretokenizer(SPECIAL_TOKENS)
        self._cache = {}
        self._word_start = None

    # ----------------------------------------------------------------- interface
    @property
    def word_start_mask(self):
        if self._word_start is None:
            self._word_start = np.array([not t.startswith("##") for t in self.inv_vocab], dtype=bool)
        return self._word_start

    def encode(self, text):
        ids = []
        get, miss = self._cache.get, self._word
        pre = self._pre_ascii if text.isascii() else self._pre
        for word in pre.findall(text):
            ids.extend((get(word) or miss(word))[0])
        return ids

    def encode_with_offsets(self, text):
        ids, offsets = [], []
        get, miss = self._cache.get, self._word
        pre = self._pre_ascii if text.isascii() else self._pre
        for m in pre.finditer(text):
            word = m.group()
            wids, spans = get(word) or miss(word)
            ids.extend(wids)
            base = m.start()
            if len(spans) == 1:
                offsets.append((base + spans[0][0], base + spans[0][1]))
            else:
                offsets.extend([(base + s, base + e) for s, e in spans])
        return ids, offsets

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab.get(t, self.unk_id) for t in tokens]

    def decode(self, ids, skip_special_tokens=False, clean_up_spaces=True):
        """Join pieces ('##' glues to the previous one). clean_up_spaces removes the space before
        . , ! ? and in contractions, token by token, like the reference decoder does."""
        toks = self.convert_ids_to_tokens(ids)
        if skip_special_tokens:
            toks = [t for t in toks if t not in self._specials]
        out = []
        for i, t in enumerate(toks):
            if i:
                t = t[2:] if t.startswith("##") else " " + t
            if clean_up_spaces:
                for a, b in _CLEANUP:
                    t = t.replace(a, b)
            out.append(t)
        return "".join(out)

    # ----------------------------------------------------------------- internals
    def _word(self, raw):
        """(ids, spans relative to `raw`) for one pre-token, cached by its raw text."""
        hit = self._cache.get(raw)
        if hit is not None:
            return hit
        sid = self._specials.get(raw)
        if sid is not None:
            res = ((sid,), ((0, len(raw)),))
        elif raw.isascii() and raw.isprintable():
            # Fast path: ASCII words are 1:1 under lower() and contain nothing to delete.
            word = raw.lower() if self.lower_case else raw
            res = self._wordpiece(word, list(range(len(raw))))
        else:
            res = self._normalized_words(raw)
        if len(self._cache) >= _MAX_CACHE:
            self._cache.clear()
        self._cache[raw] = res
        return res

    def _normalized_words(self, raw):
        """Slow path: char-by-char cleaning / accent stripping / lower-casing, then re-split.

        Re-splitting is needed because normalisation can *create* a separator (e.g. U+1FEF strips to a
        backtick), and the reference splits after normalising.
        """
        chars, origin = [], []
        for j, c in enumerate(raw):
            if _REMOVED.match(c):
                continue
            if self.strip_accents:
                c = "".join(x for x in unicodedata.normalize("NFD", c)
                            if unicodedata.category(x) != "Mn")
            if self.lower_case:
                c = c.lower()
            for x in c:
                chars.append(x)
                origin.append(j)
        ids, spans = [], []
        start = 0
        for k in range(len(chars) + 1):
            if k == len(chars) or _IS_SPLIT.match(chars[k]):
                if k > start:
                    wi, ws = self._wordpiece("".join(chars[start:k]), origin[start:k])
                    ids.extend(wi)
                    spans.extend(ws)
                if k < len(chars) and not chars[k].isspace():
                    wi, ws = self._wordpiece(chars[k], origin[k:k + 1])
                    ids.extend(wi)
                    spans.extend(ws)
                start = k + 1
        return tuple(ids), tuple(spans)

    def _wordpiece(self, word, origin):
        """Greedy longest-match-first; `origin[k]` = index in the raw word of normalised char k."""
        n = len(word)
        if n > self.max_chars_per_word:
            return (self.unk_id,), ((origin[0], origin[-1] + 1),)
        vocab = self.vocab
        ids, spans = [], []
        start = 0
        while start < n:
            end = n
            prefix = "##" if start > 0 else ""
            while end > start:
                tid = vocab.get(prefix + word[start:end])
                if tid is not None:
                    break
                end -= 1
            else:
                return (self.unk_id,), ((origin[0], origin[-1] + 1),)
            ids.append(tid)
            spans.append((origin[start], origin[end - 1] + 1))
            start = end
        return tuple(ids), tuple(spans)


def infer_lower_case(tokens):
    """An uncased vocab has no upper-case letters outside bracketed specials like [CLS]/[unused0]."""
    for t in tokens:
        if t.startswith("[") and t.endswith("]"):
            continue
        if any(c.isupper() for c in t):
            return False
    return True
