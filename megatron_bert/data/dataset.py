"""BERT pretraining samples over an indexed dataset (see docs/DESIGN.md for the sample format).

Sample mapping: each document's sentences are grouped greedily into chunks of consecutive sentences
whose token count reaches a target length (seq_length - 3, or with probability `short_seq_prob` a
random length in [2, seq_length - 3]); one chunk = one sample. With a binary head (SOP/NSP) a chunk
needs at least two sentences, so documents with a single sentence (and a lone leftover sentence at the
end of a document) are skipped; with `binary_head=None` single sentences are used as one segment.

Global index i: epoch = i // N, position = permutation_{seed, epoch}[i % N], so every i >= 0 is valid
(multi-epoch) and the result only depends on (seed, i): all random choices of sample i come from
`np.random.default_rng([seed, split, 0, i])`, whatever the worker, rank or batch layout.

The mapping is cached as .npy next to the data (or in cache_dir), keyed by a hash of the data files'
size+mtime and every parameter it depends on. `build_index()` builds it (call on rank 0, then barrier);
`build_pretraining_datasets()` then only loads it (building it itself if absent; writes are atomic).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from .indexed import IndexedDataset
from .masking import IGNORE_INDEX, mask_tokens, ngram_length_table, random_token_pool

SPLITS = {"train": 0, "valid": 1}
MAPPING_VERSION = 1
_SPLIT_SEED = 20240917  # valid documents do not depend on the training seed


def _norm_binary_head(binary_head):
    if binary_head in (None, False, "none", "None", ""):
        return None
    if binary_head not in ("sop", "nsp"):
        raise ValueError(f"binary_head must be 'sop', 'nsp' or None, got {binary_head!r}")
    return binary_head


def split_documents(doc_index, min_sentences, valid_fraction):
    """Deterministic document split -> (train_docs, valid_docs), sorted arrays of document ids.

    Only documents that can yield a sample (>= min_sentences sentences) are distributed, so the valid
    split is non-empty whenever there are at least two usable documents and valid_fraction > 0.
    """
    n_sent = np.diff(np.asarray(doc_index, dtype=np.int64))
    usable = np.flatnonzero(n_sent >= min_sentences)
    if not 0 <= valid_fraction < 1:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    n_valid = int(math.ceil(valid_fraction * usable.size)) if valid_fraction > 0 else 0
    if valid_fraction > 0 and usable.size >= 2:
        n_valid = min(max(n_valid, 1), usable.size - 1)
    perm = np.random.default_rng(_SPLIT_SEED).permutation(usable.size)
    valid = np.sort(usable[perm[:n_valid]])
    train = np.sort(usable[perm[n_valid:]])
    return train, valid


def build_samples_mapping(doc_index, sentence_lengths, docs, max_num_tokens, short_seq_prob, min_sentences,
                          rng):
    """Rows (doc, first_sentence, end_sentence, target_length), int64 [N, 4], in document order.

    One pass over sentences; random target lengths are pre-drawn in blocks to keep the loop tight.
    """
    rows = []
    block = 4096
    coins, lens, k = None, None, block

    def next_target():
        nonlocal coins, lens, k
        if k == block:
            coins = rng.random(block).tolist()
            lens = rng.integers(2, max(2, max_num_tokens) + 1, block).tolist()
            k = 0
        k += 1
        return lens[k - 1] if coins[k - 1] < short_seq_prob else max_num_tokens

    target = next_target()
    for d in np.asarray(docs, dtype=np.int64).tolist():
        s0, s1 = int(doc_index[d]), int(doc_index[d + 1])
        if s1 - s0 < min_sentences:
            continue
        lengths = sentence_lengths[s0:s1].tolist()
        first, acc = s0, 0
        for j, n in enumerate(lengths):
            acc += n
            s = s0 + j
            if (acc >= target or s == s1 - 1) and s - first + 1 >= min_sentences:
                rows.append((d, first, s + 1, target))
                first, acc = s + 1, 0
                target = next_target()
    return np.asarray(rows, dtype=np.int64).reshape(-1, 4)


def _cache_key(data, seq_length, seed, short_seq_prob, binary_head, valid_fraction):
    blob = json.dumps({"sig": data.file_signature(), "seq_length": seq_length, "seed": seed,
                       "short_seq_prob": short_seq_prob, "binary_head": binary_head,
                       "valid_fraction": valid_fraction, "version": MAPPING_VERSION}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _mapping_paths(prefix, cache_dir, key):
    base = Path(str(prefix))
    d = Path(cache_dir) if cache_dir is not None else base.parent
    return {split: d / f"{base.name}.{split}_samples_{key}.npy" for split in SPLITS}


def build_index(prefix, seq_length, seed, valid_fraction=0.02, binary_head="sop", short_seq_prob=0.1,
                cache_dir=None, data=None):
    """Build (or reuse) the cached sample mappings of both splits; returns {split: array}.

    Meant for rank 0 before a barrier; other ranks then load the files via build_pretraining_datasets.
    """
    binary_head = _norm_binary_head(binary_head)
    data = data if data is not None else IndexedDataset(prefix)
    key = _cache_key(data, seq_length, seed, short_seq_prob, binary_head, valid_fraction)
    paths = _mapping_paths(prefix, cache_dir, key)
    if all(p.is_file() for p in paths.values()):
        try:
            return {s: np.load(p, mmap_mode="r") for s, p in paths.items()}
        except (ValueError, OSError):
            pass  # unreadable cache: rebuild below
    min_sent = 2 if binary_head else 1
    split_docs = dict(zip(("train", "valid"), split_documents(data.doc_index, min_sent, valid_fraction)))
    lengths = np.asarray(data.sentence_lengths)
    out = {}
    for split, docs in split_docs.items():
        rng = np.random.default_rng([seed, SPLITS[split], 2])
        mapping = build_samples_mapping(data.doc_index, lengths, docs, seq_length - (3 if binary_head else 2),
                                        short_seq_prob, min_sent, rng)
        out[split] = mapping
        _atomic_save(paths[split], mapping)
    return out


def _atomic_save(path, array):
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except OSError as e:  # read-only data dir: keep going with the in-memory mapping
        warnings.warn(f"could not cache sample mapping at {path} ({e}); pass cache_dir= to cache it")
        if tmp.exists():
            tmp.unlink()


class BertPretrainingDataset:
    """`ds[i]` -> dict of numpy arrays: input_ids, token_type_ids, attention_mask, labels, binary_label,
    sample_id. `len(ds)` is one epoch; any i >= 0 is valid."""

    def __init__(self, data, tokenizer, mapping, seq_length, seed, split="train", binary_head="sop",
                 masked_lm_prob=0.15, whole_word_masking=False, max_predictions=None, stream=0,
                 max_ngrams=1, ngram_distribution="harmonic"):
        self.data = data if isinstance(data, IndexedDataset) else IndexedDataset(data)
        self.mapping = np.asarray(mapping)
        self.seq_length = int(seq_length)
        self.seed = int(seed)
        self.split = split
        self.split_code = SPLITS[split]
        # Blend members k > 0 (data/blend.py) append k to every random key; 0 keeps the plain keys.
        self._stream = (int(stream),) if stream else ()
        self.binary_head = _norm_binary_head(binary_head)
        self.masked_lm_prob = masked_lm_prob
        self.max_predictions = max_predictions
        if self.seq_length < (5 if self.binary_head else 3):
            raise ValueError(f"seq_length={seq_length} is too short for a BERT sample")
        # Keep only plain ids/arrays from the tokenizer so the dataset pickles cheaply into workers.
        t = tokenizer
        self.cls_id, self.sep_id, self.mask_id, self.pad_id = t.cls_id, t.sep_id, t.mask_id, t.pad_id
        self.vocab_size = t.vocab_size
        self.special_ids = np.array(sorted({t.cls_id, t.sep_id, t.mask_id, t.pad_id}), dtype=np.int64)
        self.random_pool = random_token_pool(t.vocab_size, [t.cls_id, t.sep_id, t.mask_id, t.pad_id, t.unk_id])
        self.word_start_mask = np.asarray(t.word_start_mask, dtype=bool) if whole_word_masking else None
        cdf = ngram_length_table(max_ngrams, ngram_distribution)  # (checks both)
        self.ngram_cdf = cdf if len(cdf) > 1 else None
        self.split_docs = np.unique(self.mapping[:, 0]) if len(self.mapping) else np.zeros(0, np.int64)
        self._perm = (None, None)

    def __len__(self):
        return len(self.mapping)

    def _position(self, i):
        n = len(self.mapping)
        if n == 0:
            raise IndexError(f"the {self.split} split has no samples")
        epoch, pos = divmod(i, n)
        if self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, self.split_code, 1, epoch, *self._stream])
            self._perm = (epoch, rng.permutation(n))
        return int(self._perm[1][pos])

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        d, first, end, target = (int(x) for x in self.mapping[self._position(i)])
        rng = np.random.default_rng([self.seed, self.split_code, 0, i, *self._stream])
        label = 0
        if self.binary_head and end - first >= 2:
            cut = first + int(rng.integers(1, end - first))
            a = self.data.get_tokens(first, cut)
            if self.binary_head == "sop":
                b = self.data.get_tokens(cut, end)
                if rng.random() < 0.5:
                    a, b, label = b, a, 1
            elif rng.random() < 0.5 and self.split_docs.size > 1:
                b, label = self._random_segment(rng, d, max(1, target - a.size)), 1
            else:
                b = self.data.get_tokens(cut, end)
            a, b = self._truncate(rng, a, b, self.seq_length - 3)
        else:
            a = self.data.get_tokens(first, end)
            a, _ = self._truncate(rng, a, a[:0], self.seq_length - 2)
            b = None
        return self._assemble(rng, a, b, label, i)

    def _random_segment(self, rng, doc, target_len):
        """NSP negative: sentences of another random document, from a random start, ~target_len tokens."""
        k = int(rng.integers(0, self.split_docs.size - 1))
        other = int(self.split_docs[k + int(self.split_docs[k] >= doc)])  # uniform over docs != doc
        s0, s1 = self.data.document_range(other)
        start = int(rng.integers(s0, s1))
        cum = np.cumsum(self.data.sentence_lengths[start:s1])
        end = start + min(int(np.searchsorted(cum, target_len)) + 1, s1 - start)
        return self.data.get_tokens(start, end)

    @staticmethod
    def _truncate(rng, a, b, max_tokens):
        """Trim the longer segment one token at a time (ties trim B), each token from the front or back
        with p=0.5 -- computed in closed form instead of a per-token loop."""
        la, lb = a.size, b.size
        excess = la + lb - max_tokens
        if excess <= 0:
            return a, b
        cut_a = cut_b = 0
        if la > lb:
            cut_a = min(excess, la - lb)
        elif lb > la:
            cut_b = min(excess, lb - la)
        rest = excess - cut_a - cut_b
        cut_b += (rest + 1) // 2
        cut_a += rest // 2
        out = []
        for seg, cut in ((a, cut_a), (b, cut_b)):
            front = int(rng.binomial(cut, 0.5)) if cut else 0
            out.append(seg[front:seg.size - (cut - front)])
        return out[0], out[1]

    def _assemble(self, rng, a, b, label, sample_id):
        s = self.seq_length
        parts = [[self.cls_id], a, [self.sep_id]]
        if b is not None:
            parts += [b, [self.sep_id]]
        tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])
        n = tokens.size
        token_type = np.zeros(s, dtype=np.int64)
        if b is not None:
            token_type[a.size + 2:n] = 1
        eligible = ~np.isin(tokens, self.special_ids)
        word_start = self.word_start_mask[tokens] if self.word_start_mask is not None else None
        ids, labels = mask_tokens(tokens, eligible, rng, self.mask_id, self.random_pool, self.masked_lm_prob,
                                  self.max_predictions, word_start, self.ngram_cdf)
        input_ids = np.full(s, self.pad_id, dtype=np.int64)
        input_ids[:n] = ids
        full_labels = np.full(s, IGNORE_INDEX, dtype=np.int64)
        full_labels[:n] = labels
        attention = np.zeros(s, dtype=np.int64)
        attention[:n] = 1
        return {"input_ids": input_ids, "token_type_ids": token_type, "attention_mask": attention,
                "labels": full_labels, "binary_label": np.array(label, dtype=np.int64),
                "sample_id": np.array(sample_id, dtype=np.int64)}


def build_pretraining_datasets(prefix, tokenizer, seq_length, seed, valid_fraction=0.02, binary_head="sop",
                               masked_lm_prob=0.15, whole_word_masking=False, short_seq_prob=0.1,
                               cache_dir=None, max_predictions=None, stream=0, max_ngrams=1,
                               ngram_distribution="harmonic"):
    """(train_ds, valid_ds) over the indexed dataset at `prefix`, split by documents. ``stream``: the
    member's number in a blend (its own random draws)."""
    from .tokenizers import load_tokenizer

    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    data = IndexedDataset(prefix)
    # Cheap sanity check on the first tokens: data made with another tokenizer fails here, not mid-run.
    head = data.tokens[:1 << 20]
    if head.size and int(head.max()) >= tokenizer.vocab_size:
        raise ValueError(f"{prefix}: token ids exceed the tokenizer's vocab ({tokenizer.vocab_size}); "
                         f"was the data preprocessed with a different tokenizer?")
    maps = build_index(prefix, seq_length, seed, valid_fraction, binary_head, short_seq_prob, cache_dir, data)
    if len(maps["train"]) == 0:
        need = "two or more sentences" if _norm_binary_head(binary_head) else "one sentence"
        raise ValueError(f"{prefix}: no training samples (documents need {need}); add more text")
    common = dict(seq_length=seq_length, seed=seed, binary_head=binary_head, masked_lm_prob=masked_lm_prob,
                  whole_word_masking=whole_word_masking, max_predictions=max_predictions, stream=stream,
                  max_ngrams=max_ngrams, ngram_distribution=ngram_distribution)
    return (BertPretrainingDataset(data, tokenizer, maps["train"], split="train", **common),
            BertPretrainingDataset(data, tokenizer, maps["valid"], split="valid", **common))
