"""SentencePiece tokenizer behind the common interface, plus training a BERT-ready model."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .tokenizer_base import TokenizerBase

WORD_START = "\u2581"  # '▁', SentencePiece's "a space preceded this piece" marker

# Candidate piece spellings for each special role, ours first, then common ones (ALBERT, T5, XLNet).
_ROLE_PIECES = {
    "cls": ("[CLS]", "<cls>", "<s>"),
    "sep": ("[SEP]", "<sep>", "</s>"),
    "mask": ("[MASK]", "<mask>"),
    "pad": ("[PAD]", "<pad>"),
    "unk": ("[UNK]", "<unk>"),
}


class SentencePieceTokenizer(TokenizerBase):
    def __init__(self, model_file, lower_case=None):
        self.model_file = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_file)
        except (RuntimeError, OSError) as e:  # sentencepiece reports a bad file as RuntimeError
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.model_file} is not a readable SentencePiece model ({reason}): "
                             "point data.tokenizer at a .model file written by sentencepiece") from None
        # The model's own normaliser decides casing; lower_case=True additionally lower-cases the input
        # (length-preserving, so offsets stay valid).
        self.lower_case = bool(lower_case)
        n = self.sp.get_piece_size()
        self.inv_vocab = [self.sp.id_to_piece(i) for i in range(n)]
        ids = {}
        for role, names in _ROLE_PIECES.items():
            ids[role] = self._find(names)
        if ids["unk"] is None:
            ids["unk"] = self.sp.unk_id()
        if ids["pad"] is None and self.sp.pad_id() >= 0:
            ids["pad"] = self.sp.pad_id()
        missing = [r for r, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{model_file}: SentencePiece model has no piece for {', '.join(missing)} "
                             f"(train it with train_sentencepiece() to get BERT special tokens)")
        self.cls_id, self.sep_id, self.mask_id = ids["cls"], ids["sep"], ids["mask"]
        self.pad_id, self.unk_id = ids["pad"], ids["unk"]
        self._special_ids = {self.cls_id, self.sep_id, self.mask_id, self.pad_id, self.unk_id}
        self._word_start = None

    def _find(self, names):
        for name in names:
            i = self.sp.piece_to_id(name)
            # piece_to_id answers unk_id for unknown pieces, so check the spelling round-trips.
            if 0 <= i < len(self.inv_vocab) and self.inv_vocab[i] == name:
                return i
        return None

    @property
    def word_start_mask(self):
        if self._word_start is None:
            m = np.array([p.startswith(WORD_START) for p in self.inv_vocab], dtype=bool)
            # Specials, control, unknown and byte pieces stand alone: treat each as its own word.
            for i in range(len(m)):
                if (i in self._special_ids or self.sp.is_control(i) or self.sp.is_unknown(i)
                        or self.sp.is_byte(i)):
                    m[i] = True
            self._word_start = m
        return self._word_start

    def _prep(self, text):
        if not self.lower_case:
            return text
        low = text.lower()
        if len(low) == len(text):
            return low
        return "".join(c.lower()[0] for c in text)  # e.g. 'İ' lower-cases to two chars

    def encode(self, text):
        return self.sp.encode(self._prep(text))

    def encode_with_offsets(self, text):
        src = self._prep(text)
        ids, spans = _encode_offsets(self.sp, src)
        # SentencePiece attaches the preceding whitespace to a '▁' piece; for span extraction (SQuAD)
        # we want spans that start at the first visible char.
        out = []
        for s, e in spans:
            while s < e and text[s].isspace():
                s += 1
            out.append((s, e))
        return ids, out

    def convert_tokens_to_ids(self, tokens):
        return [self.sp.piece_to_id(t) for t in tokens]

    def decode(self, ids, skip_special_tokens=False):
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self.sp.decode(ids)


def _encode_offsets(sp, text):
    """(ids, char spans) from sentencepiece.

    sentencepiece >= 0.2.1 returns char offsets directly ('offset_mapping'); older releases only have
    the immutable proto, whose begin/end are UTF-8 *byte* offsets that we convert to char offsets.
    """
    try:
        r = sp.encode(text, out_type="offset_mapping")
        return list(r["ids"]), [tuple(o) for o in r["offsets"]]
    except (ValueError, TypeError):
        pass
    proto = sp.encode_as_immutable_proto(text)
    byte_to_char = np.zeros(len(text.encode("utf-8")) + 1, dtype=np.int64)
    pos = 0
    for ci, ch in enumerate(text):
        nb = len(ch.encode("utf-8"))
        byte_to_char[pos:pos + nb] = ci
        pos += nb
    byte_to_char[pos] = len(text)
    ids = [p.id for p in proto.pieces]
    spans = [(int(byte_to_char[p.begin]), int(byte_to_char[p.end])) for p in proto.pieces]
    return ids, spans


def train_sentencepiece(input_text_files_or_iterator, model_prefix, vocab_size=8000, model_type="unigram",
                        lower_case=False, character_coverage=0.9999, input_sentence_size=200_000,
                        num_threads=2, seed_sentencepiece_size=200_000, max_sentence_length=8192,
                        extra_options=None):
    """Train a SentencePiece model with BERT's specials and return the path of `<model_prefix>.model`.

    Ids: 0=[PAD], 1=[UNK], 2=[CLS], 3=[SEP], 4=[MASK]. [CLS]/[SEP]/[MASK] are user-defined symbols, so
    they are also recognised when written literally in text (like the WordPiece tokenizer does).
    `input_text_files_or_iterator`: a path, a list of paths (one sentence per line), or an iterable of
    strings. `vocab_size` is a soft limit so that tiny corpora still train. The model is written under
    a temporary prefix and renamed, so `<model_prefix>.model` is either complete or absent.
    """
    model_prefix = str(model_prefix)
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{model_prefix}.tmp{os.getpid()}"
    kwargs = dict(
        model_prefix=tmp_prefix, vocab_size=vocab_size, model_type=model_type,
        pad_id=0, pad_piece="[PAD]", unk_id=1, unk_piece="[UNK]", bos_id=-1, eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        character_coverage=character_coverage, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=num_threads, hard_vocab_limit=False,
        seed_sentencepiece_size=seed_sentencepiece_size, max_sentence_length=max_sentence_length,
        normalization_rule_name="nmt_nfkc_cf" if lower_case else "nmt_nfkc",
        minloglevel=2,
    )
    kwargs.update(extra_options or {})
    src = input_text_files_or_iterator
    if isinstance(src, (str, os.PathLike)):
        kwargs["input"] = str(src)
    elif isinstance(src, (list, tuple)) and src and all(isinstance(p, (str, os.PathLike)) and
                                                        os.path.isfile(p) for p in src):
        kwargs["input"] = ",".join(str(p) for p in src)
    else:
        # Skip blank lines: sentencepiece counts them as sentences and they waste the sample budget.
        kwargs["sentence_iterator"] = (s for s in iter(src) if s and not s.isspace())
    try:
        spm.SentencePieceTrainer.train(**kwargs)
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, model_prefix + ext)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.unlink(tmp_prefix + ext)
    return model_prefix + ".model"
