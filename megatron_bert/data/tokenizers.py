"""Tokenizer entry point: `load_tokenizer(path)` picks WordPiece (vocab.txt) or SentencePiece (*.model).

Both classes expose the interface in docs/DESIGN.md: vocab_size, cls/sep/mask/pad/unk ids, tokenize,
encode (no specials added), encode_with_offsets (char spans into the input text), decode,
convert_ids_to_tokens and word_start_mask (for whole-word masking).
"""
from __future__ import annotations

import os
from pathlib import Path

from .sentencepiece_tok import SentencePieceTokenizer, train_sentencepiece
from .wordpiece import WordPieceTokenizer, infer_lower_case

__all__ = ["load_tokenizer", "WordPieceTokenizer", "SentencePieceTokenizer", "train_sentencepiece",
           "infer_lower_case"]


def load_tokenizer(path, lower_case=None):
    """Load a tokenizer from a WordPiece `vocab.txt`, a SentencePiece `.model`, or a directory holding one.

    lower_case=None: WordPiece infers it from the vocab (no upper-case tokens -> lower-case);
    SentencePiece leaves casing to the model's own normaliser.
    """
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        for name in ("vocab.txt", "spiece.model", "tokenizer.model", "sentencepiece.model"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            models = sorted(p.glob("*.model"))
            if not models:
                raise FileNotFoundError(f"no vocab.txt or *.model tokenizer file in directory {p}")
            p = models[0]
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {p}")
    if p.suffix == ".model":
        return SentencePieceTokenizer(p, lower_case=lower_case)
    with open(p, "rb") as f:
        head = f.read(4096)
    if b"\x00" in head:
        raise ValueError(f"{p} looks binary; expected a WordPiece vocab.txt or a SentencePiece .model")
    return WordPieceTokenizer(p, lower_case=lower_case)
