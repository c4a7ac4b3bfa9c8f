"""Built-in corpus: the English prose that ships with every Python install.

Documents are the docstrings of the standard library, collected by *parsing* its source files with
`ast` (nothing is imported), one document per module (module, class and function docstrings in source
order, as paragraphs), plus the help topics of `pydoc_data.topics` (read with `ast.literal_eval`).
Test suites, idlelib, lib2to3 and site-packages are skipped; doctest blocks, indented literal blocks
and code-like lines are dropped; repeated paragraphs (boilerplate) are kept once; tiny documents are
dropped. The order is deterministic (sorted paths, source order).

    python -m megatron_bert.data.corpus --output corpus.jsonl [--max-mb N]
    python -m megatron_bert.data.corpus --quickstart DIR      # corpus + tokenizer + indexed dataset

`prepare_quickstart(data_dir)` is what launch/quickstart.sh uses before pretraining a tiny model.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import inspect
import json
import multiprocessing as mp
import os
import sys
import sysconfig
import time
from pathlib import Path

import regex

SKIP_DIRS = frozenset({"test", "tests", "idle_test", "idlelib", "lib2to3", "site-packages", "dist-packages",
                       "__pycache__", "turtledemo", "_bundled"})
MIN_DOC_CHARS = 300
MIN_PARA_WORDS = 4

_PARA_SPLIT = regex.compile(r"\n[ \t]*\n")
_CODE_START = regex.compile(r"^\s*(def |class |import |from \S+ import|return\b|raise |yield |assert |"
                            r"try:|except\b|finally:|with .*:$|if .*:$|elif .*:$|else:$|for .*:$|while .*:$|"
                            r"@\w|\$ |% |#)")
_RST_NOISE = regex.compile(r"^\s*([-=~^*+#`]{3,}\s*$|\.\. |:\w+:`?\s*$)")
_SYMBOLS = frozenset("()[]{}=<>;_*/\\|#@$`'\"%+^~&")


def stdlib_root():
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root=None):
    """Sorted .py files of the standard library, minus tests and the skipped packages."""
    root = Path(root) if root else stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test_"))
        for fn in sorted(filenames):
            if fn.endswith(".py") and not fn.startswith("test_"):
                out.append(Path(dirpath) / fn)
    # pydoc_data/topics.py is handled separately (it is data, not docstrings).
    return [p for p in out if not (p.parent.name == "pydoc_data" and p.name == "topics.py")]


def _is_code_line(line):
    s = line.strip()
    if not s:
        return False
    if _CODE_START.match(line) or _RST_NOISE.match(line) or " = " in s or "==" in s or s.startswith(">>>"):
        return True
    nonspace = sum(1 for c in s if not c.isspace())
    return sum(1 for c in s if c in _SYMBOLS) > 0.2 * nonspace


def clean_text(text):
    """Docstring/help text -> list of prose paragraphs (each one line of single-spaced text)."""
    text = inspect.cleandoc(text)  # dedent all but the first line, like docstrings are written
    paras = []
    for para in _PARA_SPLIT.split(text):
        lines = para.split("\n")
        if not lines or lines[0][:1].isspace():
            continue  # indented block: literal/code block or a wrapped list body
        keep = []
        for line in lines:
            if line.lstrip().startswith(">>>"):
                break  # doctest: the prompt and everything after it in this paragraph is code/output
            if _is_code_line(line):
                continue
            keep.append(line.strip())
        p = " ".join(keep)
        p = regex.sub(r"::$", ":", regex.sub(r"\s+", " ", p)).strip()
        if len(p.split()) >= MIN_PARA_WORDS and sum(c.isalpha() for c in p) > 0.6 * len(p):
            paras.append(p)
    return paras


def module_docstrings(path):
    """Docstrings of a module, its classes and functions, in source order (empty list on parse errors)."""
    try:
        tree = ast.parse(Path(path).read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError, RecursionError):
        return []
    docs = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            d = ast.get_docstring(node, clean=True)
            if d:
                docs.append(d)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child)
            elif isinstance(child, (ast.If, ast.Try, ast.With)):  # defs under `if`/`try` blocks
                visit(child)

    visit(tree)
    return docs


def _module_paragraphs(path):
    return [p for d in module_docstrings(path) for p in clean_text(d)]


def pydoc_topics(root=None):
    path = (Path(root) if root else stdlib_root()) / "pydoc_data" / "topics.py"
    try:
        tree = ast.parse(path.read_bytes())
    except (OSError, SyntaxError, ValueError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return {}
    return {}


def iter_documents(root=None, workers=None):
    """Yield cleaned document texts, deterministically. Module parsing runs in `workers` processes."""
    files = stdlib_files(root)
    seen = set()

    def assemble(paras):
        out = []
        for p in paras:
            h = hashlib.blake2b(p.encode(), digest_size=8).digest()
            if h not in seen:
                seen.add(h)
                out.append(p)
        text = "\n\n".join(out)
        return text if len(text) >= MIN_DOC_CHARS else None

    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    pool = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn").Pool(workers) \
        if workers > 1 else None
    try:
        results = pool.imap(_module_paragraphs, files, chunksize=8) if pool else map(_module_paragraphs, files)
        for paras in results:
            text = assemble(paras)
            if text:
                yield text
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    topics = pydoc_topics(root)
    for key in sorted(topics):
        text = assemble(clean_text(topics[key]))
        if text:
            yield text


def extract_corpus(output, max_mb=None, root=None, workers=None, log=None):
    """Write the corpus as JSON lines {"text": ...} (atomically); returns {documents, bytes, seconds, path}.

    max_mb caps the size (stops before the document that would exceed it).
    """
    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.time()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f"{output.name}.tmp{os.getpid()}")
    cap = None if max_mb is None else int(max_mb * 1e6)
    n_docs = n_bytes = 0
    gen = iter_documents(root, workers)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for text in gen:
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                size = len(line.encode("utf-8"))
                if cap is not None and n_bytes + size > cap:
                    break
                f.write(line)
                n_docs += 1
                n_bytes += size
        os.replace(tmp, output)
    finally:
        gen.close()
        if tmp.exists():
            tmp.unlink()
    stats = {"path": str(output), "documents": n_docs, "bytes": n_bytes, "seconds": time.time() - t0}
    log(f"corpus: {n_docs} documents, {n_bytes / 1e6:.2f} MB -> {output} ({stats['seconds']:.1f} s)")
    return stats


QUICKSTART_VERSION = 1


def prepare_quickstart(data_dir="data_cache/quickstart", max_mb=3.0, vocab_size=8000, workers=2, log=None):
    """Corpus -> SentencePiece tokenizer -> indexed dataset, cached in data_dir.

    Returns dict(prefix=..., tokenizer=..., corpus=..., seconds=...). Each step is skipped when its
    output exists, is valid and was made with the same settings (recorded in quickstart.json), so a
    second call is instant. Every file is written under a temporary name and renamed.
    """
    from . import indexed, sentencepiece_tok
    from .sentences import split_sentences
    from ..preprocess import preprocess

    log = log or (lambda s: print(s, file=sys.stderr))
    t0 = time.time()
    d = Path(data_dir)
    d.mkdir(parents=True, exist_ok=True)
    corpus, model, prefix = d / "corpus.jsonl", d / "spm.model", d / "stdlib_docs"
    manifest = d / "quickstart.json"
    config = {"version": QUICKSTART_VERSION, "max_mb": max_mb, "vocab_size": vocab_size,
              "python": sys.version.split()[0], "stdlib": str(stdlib_root())}
    try:
        same = json.loads(manifest.read_text()) == config
    except (OSError, ValueError):
        same = False
    if not same:
        for p in (manifest, corpus, model, *indexed.index_paths(prefix)):
            if os.path.exists(p):
                os.unlink(p)

    if not corpus.is_file():
        extract_corpus(corpus, max_mb=max_mb, workers=workers, log=log)

    try:
        sentencepiece_tok.SentencePieceTokenizer(model)
    except (OSError, ValueError, RuntimeError):
        t1 = time.time()

        def sentences():
            with open(corpus, encoding="utf-8") as f:
                for line in f:
                    yield from split_sentences(json.loads(line)["text"])

        sentencepiece_tok.train_sentencepiece(sentences(), d / "spm", vocab_size=vocab_size,
                                              input_sentence_size=100_000, num_threads=2)
        log(f"tokenizer: trained SentencePiece (vocab {vocab_size}) -> {model} ({time.time() - t1:.1f} s)")

    try:
        indexed.IndexedDataset(prefix)
    except (OSError, ValueError):
        preprocess(str(corpus), str(prefix), str(model), workers=workers, log=log)

    if not same:
        tmp = manifest.with_name(manifest.name + ".tmp")
        tmp.write_text(json.dumps(config))
        os.replace(tmp, manifest)
    out = {"prefix": str(prefix), "tokenizer": str(model), "corpus": str(corpus), "seconds": time.time() - t0}
    log(f"quickstart data ready in {out['seconds']:.1f} s: prefix={prefix} tokenizer={model}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m megatron_bert.data.corpus", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--output", help="write the corpus as JSON lines to this file")
    g.add_argument("--quickstart", metavar="DIR", help="prepare corpus, tokenizer and dataset in DIR")
    p.add_argument("--max-mb", type=float, default=None, help="cap the corpus size (MB)")
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args(argv)
    try:
        if args.output:
            extract_corpus(args.output, max_mb=args.max_mb, workers=args.workers)
        else:
            kw = {"max_mb": args.max_mb} if args.max_mb is not None else {}
            res = prepare_quickstart(args.quickstart, workers=args.workers or 2, **kw)
            print(json.dumps({k: res[k] for k in ("prefix", "tokenizer")}))
    except Exception as e:  # noqa: BLE001 -- one line, no traceback (contract)
        if os.environ.get("MEGATRON_BERT_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
