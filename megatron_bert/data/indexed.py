"""Memory-mapped indexed dataset: token ids of sentences grouped into documents.

`P.bin` is the concatenation of all sentences' token ids (uint16 when vocab < 65536, else int32).
`P.idx` layout (little endian):

    header  magic b"MBERTIDX", version u64, dtype code u64, n_sentences u64, n_docs u64, n_tokens u64
    offsets int64[n_sentences]   token offset of each sentence in P.bin
    docs    int64[n_docs + 1]    sentence index where each document starts (last = n_sentences)
    lengths int32[n_sentences]   tokens per sentence

The header fixes every size, so a truncated/corrupt pair is detected on open with a clear error rather
than an out-of-bounds read later. Files are written under temporary names and renamed at the end.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MBERTIDX"
VERSION = 1
_HEADER = struct.Struct("<8sQQQQQ")
DTYPES = {1: np.uint16, 2: np.int32}
_CODES = {np.dtype(v): k for k, v in DTYPES.items()}


class IndexCorruptError(ValueError):
    pass


def best_dtype(vocab_size):
    return np.uint16 if vocab_size < 65536 else np.int32


def index_paths(prefix):
    prefix = str(prefix)
    return prefix + ".idx", prefix + ".bin"


def _tmp_name(path):
    return f"{path}.tmp{os.getpid()}"


class IndexedDatasetWriter:
    """Append documents (lists of sentences of token ids); `finalize()` publishes P.bin and P.idx.

    Usable as a context manager: leaving the block with an exception removes the temporary files.
    """

    def __init__(self, prefix, vocab_size=None, dtype=None):
        if dtype is None:
            if vocab_size is None:
                raise ValueError("give vocab_size or dtype")
            dtype = best_dtype(vocab_size)
        self.dtype = np.dtype(dtype)
        if self.dtype not in _CODES:
            raise ValueError(f"unsupported token dtype {self.dtype}; use uint16 or int32")
        self.max_id = np.iinfo(self.dtype).max
        self.prefix = str(prefix)
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self.idx_path, self.bin_path = index_paths(prefix)
        self._tmp_bin = _tmp_name(self.bin_path)
        self._tmp_idx = _tmp_name(self.idx_path)
        self._bin = open(self._tmp_bin, "wb")
        self._lengths = []           # python ints; one per sentence
        self._doc_starts = [0]
        self.n_tokens = 0
        self._closed = False

    def add_document(self, sentences):
        """`sentences`: iterable of token-id sequences; empty sentences are dropped. Returns #sentences."""
        arrays = [a for a in map(np.asarray, sentences) if a.size]
        if not arrays:
            return 0
        return self.add_flat_document(np.concatenate(arrays), [a.size for a in arrays])

    def add_flat_document(self, tokens, lengths):
        """A document given as all its tokens back to back plus the (non-zero) length of each sentence."""
        tokens = np.asarray(tokens)
        if sum(lengths) != tokens.size or min(lengths, default=1) <= 0:
            raise ValueError("sentence lengths must be positive and add up to the number of tokens")
        if not tokens.size:
            return 0
        lo, hi = int(tokens.min()), int(tokens.max())  # one range check per document, not per sentence
        if lo < 0 or hi > self.max_id:
            raise ValueError(f"token id out of range for {self.dtype}: {lo}..{hi}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes())
        self._lengths.extend(int(n) for n in lengths)
        self.n_tokens += tokens.size
        self._doc_starts.append(len(self._lengths))
        return len(lengths)

    @property
    def num_documents(self):
        return len(self._doc_starts) - 1

    def finalize(self):
        self._bin.close()
        lengths = np.asarray(self._lengths, dtype=np.int32)
        offsets = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1], dtype=np.int64, out=offsets[1:])
        docs = np.asarray(self._doc_starts, dtype=np.int64)
        with open(self._tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, _CODES[self.dtype], len(lengths), len(docs) - 1,
                                 self.n_tokens))
            f.write(offsets.tobytes())
            f.write(docs.tobytes())
            f.write(lengths.tobytes())
        # Remove a stale index first: a crash between the renames then leaves "no index" (a clear
        # error), never an old index pointing into a new .bin.
        if os.path.exists(self.idx_path):
            os.unlink(self.idx_path)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        self._closed = True
        return self.prefix

    def abort(self):
        if not self._closed:
            self._bin.close()
            for p in (self._tmp_bin, self._tmp_idx):
                if os.path.exists(p):
                    os.unlink(p)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.finalize()


