"""Extractive question answering on SQuAD v1.1 / v2.0 JSON.

Features are `[CLS] question [SEP] context-window [SEP]`. The context is tokenized once with
`encode_with_offsets`, so every context token carries its character span in the *original*
context string; answers are located and predicted through those spans, never by detokenizing,
which is what keeps predictions exact substrings of the context (odd whitespace, accents, CJK,
emoji included). Long contexts become overlapping windows `doc_stride` tokens apart; decoding
(squad_postprocess.py) picks the best span over all windows of a question.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from .common import (INPUT_FIELDS, TaskDataError, TaskDataset, TaskSpec, find_file, load_json, pad_features,
                     register_task, snippet, stack_features)
from .metrics import squad_scores
from .squad_postprocess import SquadDecoding, decode_predictions


@dataclass
class SquadExample:
    qid: str
    question: str
    context: str
    answers: list[tuple[str, int]]      # (text, answer_start char) — first one is the training target
    is_impossible: bool = False
    title: str = ""


@dataclass
class WindowMeta:
    """How feature positions map back to the example's context (per feature)."""
    ctx_pos: int                 # sequence position of the window's first context token
    tok_start: int               # index of that token among the example's context tokens
    max_context: np.ndarray      # [window len] bool: this window is the best-centred one for the token
    offsets: np.ndarray = field(repr=False)  # [n context tokens, 2] char spans (shared by the example's windows)


def read_squad(path: str) -> tuple[list[SquadExample], bool]:
    """Parse a SQuAD JSON file. Returns (examples, is_v2): v2 when the file says version 2 or has
    any `is_impossible` question."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise TaskDataError(path, "top level must be an object with a 'data' list",
                            'use the SQuAD layout {"version": ..., "data": [{"paragraphs": [...]}]}')
    is_v2 = str(data.get("version", "")).startswith(("v2", "2"))
    examples, seen = [], set()
    for ai, article in enumerate(data["data"]):
        paragraphs = _get(article, "paragraphs", list, f"{path}: data[{ai}]")
        for pi, para in enumerate(paragraphs):
            where = f"{path}: data[{ai}].paragraphs[{pi}]"
            context = _get(para, "context", str, where)
            for qi, qa in enumerate(_get(para, "qas", list, where)):
                qid = str(_get(qa, "id", (str, int), f"{where}.qas[{qi}]"))
                ex_where = f"{path}: example {qid}"
                if qid in seen:
                    raise TaskDataError(ex_where, "duplicate question id", "give every question a unique 'id'")
                seen.add(qid)
                question = _get(qa, "question", str, ex_where)
                impossible = bool(qa.get("is_impossible", False))
                is_v2 |= impossible
                answers = []
                for k, ans in enumerate(_get(qa, "answers", list, ex_where)):
                    text = _get(ans, "text", str, f"{ex_where} answers[{k}]")
                    start = _get(ans, "answer_start", int, f"{ex_where} answers[{k}]")
                    if context[start:start + len(text)] != text:
                        found = context.find(text)
                        fix = (f"set answer_start to {found}" if found >= 0
                               else "fix the answer text; it does not occur in the context")
                        raise TaskDataError(ex_where, f"answer {snippet(text)} does not match the context at "
                                            f"answer_start={start} (context there reads "
                                            f"{snippet(context[start:start + len(text)])})", fix)
                    answers.append((text, start))
                if not answers and not impossible:
                    raise TaskDataError(ex_where, "answerable question without answers",
                                        "add an answer or set \"is_impossible\": true (SQuAD v2.0)")
                examples.append(SquadExample(qid, question, context, [] if impossible else answers,
                                             impossible, str(article.get("title", ""))))
    return examples, is_v2


def _get(obj, key, types, where):
    if not isinstance(obj, dict) or key not in obj:
        raise TaskDataError(where, f"missing key {key!r}", "every SQuAD entry needs it; see the SQuAD JSON layout")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise TaskDataError(where, f"{key!r} has type {type(value).__name__}", "fix the value's type")
    return value


def window_starts(n_tokens: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` tokens, `stride` apart, until the last one reaches the
    end (one empty window for an empty context)."""
    starts, s = [0], 0
    while s + window < n_tokens:
        s += min(window, stride)
        starts.append(s)
    return starts


def max_context_owner(n_tokens: int, starts: list[int], window: int) -> np.ndarray:
    """For each context token, the window where it has the most context on its shorter side
    (ties: the earlier window). Only that window may start an answer at the token, so a span is
    never judged from a window where it sits at the very edge."""
    best = np.full(n_tokens, -1.0)
    owner = np.zeros(n_tokens, dtype=np.int64)
    for w, s in enumerate(starts):
        length = min(window, n_tokens - s)
        idx = np.arange(s, s + length)
        score = np.minimum(idx - s, s + length - 1 - idx) + 0.01 * length
        better = score > best[idx]
        best[idx[better]] = score[better]
        owner[idx[better]] = w
    return owner


