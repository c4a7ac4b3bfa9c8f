"""Text -> sentence-split token ids -> mmap indexed dataset (P.bin + P.idx).

    python -m megatron_bert.preprocess --input F [F ...] --output-prefix P --tokenizer T [--workers N]

Input: JSON lines (`{"text": ...}` per line, key set by --json-key) or plain text (documents separated
by blank lines); auto-detected per file from the extension (.jsonl/.json -> JSON lines) or set with
--format. Several files and glob patterns (``'shards/*.jsonl.gz'``, ``**`` recurses) make one dataset,
documents in the order given (each pattern's matches sorted); .gz/.bz2/.xz files are read compressed.
Bad documents (invalid JSON, missing key, non-string value, empty, binary, non-UTF-8) are skipped and
reported in the summary with line numbers; --strict stops at the first one (exit 2) instead. Errors are
one line on stderr, never a traceback (set MEGATRON_BERT_DEBUG=1 to see one). Outputs are written under
temporary names and renamed, so a crash never leaves a half-written index.
"""
from __future__ import annotations

import argparse
import bz2
import glob
import gzip
import json
import lzma
import multiprocessing as mp
import os
import re
import sys
import time

import numpy as np

from megatron_bert.data.indexed import IndexedDatasetWriter, best_dtype
from megatron_bert.data.sentences import split_sentences
from megatron_bert.data.tokenizers import load_tokenizer


class UsageError(Exception):
    """An error to report as one line (exit code in .code)."""

    def __init__(self, msg, code=1):
        super().__init__(msg)
        self.code = code


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m megatron_bert.preprocess", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, nargs="+",
                   help="JSON-lines or plain-text files or glob patterns (.gz/.bz2/.xz read compressed)")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--tokenizer", required=True, help="WordPiece vocab.txt or SentencePiece .model")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--format", choices=("auto", "jsonl", "text"), default="auto")
    p.add_argument("--json-key", default="text")
    p.add_argument("--lower-case", action=argparse.BooleanOptionalAction, default=None,
                   help="default: inferred from the vocab")
    p.add_argument("--strict", action="store_true", help="stop with exit code 2 at the first bad document")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


# --------------------------------------------------------------------------- reading
_OPENERS = {".gz": gzip.GzipFile, ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile}
_GLOB_CHARS = re.compile(r"[*?[]")