def write_indexed_dataset(prefix, documents, vocab_size=None, dtype=None):
    """Convenience: write an iterable of documents (each a list of sentences) in one go."""
    with IndexedDatasetWriter(prefix, vocab_size=vocab_size, dtype=dtype) as w:
        for doc in documents:
            w.add_document(doc)
    return str(prefix)


class IndexedDataset:
    """Read-only view: `ds[i]` is sentence i (a numpy view into the mmap), O(1).

    Pickles as its prefix (DataLoader workers reopen the mmap instead of copying the data).
    """

    def __init__(self, prefix):
        self.prefix = str(prefix)
        self._open()

    def _open(self):
        idx_path, bin_path = index_paths(self.prefix)
        for p in (idx_path, bin_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"indexed dataset file missing: {p} "
                                        f"(create it with python -m megatron_bert.preprocess)")
        idx_size = os.path.getsize(idx_path)
        if idx_size < _HEADER.size:
            raise IndexCorruptError(f"{idx_path}: truncated index ({idx_size} bytes < header)")
        with open(idx_path, "rb") as f:
            magic, version, code, n_sent, n_docs, n_tok = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise IndexCorruptError(f"{idx_path}: not a megatron-bert index (bad magic {magic!r})")
        if version != VERSION:
            raise IndexCorruptError(f"{idx_path}: unsupported index version {version} (expected {VERSION})")
        if code not in DTYPES:
            raise IndexCorruptError(f"{idx_path}: unknown token dtype code {code}")
        expected = _HEADER.size + 8 * n_sent + 8 * (n_docs + 1) + 4 * n_sent
        if idx_size != expected:
            raise IndexCorruptError(f"{idx_path}: truncated or corrupt index "
                                    f"({idx_size} bytes, header implies {expected})")
        self.dtype = np.dtype(DTYPES[code])
        bin_size = os.path.getsize(bin_path)
        if bin_size != n_tok * self.dtype.itemsize:
            raise IndexCorruptError(f"{bin_path}: truncated or corrupt data ({bin_size} bytes, index "
                                    f"implies {n_tok * self.dtype.itemsize}); re-run preprocessing")
        off = _HEADER.size
        self._idx = np.memmap(idx_path, dtype=np.uint8, mode="r")
        self.sentence_offsets = self._idx[off:off + 8 * n_sent].view(np.int64)
        off += 8 * n_sent
        self.doc_index = self._idx[off:off + 8 * (n_docs + 1)].view(np.int64)
        off += 8 * (n_docs + 1)
        self.sentence_lengths = self._idx[off:off + 4 * n_sent].view(np.int32)
        if self.doc_index[0] != 0 or self.doc_index[-1] != n_sent:
            raise IndexCorruptError(f"{idx_path}: corrupt document index")
        self.num_tokens = int(n_tok)
        # np.memmap refuses empty files; an empty dataset gets an empty array instead.
        self.tokens = (np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tok
                       else np.zeros(0, dtype=self.dtype))

    def __getstate__(self):
        return {"prefix": self.prefix}

    def __setstate__(self, state):
        self.prefix = state["prefix"]
        self._open()

    def __len__(self):
        return len(self.sentence_lengths)

    def __getitem__(self, i):
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sentence index {i} out of range [0, {len(self)})")
        o = int(self.sentence_offsets[i])
        return self.tokens[o:o + int(self.sentence_lengths[i])]

    def get_tokens(self, first, last):
        """Tokens of sentences [first, last) concatenated (they are contiguous in P.bin)."""
        if last <= first:
            return self.tokens[0:0]
        o = int(self.sentence_offsets[first])
        e = int(self.sentence_offsets[last - 1]) + int(self.sentence_lengths[last - 1])
        return self.tokens[o:e]

    @property
    def num_documents(self):
        return len(self.doc_index) - 1

    def document_range(self, d):
        """Sentence index range [start, end) of document d."""
        return int(self.doc_index[d]), int(self.doc_index[d + 1])

    def get_document(self, d):
        s, e = self.document_range(d)
        return [self[i] for i in range(s, e)]

    def file_signature(self):
        """(size, mtime_ns) of both files: identifies this exact version of the data for caches."""
        sig = []
        for p in index_paths(self.prefix):
            st = os.stat(p)
            sig.append((st.st_size, st.st_mtime_ns))
        return tuple(sig)
