"""Named-entity recognition (token classification) from CoNLL-style files.

One token per line with the word in the first column and its tag in the last (CoNLL-2003's
`word POS chunk tag` and plain `word tag` both work), blank lines between sentences, and
`-DOCSTART-` lines skipped. Each word is tokenized on its own; the word's tag goes on its first
sub-token and the others get -100, so the model predicts exactly one tag per word and predictions
map back to words without ambiguity. Sentences longer than the sequence are split at word
boundaries into several features so that every word still gets a prediction.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from .common import (IGNORE_INDEX, INPUT_FIELDS, TaskDataError, TaskDataset, TaskSpec, check_max_seq_length,
                     find_file, find_optional_file,
                     pad_features, read_text_lines, register_task, snippet, stack_features)
from .metrics import entity_scores

_TAG = re.compile(r"^(O|[BIESLU][-_]\S+)$")


@dataclass
class NerExample:
    guid: str                    # "<file>:<line of the first word>"
    words: list[str]
    tags: list[str] | None       # None for unlabeled files (one column)


def read_conll(path: str, labels: list[str] | None = None) -> list[NerExample]:
    """Parse a CoNLL file. A file whose first token line has one column is read as unlabeled.
    With `labels` given, a tag outside it is an error (pointing at its line)."""
    examples: list[NerExample] = []
    words: list[str] = []
    tags: list[str] = []
    start, n_cols = 0, None
    known = None if labels is None else set(labels)
    base = os.path.basename(path)

    def flush():
        if words:
            examples.append(NerExample(f"{base}:{start}", list(words), list(tags) if n_cols > 1 else None))
            words.clear()
            tags.clear()

    for lineno, line in read_text_lines(path):
        cols = line.split()
        if not cols:
            flush()
            continue
        if cols[0] == "-DOCSTART-":
            flush()  # a document boundary also ends a sentence
            continue
        where = f"{path}:{lineno}"
        if n_cols is None:
            n_cols = len(cols)
        elif len(cols) != n_cols:
            raise TaskDataError(where, f"expected {n_cols} whitespace-separated columns like the first token "
                                f"line, found {len(cols)}", "each line is `word ... tag`; fix or remove the line")
        if not words:
            start = lineno
        words.append(cols[0])
        if n_cols > 1:
            tag = cols[-1]
            if not _TAG.match(tag):
                raise TaskDataError(where, f"tag {snippet(tag)} is not O or B-/I-/E-/S-<TYPE>",
                                    "put the BIO/IOBES tag in the last column")
            if known is not None and tag not in known:
                raise TaskDataError(where, f"unknown label {snippet(tag)} (not in the training label set)",
                                    f"use one of {', '.join(labels)} or pass the full labels=[...] option")
            tags.append(tag)
    flush()
    return examples


class NerTask(TaskSpec):
    name = "ner"
    head_type = "token_classification"
    problem_type = "token_classification"
    label_fields = ("labels",)

    def __init__(self, labels: list[str] | None = None, **_unused):
        self._labels = None if labels is None else [str(x) for x in labels]

    @property
    def num_labels(self) -> int:
        if self._labels is None:
            raise RuntimeError("ner: label set not known yet; load the train split first or pass labels=[...]")
        return len(self._labels)

    @property
    def label_names(self) -> list[str] | None:
        return self._labels

    def data_files(self, data_dir: str) -> dict[str, str]:
        files = {"train": find_file(data_dir, ("train.txt", "train.conll", "eng.train"), "train"),
                 "valid": find_file(data_dir, ("dev.txt", "valid.txt", "dev.conll", "eng.testa"), "validation")}
        test = find_optional_file(data_dir, ("test.txt", "test.conll", "eng.testb"))
        if test is not None:
            files["test"] = test
        return files

    def load_examples(self, path: str) -> list[NerExample]:
        examples = read_conll(path, self._labels)
        if self._labels is None and any(e.tags for e in examples):
            # First labelled file (train) fixes the label order: "O" first, then sorted, so the
            # same train file always gives the same ids.
            found = {t for e in examples if e.tags for t in e.tags}
            self._labels = ["O"] * ("O" in found) + sorted(found - {"O"})
        return examples

    def featurize(self, examples, tokenizer, max_seq_length, split="train", path=""):
        check_max_seq_length(max_seq_length, minimum=3)
        label_ids = {t: i for i, t in enumerate(self._labels or [])}
        budget = max_seq_length - 2
        feats, meta, owner = [], [], []
        for ei, ex in enumerate(examples):
            # A word the tokenizer drops entirely (e.g. a lone control character) becomes [UNK] so
            # it still owns a position; a word longer than the whole sequence keeps its head.
            pieces = [(tokenizer.encode(w) or [tokenizer.unk_id])[:budget] for w in ex.words]
            for first, last in _chunks([len(p) for p in pieces], budget):
                tokens, firsts = [tokenizer.cls_id], []
                for p in pieces[first:last]:
                    firsts.append(len(tokens))
                    tokens.extend(p)
                tokens.append(tokenizer.sep_id)
                f = pad_features(tokens, [0] * len(tokens), max_seq_length, tokenizer.pad_id)
                labels = np.full(max_seq_length, IGNORE_INDEX, dtype=np.int64)
                if ex.tags is not None:
                    labels[firsts] = [label_ids[t] for t in ex.tags[first:last]]
                f["labels"] = labels
                feats.append(f)
                meta.append((first, np.asarray(firsts, dtype=np.int64)))
                owner.append(ei)
        arrays = stack_features(feats, INPUT_FIELDS + ("labels",)) if feats else \
            {k: np.zeros((0, max_seq_length), np.int32) for k in INPUT_FIELDS + ("labels",)}
        has_labels = bool(examples) and all(e.tags is not None for e in examples)
        return TaskDataset(self.name, split, path, examples, arrays, np.asarray(owner, dtype=np.int64),
                           meta=meta, has_labels=has_labels)

    def word_predictions(self, dataset: TaskDataset, logits) -> list[list[str]]:
        """Per-word tag strings for every example, read off each word's first sub-token."""
        logits = np.asarray(logits)
        if logits.shape[0] != len(dataset):
            raise ValueError(f"{logits.shape[0]} logit rows for {len(dataset)} features")
        out = [[None] * len(ex.words) for ex in dataset.examples]
        for fi, (first, positions) in enumerate(dataset.meta):
            ids = logits[fi, positions].argmax(axis=-1)
            words = out[dataset.feature_to_example[fi]]
            for k, label_id in enumerate(ids):
                words[first + k] = self._labels[int(label_id)]
        return out

    def evaluate(self, dataset, logits):
        preds = self.word_predictions(dataset, logits)
        if not dataset.has_labels:
            return {}, preds
        scores = entity_scores([ex.tags for ex in dataset.examples], preds)
        return self._suffix(scores, dataset.split), preds

    def write_predictions(self, path, dataset, predictions):
        """CoNLL format, one `word [gold] predicted` line per word and a blank line between
        sentences — the layout the conlleval script reads."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            for ex, tags in zip(dataset.examples, predictions):
                for i, (word, tag) in enumerate(zip(ex.words, tags)):
                    gold = f" {ex.tags[i]}" if ex.tags is not None else ""
                    f.write(f"{word}{gold} {tag}\n")
                f.write("\n")


def _chunks(lengths: list[int], budget: int) -> list[tuple[int, int]]:
    """Split words (given their sub-token counts) into [first, last) runs of at most `budget`
    sub-tokens, breaking only between words."""
    spans, first, used = [], 0, 0
    for i, n in enumerate(lengths):
        if used + n > budget and i > first:
            spans.append((first, i))
            first, used = i, 0
        used += n
    spans.append((first, len(lengths)))
    return spans


register_task("ner", NerTask)
