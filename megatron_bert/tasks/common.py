"""Shared pieces of the fine-tuning tasks: the input error, the task registry, the dataset
container the trainer iterates over, and the [CLS] a [SEP] b [SEP] encoding helpers.

Every task module (glue, ner, squad, race) subclasses `TaskSpec` and registers a factory with
`register_task`; the trainer only ever talks to the `TaskSpec` methods, so it needs no per-task code.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

# Fields every feature carries; the model heads take exactly these plus the task's label fields.
INPUT_FIELDS = ("input_ids", "token_type_ids", "attention_mask")
IGNORE_INDEX = -100  # label value the losses skip (same convention as pretraining `labels`)


class TaskDataError(ValueError):
    """A task input file is malformed. The message is one line: `<where>: <what>; <how to fix>`,
    where <where> is `file:line` or `file: example <id>`, so the CLI can print it as-is."""

    def __init__(self, where: str, problem: str | None = None, fix: str | None = None):
        # A single argument is taken as the whole message (also what unpickling passes back).
        text = where if problem is None else f"{where}: {problem}" + (f"; {fix}" if fix else "")
        # Quoted file content may contain newlines; escape them so the message stays one line.
        super().__init__(text.replace("\r", "\\r").replace("\n", "\\n"))


def snippet(text: str, limit: int = 60) -> str:
    """Short repr of a piece of file content for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


# --------------------------------------------------------------------------- file reading
def read_text_lines(path: str) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its newline).

    Splits on '\\n' only (not on lone '\\r' or unicode line separators as `str.splitlines` would),
    because GLUE/CoNLL text fields may contain those and a split there would shift every column.
    """
    if not os.path.isfile(path):
        raise TaskDataError(path, "file not found", "check the task's data directory / file option")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}", f"not valid UTF-8 ({e.reason})",
                                    "re-encode the file as UTF-8") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")  # byte-order mark written by some editors
            yield lineno, line.rstrip("\n").rstrip("\r")


def load_json(path: str) -> Any:
    """Parse a JSON file, turning syntax errors into a file:line TaskDataError."""
    if not os.path.isfile(path):
        raise TaskDataError(path, "file not found", "check the task's data directory / file option")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}:{e.lineno}", f"invalid JSON ({e.msg}, column {e.colno})",
                            "fix the JSON syntax (a JSON checker such as `python -m json.tool` shows it)") from None


def find_optional_file(data_dir: str, candidates: tuple[str, ...]) -> str | None:
    """First existing file among `candidates` inside `data_dir`, or None."""
    for name in candidates:
        path = os.path.join(data_dir, name)
        if os.path.exists(path):
            return path
    return None


def find_file(data_dir: str, candidates: tuple[str, ...], what: str) -> str:
    """First existing file among `candidates` inside `data_dir` (a TaskDataError when none exists)."""
    path = find_optional_file(data_dir, candidates)
    if path is not None:
        return path
    raise TaskDataError(data_dir, f"no {what} file found (looked for {', '.join(candidates)})",
                        "put the file there or point the task's data directory at the right folder")


def write_jsonl(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- encoding helpers
def truncate_longest_first(a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
    """Trim tokens off the end of the longer sequence until len(a)+len(b) <= budget.

    Equivalent to popping one token at a time from the longer side (from `b` on ties, as the
    original BERT recipe does), computed in O(1) so long RACE articles don't loop for thousands
    of steps: the shorter side survives whole if it fits in half, otherwise both meet in the middle.
    """
    if len(a) + len(b) <= budget:
        return a, b
    short = min(len(a), len(b))
    if 2 * short >= budget:
        return a[: (budget + 1) // 2], b[: budget // 2]
    if len(a) <= len(b):
        return a, b[: budget - len(a)]
    return a[: budget - len(b)], b


def encode_pair(tokenizer, ids_a: list[int], ids_b: list[int] | None, max_seq_length: int
                ) -> dict[str, np.ndarray]:
    """`[CLS] a [SEP]` or `[CLS] a [SEP] b [SEP]` padded to `max_seq_length` (longest-first truncation)."""
    if ids_b is None:
        ids_a = ids_a[: max_seq_length - 2]
        tokens = [tokenizer.cls_id, *ids_a, tokenizer.sep_id]
        types = [0] * len(tokens)
    else:
        ids_a, ids_b = truncate_longest_first(ids_a, ids_b, max_seq_length - 3)
        tokens = [tokenizer.cls_id, *ids_a, tokenizer.sep_id, *ids_b, tokenizer.sep_id]
        types = [0] * (len(ids_a) + 2) + [1] * (len(ids_b) + 1)
    return pad_features(tokens, types, max_seq_length, tokenizer.pad_id)


def pad_features(tokens: list[int], types: list[int], max_seq_length: int, pad_id: int
                 ) -> dict[str, np.ndarray]:
    n = len(tokens)
    if n > max_seq_length:
        raise ValueError(f"{n} tokens exceed max_seq_length={max_seq_length}")
    input_ids = np.full(max_seq_length, pad_id, dtype=np.int64)
    input_ids[:n] = tokens
    token_type_ids = np.zeros(max_seq_length, dtype=np.int64)
    token_type_ids[:n] = types
    attention_mask = np.zeros(max_seq_length, dtype=np.int64)
    attention_mask[:n] = 1
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


def check_max_seq_length(max_seq_length: int, minimum: int = 4) -> None:
    if max_seq_length < minimum:
        raise ValueError(f"max_seq_length={max_seq_length} is too small; use at least {minimum}")


# --------------------------------------------------------------------------- dataset container
@dataclass
class TaskDataset:
    """Featurized split. `ds[i]` is one model sample: dict of numpy arrays (int64, or float32 for a
    regression `labels`) holding INPUT_FIELDS + the task's label fields + `sample_id` (= i, the
    global sample index keyed dropout needs, as in pretraining).

    `examples` are the parsed file records; `feature_to_example[i]` says which example feature i
    came from (SQuAD windows / long NER sentences give several features per example);
    `meta` holds whatever per-feature data the task needs to map logits back (offsets, word ids).
    """

    task: str
    split: str
    path: str
    examples: list
    arrays: dict[str, np.ndarray]
    feature_to_example: np.ndarray
    meta: list = field(default_factory=list)
    has_labels: bool = True

    def __len__(self) -> int:
        return len(self.feature_to_example)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        # Arrays are stored compactly (int32); models and losses expect int64.
        out = {k: np.array(v[i], dtype=np.int64 if v.dtype.kind in "iu" else v.dtype)
               for k, v in self.arrays.items()}
        out["sample_id"] = np.asarray(i, dtype=np.int64)
        return out


def stack_features(features: list[dict[str, np.ndarray]], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Stack per-feature dicts into [N, ...] arrays; integer fields are kept as int32 to halve the
    memory of large splits (MNLI/QQP), `TaskDataset.__getitem__` widens them back to int64."""
    out = {}
    for name in fields:
        values = [f[name] for f in features]
        arr = np.stack(values) if values else np.zeros((0,), dtype=np.int64)
        out[name] = arr.astype(np.int32) if arr.dtype.kind in "iu" else arr.astype(np.float32)
    return out


