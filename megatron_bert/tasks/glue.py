"""GLUE-style sentence / sentence-pair classification and regression.

Reads the GLUE distribution's TSV files with their real layouts (columns found by header name, so
the train/dev/test variants of a task all work; CoLA's header-less train/dev use fixed columns)
and a generic `text[, text_b], label` format as TSV or JSONL. Quotes are not special in GLUE TSVs
(MNLI/QQP sentences contain unbalanced quotes), so lines are split on tabs by hand, not with csv.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from . import metrics as M
from .common import (IGNORE_INDEX, INPUT_FIELDS, TaskDataError, TaskDataset, TaskSpec, check_max_seq_length,
                     encode_pair, find_file, read_text_lines, register_task, snippet, stack_features, write_jsonl)


@dataclass(frozen=True)
class GlueLayout:
    labels: tuple[str, ...] | None          # None = regression (float label)
    text_a: str                             # header names of the columns
    text_b: str | None
    label: str
    metrics: tuple[str, ...]
    # (n_columns, text_a, text_b, label) positions for files without a header row (CoLA train/dev).
    positional: tuple[int, int, int | None, int] | None = None
    eval_files: tuple[tuple[str, str], ...] = (("valid", "dev.tsv"),)
    test_files: tuple[tuple[str, str], ...] = (("test", "test.tsv"),)


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")
LAYOUTS: dict[str, GlueLayout] = {
    "cola": GlueLayout(_BINARY, "sentence", None, "label", ("mcc", "accuracy"), positional=(4, 3, None, 1)),
    "sst2": GlueLayout(_BINARY, "sentence", None, "label", ("accuracy",)),
    "mrpc": GlueLayout(_BINARY, "#1 String", "#2 String", "Quality", ("accuracy", "f1")),
    "qqp": GlueLayout(_BINARY, "question1", "question2", "is_duplicate", ("accuracy", "f1")),
    "stsb": GlueLayout(None, "sentence1", "sentence2", "score", ("pearson", "spearman")),
    "mnli": GlueLayout(("contradiction", "entailment", "neutral"), "sentence1", "sentence2", "gold_label",
                       ("accuracy",),
                       eval_files=(("matched", "dev_matched.tsv"), ("mismatched", "dev_mismatched.tsv")),
                       test_files=(("test_matched", "test_matched.tsv"), ("test_mismatched", "test_mismatched.tsv"))),
    "qnli": GlueLayout(_NLI2, "question", "sentence", "label", ("accuracy",)),
    "rte": GlueLayout(_NLI2, "sentence1", "sentence2", "label", ("accuracy",)),
    "wnli": GlueLayout(_BINARY, "sentence1", "sentence2", "label", ("accuracy",)),
}
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb"}


@dataclass
class SentenceExample:
    guid: str              # "<file>:<line>" (or the JSONL "id" field) — identifies the row in predictions
    text_a: str
    text_b: str | None
    label: str | float | None  # None when the file has no labels (GLUE test sets)


# --------------------------------------------------------------------------- readers
def read_glue_tsv(path: str, layout: GlueLayout) -> list[SentenceExample]:
    lines = read_text_lines(path)
    first = next(lines, None)
    if first is None:
        return []
    lineno, line = first
    header = line.split("\t")
    if layout.text_a in header:
        n_cols = len(header)
        a_col = header.index(layout.text_a)
        if layout.text_b is not None and layout.text_b not in header:
            raise TaskDataError(f"{path}:1", f"header has no {layout.text_b!r} column (got {header})",
                                "use the GLUE file for this task or fix the header row")
        b_col = header.index(layout.text_b) if layout.text_b else None
        y_col = header.index(layout.label) if layout.label in header else None  # test files: unlabeled
        rows = lines
    elif layout.positional is not None:
        n_cols, a_col, b_col, y_col = layout.positional
        rows = _chain(first, lines)
    else:
        raise TaskDataError(f"{path}:1", f"expected a header row with a {layout.text_a!r} column, got "
                            f"{snippet(line)}", "use the GLUE TSV for this task (first line is the header)")
    out = []
    for lineno, line in rows:
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != n_cols:
            raise TaskDataError(f"{path}:{lineno}", f"expected {n_cols} tab-separated columns, found {len(cols)}",
                                "remove stray tabs/newlines inside the text or fix the row")
        label = None if y_col is None else _parse_label(cols[y_col], layout.labels, f"{path}:{lineno}")
        out.append(SentenceExample(f"{os.path.basename(path)}:{lineno}", cols[a_col],
                                   None if b_col is None else cols[b_col], label))
    return out


def _chain(first, rest):
    yield first
    yield from rest


def _parse_label(value: str, labels: tuple[str, ...] | None, where: str) -> str | float:
    value = value.strip()
    if labels is None:
        try:
            return float(value)
        except ValueError:
            raise TaskDataError(where, f"label {snippet(value)} is not a number",
                                "regression labels must be floats such as 3.8") from None
    if value not in labels:
        raise TaskDataError(where, f"unknown label {snippet(value)}", f"use one of {', '.join(labels)}")
    return value


def read_generic(path: str) -> list[SentenceExample]:
    """`text[, text_b], label` rows: TSV (optional header `text[\\ttext_b]\\tlabel`; a 2-column row
    is text+label, 3 columns text+text_b+label) or JSONL objects with keys text, text_b?, label?, id?.
    Labels are kept as strings here; the task maps them to ids (or floats for regression)."""
    if path.endswith((".jsonl", ".json")):
        return _read_generic_jsonl(path)
    out, n_cols, has_label = [], None, True
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        cols = line.split("\t")
        if n_cols is None:
            n_cols = len(cols)
            if cols[0].strip().lower() == "text":  # header row names the columns
                names = [c.strip().lower() for c in cols]
                has_label = "label" in names
                if not set(names) <= {"text", "text_b", "label"}:
                    raise TaskDataError(f"{path}:{lineno}", f"unknown header columns {cols}",
                                        "the header may only name text, text_b and label")
                continue
            if n_cols not in (2, 3):
                raise TaskDataError(f"{path}:{lineno}", f"expected 2 or 3 tab-separated columns "
                                    f"(text[, text_b], label), found {n_cols}", "fix the row or add a header")
        if len(cols) != n_cols:
            raise TaskDataError(f"{path}:{lineno}", f"expected {n_cols} tab-separated columns, found {len(cols)}",
                                "every row needs the same columns as the first one")
        text_b = cols[1] if (n_cols == 3 or (n_cols == 2 and not has_label)) else None
        label = cols[-1].strip() if has_label else None
        out.append(SentenceExample(f"{os.path.basename(path)}:{lineno}", cols[0], text_b, label))
    return out


def _read_generic_jsonl(path: str) -> list[SentenceExample]:
    out = []
    for lineno, line in read_text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskDataError(where, f"invalid JSON ({e.msg})", "write one JSON object per line") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise TaskDataError(where, "missing string key 'text'",
                                'each line must look like {"text": ..., "text_b": ..., "label": ...}')
        text_b = obj.get("text_b")
        if text_b is not None and not isinstance(text_b, str):
            raise TaskDataError(where, "'text_b' is not a string", "use a string or leave the key out")
        label = obj.get("label")
        if isinstance(label, bool) or (label is not None and not isinstance(label, (str, int, float))):
            raise TaskDataError(where, f"label {label!r} is not a string or number", "use e.g. \"positive\" or 1")
        out.append(SentenceExample(str(obj.get("id", f"{os.path.basename(path)}:{lineno}")), obj["text"], text_b,
                                   None if label is None else str(label)))
    return out


# --------------------------------------------------------------------------- task spec
class GlueTask(TaskSpec):
    head_type = "sequence_classification"

    def __init__(self, dataset: str = "generic", labels: list[str] | None = None, regression: bool = False,
                 **_unused):
        key = _ALIASES.get(dataset.lower(), dataset.lower())
        self.dataset = key
        if key == "generic":
            self.layout = None
            self._labels = None if labels is None else [str(x) for x in labels]
            self.regression = bool(regression)
            self._metric_names = ("pearson", "spearman") if regression else ("accuracy", "f1")
        elif key in LAYOUTS:
            self.layout = LAYOUTS[key]
            self._labels = None if self.layout.labels is None else list(self.layout.labels)
            self.regression = self.layout.labels is None
            self._metric_names = self.layout.metrics
        else:
            raise ValueError(f"unknown GLUE dataset {dataset!r}; choose generic or one of {', '.join(LAYOUTS)}")
        self.name = f"glue/{key}"
        self.problem_type = "regression" if self.regression else "single_label_classification"
        self.eval_splits = tuple(s for s, _ in self.layout.eval_files) if self.layout else ("valid",)
        self.label_fields = ("labels",)

    @property
    def num_labels(self) -> int:
        if self.regression:
            return 1
        if self._labels is None:
            raise RuntimeError(f"{self.name}: label set not known yet; load the train split first "
                               "or pass labels=[...]")
        return len(self._labels)

    @property
    def label_names(self) -> list[str] | None:
        return None if self.regression else self._labels

    def data_files(self, data_dir: str) -> dict[str, str]:
        if self.layout is None:
            files = {"train": find_file(data_dir, ("train.tsv", "train.jsonl"), "train"),
                     "valid": find_file(data_dir, ("dev.tsv", "valid.tsv", "dev.jsonl", "valid.jsonl"), "validation")}
            for name in ("test.tsv", "test.jsonl"):
                if os.path.exists(os.path.join(data_dir, name)):
                    files["test"] = os.path.join(data_dir, name)
            return files
        files = {"train": find_file(data_dir, ("train.tsv",), "train")}
        for split, name in self.layout.eval_files:
            files[split] = find_file(data_dir, (name,), split)
        for split, name in self.layout.test_files:
            if os.path.exists(os.path.join(data_dir, name)):
                files[split] = os.path.join(data_dir, name)
        return files

    def load_examples(self, path: str) -> list[SentenceExample]:
        if self.layout is not None:
            return read_glue_tsv(path, self.layout)
        examples = read_generic(path)
        labelled = [e for e in examples if e.label is not None]
        if self.regression:
            for e in labelled:
                e.label = _parse_label(str(e.label), None, f"{path}: example {e.guid}")
        else:
            if self._labels is None and labelled:  # first labelled file (train) fixes the label order
                self._labels = sorted({str(e.label) for e in labelled})
            for e in labelled:
                _parse_label(str(e.label), tuple(self._labels or ()), f"{path}: example {e.guid}")
        return examples

    def featurize(self, examples, tokenizer, max_seq_length, split="train", path=""):
        check_max_seq_length(max_seq_length)
        has_labels = bool(examples) and all(e.label is not None for e in examples)
        label_ids = {name: i for i, name in enumerate(self._labels or [])}
        feats = []
        for ex in examples:
            f = encode_pair(tokenizer, tokenizer.encode(ex.text_a),
                            None if ex.text_b is None else tokenizer.encode(ex.text_b), max_seq_length)
            if self.regression:
                f["labels"] = np.float32(np.nan if ex.label is None else ex.label)
            else:
                f["labels"] = np.int64(IGNORE_INDEX if ex.label is None else label_ids[str(ex.label)])
            feats.append(f)
        arrays = stack_features(feats, INPUT_FIELDS + ("labels",))
        if not feats:
            arrays = {k: np.zeros((0, max_seq_length), np.int32) for k in INPUT_FIELDS}
            arrays["labels"] = np.zeros((0,), np.float32 if self.regression else np.int32)
        return TaskDataset(self.name, split, path, examples, arrays, np.arange(len(examples)), has_labels=has_labels)

    def predict(self, logits) -> np.ndarray:
        """Label ids (classification) or scores (regression) from [N, num_labels] logits."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.regression:
            return logits.reshape(len(logits))
        return logits.argmax(axis=-1)

    def evaluate(self, dataset, logits):
        preds = self.predict(logits)
        if len(preds) != len(dataset):
            raise ValueError(f"{len(preds)} logit rows for {len(dataset)} examples")
        if not dataset.has_labels:
            return {}, preds
        labels = dataset.arrays["labels"]
        fns = {"accuracy": M.accuracy, "f1": M.f1_binary, "mcc": M.matthews_corrcoef,
               "pearson": M.pearson, "spearman": M.spearman}
        names = self._metric_names
        if not self.regression and self.num_labels != 2:
            names = tuple(n for n in names if n != "f1")  # binary F1 is meaningless for 3+ labels
        out = {n: fns[n](preds, labels) for n in names}
        return self._suffix(out, dataset.split), preds

    def write_predictions(self, path, dataset, predictions):
        """JSON lines `{"id": guid, "prediction": label name | score}` (+ `"label"` when known)."""
        rows = []
        for ex, p in zip(dataset.examples, predictions):
            row = {"id": ex.guid, "prediction": float(p) if self.regression else self._labels[int(p)]}
            if ex.label is not None:
                row["label"] = ex.label
            rows.append(row)
        write_jsonl(path, rows)


register_task("glue", GlueTask)
for _name in list(LAYOUTS) + list(_ALIASES):
    register_task(_name, lambda _n=_name, **kw: GlueTask(dataset=kw.pop("dataset", _n), **kw))