class SquadTask(TaskSpec):
    name = "squad"
    head_type = "question_answering"
    problem_type = "question_answering"
    label_fields = ("start_positions", "end_positions")

    def __init__(self, version_2_with_negative: bool | None = None, doc_stride: int = 128,
                 max_query_length: int = 64, n_best_size: int = 20, max_answer_length: int = 30,
                 null_score_diff_threshold: float = 0.0, **_unused):
        self.version_2 = version_2_with_negative   # None = decide from the data
        self.doc_stride = int(doc_stride)
        self.max_query_length = int(max_query_length)
        self.n_best_size = int(n_best_size)
        self.max_answer_length = int(max_answer_length)
        self.null_score_diff_threshold = float(null_score_diff_threshold)

    @property
    def num_labels(self) -> int:
        return 2  # start and end logits

    def data_files(self, data_dir: str) -> dict[str, str]:
        v = "v2.0" if self.version_2 else "v1.1"
        names = (f"train-{v}.json", "train.json") if self.version_2 is not None else \
            ("train-v1.1.json", "train-v2.0.json", "train.json")
        files = {"train": find_file(data_dir, names, "train")}
        dev = os.path.join(data_dir, os.path.basename(files["train"]).replace("train", "dev"))
        files["valid"] = dev if os.path.exists(dev) else find_file(data_dir, ("dev.json", "valid.json"), "validation")
        return files

    def load_examples(self, path: str) -> list[SquadExample]:
        examples, is_v2 = read_squad(path)
        if self.version_2 is None and is_v2:
            self.version_2 = True
        return examples

    def featurize(self, examples, tokenizer, max_seq_length, split="train", path=""):
        feats, meta, owner = [], [], []
        for ei, ex in enumerate(examples):
            q_ids = tokenizer.encode(ex.question)[: self.max_query_length]
            window = max_seq_length - len(q_ids) - 3
            if window < 1:
                raise ValueError(f"max_seq_length={max_seq_length} leaves no room for context after a "
                                 f"{len(q_ids)}-token question; raise it or lower max_query_length")
            ctx_ids, offsets = tokenizer.encode_with_offsets(ex.context)
            offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
            answer = self._answer_tokens(ex, offsets)
            starts = window_starts(len(ctx_ids), window, self.doc_stride)
            best_window = max_context_owner(len(ctx_ids), starts, window)
            ctx_pos = len(q_ids) + 2
            for w, s in enumerate(starts):
                chunk = ctx_ids[s:s + window]
                tokens = [tokenizer.cls_id, *q_ids, tokenizer.sep_id, *chunk, tokenizer.sep_id]
                types = [0] * ctx_pos + [1] * (len(chunk) + 1)
                f = pad_features(tokens, types, max_seq_length, tokenizer.pad_id)
                start_pos = end_pos = 0  # CLS: no answer in this window (or unanswerable)
                if answer is not None and s <= answer[0] and answer[1] < s + len(chunk):
                    start_pos, end_pos = ctx_pos + answer[0] - s, ctx_pos + answer[1] - s
                f["start_positions"] = np.int64(start_pos)
                f["end_positions"] = np.int64(end_pos)
                feats.append(f)
                meta.append(WindowMeta(ctx_pos, s, best_window[s:s + len(chunk)] == w, offsets))
                owner.append(ei)
        fields = INPUT_FIELDS + self.label_fields
        arrays = stack_features(feats, fields) if feats else \
            {k: np.zeros((0, max_seq_length) if k in INPUT_FIELDS else (0,), np.int32) for k in fields}
        return TaskDataset(self.name, split, path, examples, arrays, np.asarray(owner, dtype=np.int64),
                           meta=meta, has_labels=True)

    @staticmethod
    def _answer_tokens(ex: SquadExample, offsets: np.ndarray) -> tuple[int, int] | None:
        """First and last context token overlapping the first answer's characters."""
        if ex.is_impossible or not ex.answers or len(offsets) == 0:
            return None
        text, start = ex.answers[0]
        end = start + len(text)
        hit = np.flatnonzero((offsets[:, 1] > start) & (offsets[:, 0] < end))
        if len(hit) == 0:  # e.g. an all-whitespace answer: nothing to point at
            return None
        return int(hit[0]), int(hit[-1])

    def decode(self, dataset: TaskDataset, logits) -> SquadDecoding:
        start_logits, end_logits = split_qa_logits(logits)
        return decode_predictions(dataset, start_logits, end_logits, n_best_size=self.n_best_size,
                                  max_answer_length=self.max_answer_length, version_2=bool(self.version_2),
                                  null_score_diff_threshold=self.null_score_diff_threshold)

    def evaluate(self, dataset, logits):
        decoding = self.decode(dataset, logits)
        golds = {ex.qid: [text for text, _ in ex.answers] for ex in dataset.examples}
        return self._suffix(squad_scores(decoding.predictions, golds), dataset.split), decoding

    def write_predictions(self, path, dataset, predictions, nbest_path: str | None = None,
                          null_odds_path: str | None = None):
        """`{qid: answer_text}` JSON, as the official evaluator reads it ("" = no answer); the n-best
        lists and (v2) null-score differences optionally go to their own JSON files."""
        decoding = predictions if isinstance(predictions, SquadDecoding) else None
        answers = decoding.predictions if decoding else dict(predictions)
        _dump(path, answers)
        if decoding and nbest_path:
            _dump(nbest_path, decoding.nbest)
        if decoding and null_odds_path:
            # No valid span gives an infinite difference; JSON has no Infinity, so cap it.
            _dump(null_odds_path, {q: min(d, 1e9) for q, d in decoding.null_score_diff.items()})


def split_qa_logits(logits) -> tuple[np.ndarray, np.ndarray]:
    """Accept (start, end), {"start_logits", "end_logits"} or a [N, s, 2] array."""
    if isinstance(logits, dict):
        return np.asarray(logits["start_logits"]), np.asarray(logits["end_logits"])
    if isinstance(logits, (tuple, list)) and len(logits) == 2:
        return np.asarray(logits[0]), np.asarray(logits[1])
    arr = np.asarray(logits)
    if arr.ndim == 3 and arr.shape[-1] == 2:
        return arr[..., 0], arr[..., 1]
    raise ValueError(f"QA logits must be (start, end) or [N, s, 2]; got shape {arr.shape}")


def _dump(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)


register_task("squad", SquadTask)
