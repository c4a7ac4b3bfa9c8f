"""RACE-style multiple-choice reading comprehension.

Input: JSON articles `{"article", "questions": [...], "options": [[4 strings], ...],
"answers": ["A".."D", ...], "id"?}` — one per file as in the RACE distribution (a directory of
.txt files, searched recursively), a JSON list of them, or JSON lines. Each question becomes one
feature of shape [num_choices, s]: `[CLS] article [SEP] question+option [SEP]` per option.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

from .common import (IGNORE_INDEX, INPUT_FIELDS, TaskDataError, TaskDataset, TaskSpec, check_max_seq_length,
                     encode_pair, find_file, find_optional_file,
                     load_json, read_text_lines, register_task, snippet, write_jsonl)
from .metrics import accuracy

LETTERS = "ABCDEFGHIJ"


@dataclass
class RaceExample:
    guid: str               # "<article id>:<question index>"
    article: str
    question: str
    options: list[str]
    label: int | None       # index of the right option, None when the file has no answers


def read_race(path: str, num_choices: int = 4) -> list[RaceExample]:
    """Read a RACE file or a directory of them (.txt/.json/.jsonl, sorted for a stable order)."""
    if os.path.isdir(path):
        files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                       if f.endswith((".txt", ".json", ".jsonl")))
        if not files:
            raise TaskDataError(path, "directory has no .txt/.json/.jsonl files", "point at the RACE split folder")
        return [ex for f in files for ex in read_race(f, num_choices)]
    examples = []
    for where, article_id, obj in _articles(path):
        examples += _parse_article(obj, where, article_id, num_choices)
    return examples


def _articles(path: str):
    """(location, default id, object) for every article in a file."""
    base = os.path.splitext(os.path.basename(path))[0]
    lines = [line for _, line in read_text_lines(path)]
    nonblank = [line for line in lines if line.strip()]
    # JSON lines: several non-blank lines that each parse on their own.
    if len(nonblank) > 1 and (_parses_as_object(nonblank[0]) or _parses_as_object(nonblank[-1])):
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}", f"invalid JSON ({e.msg})",
                                    "write one article object per line") from None
            yield f"{path}:{lineno}", f"{base}-{lineno}", obj
        return
    data = load_json(path)
    if isinstance(data, list):
        for i, obj in enumerate(data):
            yield f"{path}: article {i}", f"{base}-{i}", obj
    else:
        yield path, base, data


def _parses_as_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _parse_article(obj, where: str, article_id: str, num_choices: int) -> list[RaceExample]:
    if not isinstance(obj, dict):
        raise TaskDataError(where, "an article must be a JSON object", 'use {"article", "questions", "options", "answers"}')
    for key, kind in (("article", str), ("questions", list), ("options", list)):
        if key not in obj:
            raise TaskDataError(where, f"missing key {key!r}", "every article needs article, questions, options, answers")
        if not isinstance(obj[key], kind):
            raise TaskDataError(where, f"{key!r} must be a {kind.__name__}", "fix the value's type")
    article_id = str(obj.get("id", article_id))
    questions, options = obj["questions"], obj["options"]
    answers = obj.get("answers")
    if answers is not None and not isinstance(answers, list):
        raise TaskDataError(where, "'answers' must be a list of letters", 'e.g. "answers": ["A", "C"]')
    if len(options) != len(questions) or (answers is not None and len(answers) != len(questions)):
        raise TaskDataError(where, f"{len(questions)} questions but {len(options)} option lists and "
                            f"{'no' if answers is None else len(answers)} answers",
                            "give one option list and one answer per question")
    letters = LETTERS[:num_choices]
    out = []
    for qi, (question, opts) in enumerate(zip(questions, options)):
        q_where = f"{where} question {qi}"
        if not isinstance(question, str) or not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
            raise TaskDataError(q_where, "question must be a string and options a list of strings", "fix the types")
        if len(opts) != num_choices:
            raise TaskDataError(q_where, f"{len(opts)} options, expected {num_choices}",
                                "give every question the same number of options (or set num_choices)")
        label = None
        if answers is not None:
            answer = answers[qi]
            if not isinstance(answer, str) or answer.strip().upper() not in letters:
                raise TaskDataError(q_where, f"unknown answer {snippet(str(answer))}", f"use one of {', '.join(letters)}")
            label = letters.index(answer.strip().upper())
        out.append(RaceExample(f"{article_id}:{qi}", obj["article"], question, list(opts), label))
    return out


def question_with_option(question: str, option: str) -> str:
    """RACE cloze questions mark the gap with "_": fill the option in there (the sentence then reads
    naturally); ordinary questions get the option appended."""
    if "_" in question:
        return question.replace("_", f" {option} ", 1)
    return f"{question} {option}"


class RaceTask(TaskSpec):
    name = "race"
    head_type = "multiple_choice"
    problem_type = "multiple_choice"
    label_fields = ("labels",)

    def __init__(self, num_choices: int = 4, **_unused):
        if not 2 <= int(num_choices) <= len(LETTERS):
            raise ValueError(f"num_choices={num_choices} must be between 2 and {len(LETTERS)}")
        self.num_choices = int(num_choices)

    @property
    def num_labels(self) -> int:
        return self.num_choices

    @property
    def label_names(self) -> list[str]:
        return list(LETTERS[: self.num_choices])

    def data_files(self, data_dir: str) -> dict[str, str]:
        files = {"train": find_file(data_dir, ("train", "train.json", "train.jsonl"), "train"),
                 "valid": find_file(data_dir, ("dev", "valid", "dev.json", "dev.jsonl"), "validation")}
        test = find_optional_file(data_dir, ("test", "test.json", "test.jsonl"))
        if test is not None:
            files["test"] = test
        return files

    def load_examples(self, path: str) -> list[RaceExample]:
        return read_race(path, self.num_choices)

    def featurize(self, examples, tokenizer, max_seq_length, split="train", path=""):
        check_max_seq_length(max_seq_length)
        article_cache: dict[str, list[int]] = {}  # an article is shared by its ~4 questions
        n, c = len(examples), self.num_choices
        arrays = {k: np.zeros((n, c, max_seq_length), dtype=np.int32) for k in INPUT_FIELDS}
        arrays["labels"] = np.full(n, IGNORE_INDEX, dtype=np.int32)
        for i, ex in enumerate(examples):
            if ex.article not in article_cache:
                article_cache = {ex.article: tokenizer.encode(ex.article)}  # keep one: questions are grouped
            article_ids = article_cache[ex.article]
            for j, option in enumerate(ex.options):
                f = encode_pair(tokenizer, article_ids, tokenizer.encode(question_with_option(ex.question, option)),
                                max_seq_length)
                for k in INPUT_FIELDS:
                    arrays[k][i, j] = f[k]
            if ex.label is not None:
                arrays["labels"][i] = ex.label
        has_labels = bool(examples) and all(e.label is not None for e in examples)
        return TaskDataset(self.name, split, path, examples, arrays, np.arange(n), has_labels=has_labels)

    def evaluate(self, dataset, logits):
        logits = np.asarray(logits)
        if logits.shape != (len(dataset), self.num_choices):
            raise ValueError(f"RACE logits must be [{len(dataset)}, {self.num_choices}], got {logits.shape}")
        preds = logits.argmax(axis=-1)
        if not dataset.has_labels:
            return {}, preds
        return self._suffix({"accuracy": accuracy(preds, dataset.arrays["labels"])}, dataset.split), preds

    def write_predictions(self, path, dataset, predictions):
        """JSON lines `{"id", "prediction": letter}` (+ `"label"` when known)."""
        rows = []
        for ex, p in zip(dataset.examples, predictions):
            row = {"id": ex.guid, "prediction": LETTERS[int(p)]}
            if ex.label is not None:
                row["label"] = LETTERS[ex.label]
            rows.append(row)
        write_jsonl(path, rows)


register_task("race", RaceTask)