def collate(samples: list[dict[str, np.ndarray]]):
    """List of `ds[i]` dicts -> dict of stacked torch tensors (int64 / float32), as the trainer batches them."""
    from ..data.loader import collate as _collate

    return _collate(samples)


# --------------------------------------------------------------------------- task spec + registry
HEAD_TYPES = ("sequence_classification", "token_classification", "question_answering", "multiple_choice")


class TaskSpec:
    """What the trainer needs to know about a fine-tuning task.

    Attributes: `name`, `head_type` (one of HEAD_TYPES), `num_labels`, `problem_type`
    ("single_label_classification" | "regression" | "token_classification" |
    "question_answering" | "multiple_choice"), `label_names` (None for regression/QA),
    `label_fields` (feature keys holding targets), `eval_splits` (split names evaluated in
    training; their files come from `data_files`).
    """

    name: str = ""
    head_type: str = ""
    problem_type: str = ""
    label_fields: tuple[str, ...] = ("labels",)
    eval_splits: tuple[str, ...] = ("valid",)
    input_fields = INPUT_FIELDS

    @property
    def num_labels(self) -> int:
        raise NotImplementedError

    @property
    def label_names(self) -> list[str] | None:
        return None

    def data_files(self, data_dir: str) -> dict[str, str]:
        """{split: path} for the files present in `data_dir`: "train", each of `eval_splits`, and
        test split(s) when present. A missing train or eval file raises TaskDataError."""
        raise NotImplementedError

    def load_examples(self, path: str) -> list:
        raise NotImplementedError

    def featurize(self, examples: list, tokenizer, max_seq_length: int, split: str = "train",
                  path: str = "") -> TaskDataset:
        raise NotImplementedError

    def load_dataset(self, path: str, tokenizer, max_seq_length: int, split: str = "train") -> TaskDataset:
        """Read `path` and featurize it. Load the train split first: tasks whose label set is
        inferred (NER, generic GLUE) fix `label_names`/`num_labels` from it."""
        return self.featurize(self.load_examples(path), tokenizer, max_seq_length, split=split, path=path)

    def evaluate(self, dataset: TaskDataset, logits) -> tuple[dict[str, float], Any]:
        """(metrics, predictions) from the logits of every feature of `dataset`, in dataset order.
        Metrics are {} when the split has no labels. Metric keys get a `_<split>` suffix for
        splits other than "valid" (e.g. MNLI `accuracy_matched`), so several eval splits can be
        logged on one line."""
        raise NotImplementedError

    def compute_metrics(self, dataset: TaskDataset, logits) -> dict[str, float]:
        return self.evaluate(dataset, logits)[0]

    def write_predictions(self, path: str, dataset: TaskDataset, predictions) -> None:
        raise NotImplementedError

    def _suffix(self, metrics: dict[str, float], split: str) -> dict[str, float]:
        if split in ("valid", "train", ""):
            return metrics
        return {f"{k}_{split}": v for k, v in metrics.items()}


_REGISTRY: dict[str, Callable[..., TaskSpec]] = {}


def register_task(name: str, factory: Callable[..., TaskSpec]) -> None:
    _REGISTRY[name.lower()] = factory


def list_tasks() -> list[str]:
    return sorted(_REGISTRY)


def get_task(name: str, **options) -> TaskSpec:
    """Build the TaskSpec for `name` ("glue", "mnli", "glue/mnli", "ner", "squad", "race", ...).
    `options` are the task's settings (e.g. dataset="mnli", doc_stride=128, labels=[...])."""
    key = name.lower()
    if "/" in key:  # "glue/mnli" == get_task("glue", dataset="mnli")
        key, options["dataset"] = key.split("/", 1)
    if key not in _REGISTRY:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(list_tasks())}")
    return _REGISTRY[key](**options)
