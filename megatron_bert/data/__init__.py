"""Pretraining data: tokenizers, mmap indexed datasets, BERT samples, batching, built-in corpus.

Names are imported lazily so that `import megatron_bert.data.tokenizers` (e.g. in preprocessing worker
processes) does not pull in torch.
"""
from importlib import import_module

_EXPORTS = {
    "load_tokenizer": "tokenizers", "train_sentencepiece": "tokenizers",
    "WordPieceTokenizer": "tokenizers", "SentencePieceTokenizer": "tokenizers",
    "IndexedDataset": "indexed", "IndexedDatasetWriter": "indexed", "write_indexed_dataset": "indexed",
    "split_sentences": "sentences",
    "BertPretrainingDataset": "dataset", "build_pretraining_datasets": "dataset", "build_index": "dataset",
    "mask_tokens": "masking",
    "micro_batch_sample_ids": "loader", "collate": "loader", "PretrainingLoader": "loader",
    "extract_corpus": "corpus", "prepare_quickstart": "corpus",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
