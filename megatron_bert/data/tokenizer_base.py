"""What every tokenizer shares once it has an id → piece table (``inv_vocab``) and ``encode``."""
from __future__ import annotations


class TokenizerBase:
    inv_vocab: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.inv_vocab)

    def tokenize(self, text) -> list[str]:
        return self.convert_ids_to_tokens(self.encode(text))

    def convert_ids_to_tokens(self, ids) -> list[str]:
        inv = self.inv_vocab
        return [inv[int(i)] for i in ids]