def expand_inputs(inputs):
    """Paths and glob patterns → the files, in the order given (a pattern's matches sorted)."""
    files = []
    for item in [inputs] if isinstance(inputs, (str, os.PathLike)) else inputs:
        item = os.fspath(item)
        if _GLOB_CHARS.search(item):
            matches = sorted(m for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                raise UsageError(f"no input file matches {item!r}: check the pattern (quote it so the shell "
                                 "does not expand it)")
            files += matches
        elif os.path.isdir(item):
            raise UsageError(f"input {item} is a directory: give its files or a pattern like '{item}/*.jsonl'")
        elif not os.path.isfile(item):
            raise UsageError(f"input file not found: {item}")
        else:
            files.append(item)
    return files


def _format_of(path, fmt):
    if fmt != "auto":
        return fmt
    name = path.lower()
    for ext in _OPENERS:
        name = name.removesuffix(ext)
    return "jsonl" if name.endswith((".jsonl", ".json")) else "text"


class InputReader:
    """Records of every input file in turn, as ``((file_index, line_number), format, raw_bytes)``; ``disk_bytes``
    is how far into the inputs (on disk, compressed or not) reading has got, for the progress bar."""

    def __init__(self, files, fmt):
        self.files, self.fmt = files, fmt
        self.sizes = [os.path.getsize(f) for f in files]
        self.total_bytes = sum(self.sizes)
        self.disk_bytes = 0

    def __iter__(self):
        done = 0
        for k, (path, size) in enumerate(zip(self.files, self.sizes)):
            with open(path, "rb") as disk:
                opener = _OPENERS.get(os.path.splitext(path)[1].lower())
                f = opener(fileobj=disk) if opener is gzip.GzipFile else opener(disk) if opener else disk
                fmt = _format_of(path, self.fmt)
                try:
                    for line, raw in read_records(f, fmt):
                        self.disk_bytes = done + disk.tell()
                        yield (k, line), fmt, raw
                except (OSError, EOFError, lzma.LZMAError) as e:
                    raise UsageError(f"{path}: cannot read it ({e}): is the file complete?") from None
            done += size
            self.disk_bytes = done


def read_records(f, fmt):
    """Yield (line_number, raw_bytes) per document of the binary file ``f``, without decoding (workers
    decode and validate)."""
    if fmt == "jsonl":
        for n, line in enumerate(f, 1):
            if line.strip():
                yield n, line
        return
    block, start = [], 0
    for n, line in enumerate(f, 1):
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield start, b"".join(block)
            block = []
    if block:
        yield start, b"".join(block)


_CONTROL = re.compile(r"[\x01-\x08\x0e-\x1f]")


def _looks_binary(text):
    """NUL anywhere, or more than 10% C0 control chars (not whitespace) in the first 4 KiB."""
    if "\x00" in text:
        return True
    head = text[:4096]
    return len(_CONTROL.findall(head)) > 0.1 * len(head)


def extract_text(raw, fmt, key):
    """(text, None) or (None, reason) for one record."""
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"non-UTF-8 bytes (at byte {e.start})"
    if fmt == "jsonl":
        try:
            obj = json.loads(s)
        except (ValueError, RecursionError) as e:
            return None, f"invalid JSON ({getattr(e, 'msg', type(e).__name__)})"
        if not isinstance(obj, dict):
            return None, "JSON line is not an object"
        if key not in obj:
            return None, f"missing key {key!r}"
        s = obj[key]
        if not isinstance(s, str):
            return None, f"value of {key!r} is {type(s).__name__}, not a string"
    if not s.strip():
        return None, "empty document"
    if _looks_binary(s):
        return None, "binary content"
    return s, None


# --------------------------------------------------------------------------- workers
_TOK = None
_KEY = None


def _set_worker_state(tok, key):
    global _TOK, _KEY
    _TOK, _KEY = tok, key


def _init_worker(tokenizer_path, lower_case, key):
    _set_worker_state(load_tokenizer(tokenizer_path, lower_case=lower_case), key)


def _process(record):
    """(where, nbytes, (flat token array, sentence lengths) or None, reason).

    One flat array per document (in the output dtype) instead of one array per sentence keeps the
    pickling between worker and writer cheap.
    """
    where, fmt, raw = record
    text, reason = extract_text(raw, fmt, _KEY)
    if text is None:
        return where, len(raw), None, reason
    flat, lengths = [], []
    for ids in map(_TOK.encode, split_sentences(text)):
        if ids:
            flat.extend(ids)
            lengths.append(len(ids))
    if not lengths:
        return where, len(raw), None, "no tokens after tokenization"
    return where, len(raw), (np.array(flat, dtype=best_dtype(_TOK.vocab_size)), lengths), None


# --------------------------------------------------------------------------- progress
class Progress:
    def __init__(self, total_bytes, enabled):
        self.total = max(total_bytes, 1)
        self.enabled = enabled
        self.t0 = self.last = time.time()
        self.tty = sys.stderr.isatty()
        self.drawn = False

    def update(self, nbytes, docs, force=False):
        now = time.time()
        if not self.enabled or (not force and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        frac = min(nbytes / self.total, 1.0)
        el = max(now - self.t0, 1e-9)
        bar = "#" * int(30 * frac) + "." * (30 - int(30 * frac))
        msg = f"[{bar}] {100 * frac:5.1f}% {docs} docs {nbytes / el / 1e6:.2f} MB/s"
        sys.stderr.write(("\r" + msg) if self.tty else (msg + "\n"))
        sys.stderr.flush()
        self.drawn = True

    def close(self, nbytes, docs, ok):
        """Finish the bar: complete it on success; on a TTY always end its line before other output."""
        if ok and self.tty:
            self.update(nbytes, docs, force=True)
        if self.drawn and self.tty:
            sys.stderr.write("\n")


# --------------------------------------------------------------------------- main work
def preprocess(input_path, output_prefix, tokenizer_path, workers=1, fmt="auto", json_key="text",
               lower_case=None, strict=False, progress=False, log=None):
    """Run the pipeline on one input (path or pattern) or a list of them; returns a stats dict.
    Raises UsageError for reportable problems."""
    log = log or (lambda s: print(s, file=sys.stderr))
    output_prefix, tokenizer_path = os.fspath(output_prefix), os.fspath(tokenizer_path)
    files = expand_inputs(input_path)
    if not os.path.exists(tokenizer_path):
        raise UsageError(f"tokenizer not found: {tokenizer_path}")
    try:
        tok = load_tokenizer(tokenizer_path, lower_case=lower_case)
    except (OSError, ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load tokenizer {tokenizer_path}: {e}") from None
    reader = InputReader(files, fmt)
    formats = sorted({_format_of(f, fmt) for f in files})
    stats = {"documents": 0, "sentences": 0, "tokens": 0, "bytes": 0, "skipped": {}, "files": len(files),
             "format": formats[0] if len(formats) == 1 else "+".join(formats)}
    bar = Progress(reader.total_bytes, progress)
    t0 = time.time()
    pool = None
    ok = False

    def where(w):  # a bad document's place: the line, and its file when there are several
        return f"{files[w[0]]}:{w[1]}" if len(files) > 1 else str(w[1])

    try:
        if workers > 1:
            pool = mp.get_context("spawn" if sys.platform == "darwin" else "fork").Pool(
                workers, _init_worker, (tokenizer_path, lower_case, json_key))
            # imap keeps input order, so the output is identical for any number of workers.
            results = pool.imap(_process, reader, chunksize=64)
        else:
            _set_worker_state(tok, json_key)
            results = map(_process, reader)
        with IndexedDatasetWriter(output_prefix, dtype=best_dtype(tok.vocab_size)) as w:
            for place, nbytes, doc, reason in results:
                stats["bytes"] += nbytes
                if doc is None:
                    if strict:
                        raise UsageError(f"{files[place[0]]}:{place[1]}: {reason} "
                                         "(drop --strict to skip bad documents)", code=2)
                    stats["skipped"].setdefault(reason.split(" (")[0], []).append(where(place))
                else:
                    w.add_flat_document(*doc)
                    stats["documents"] += 1
                    stats["sentences"] += len(doc[1])
                    stats["tokens"] += doc[0].size
                bar.update(reader.disk_bytes, stats["documents"])
            if stats["documents"] == 0:
                named = files[0] if len(files) == 1 else f"{len(files)} input files"
                raise UsageError(f"{named}: no valid documents"
                                 + (f" (json key {json_key!r})" if "jsonl" in formats else ""))
        ok = True
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        bar.close(reader.total_bytes, stats["documents"], ok)
    stats["seconds"] = time.time() - t0
    stats["dtype"] = str(best_dtype(tok.vocab_size).__name__)
    _report(stats, output_prefix, log)
    return stats


def _report(stats, prefix, log):
    sec = max(stats["seconds"], 1e-9)
    log(f"throughput: {stats['documents'] / sec:.1f} docs/s, {stats['bytes'] / sec / 1e6:.2f} MB/s "
        f"({stats['bytes'] / 1e6:.2f} MB in {sec:.1f} s)")
    log(f"wrote {prefix}.bin/.idx: {stats['documents']} documents, {stats['sentences']} sentences, "
        f"{stats['tokens']} tokens ({stats['dtype']})"
        + (f" from {stats['files']} input files" if stats.get("files", 1) > 1 else ""))
    skipped = stats["skipped"]
    if skipped:
        total = sum(len(v) for v in skipped.values())
        parts = []
        for reason, lines in sorted(skipped.items()):
            first = ", ".join(str(x) for x in lines[:5]) + (", ..." if len(lines) > 5 else "")
            parts.append(f"{reason}: {len(lines)} (lines {first})")
        log(f"skipped {total} bad documents: " + "; ".join(parts))
    else:
        log("skipped 0 bad documents")


def main(argv=None):
    args = parse_args(argv)
    try:
        preprocess(args.input, args.output_prefix, args.tokenizer, workers=args.workers, fmt=args.format,
                   json_key=args.json_key, lower_case=args.lower_case, strict=args.strict,
                   progress=not args.quiet)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- the contract is one line, never a traceback
        if os.environ.get("MEGATRON_BERT_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set MEGATRON_BERT_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
