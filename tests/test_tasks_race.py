"""RACE reader (directory of .txt files, JSON list, JSON lines), feature shapes, label mapping, errors."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from task_fixtures import tokenizer, write  # noqa: E402,F401

from megatron_bert.tasks import TaskDataError, get_task  # noqa: E402
from megatron_bert.tasks.race import question_with_option  # noqa: E402

ART1 = {"id": "high1.txt", "article": "the cat sat on the mat . the dog ran fast .",
        "questions": ["who sat ?", "the dog ran _ ."], "options": [["cat", "dog", "he", "she"], ["slow", "fast", "big", "small"]],
        "answers": ["A", "B"]}
ART2 = {"article": "paris is the capital of france .", "questions": ["what is paris ?"],
        "options": [["a dog", "a river", "a cat", "a city"]], "answers": ["d"]}


def test_directory_reader_features_and_labels(tmp_path, tokenizer):
    write(tmp_path, "train/high/1.txt", json.dumps(ART1))
    write(tmp_path, "train/middle/2.txt", json.dumps(ART2))
    write(tmp_path, "train/README.md", "ignored")
    write(tmp_path, "dev/high/3.txt", json.dumps(ART2))
    spec = get_task("race")
    files = spec.data_files(str(tmp_path))
    assert files == {"train": str(tmp_path / "train"), "valid": str(tmp_path / "dev")}
    ds = spec.load_dataset(files["train"], tokenizer, 16)
    assert [e.guid for e in ds.examples] == ["high1.txt:0", "high1.txt:1", "2:0"]
    assert ds.arrays["input_ids"].shape == (3, 4, 16)
    item = ds[1]
    assert item["input_ids"].shape == (4, 16) and item["input_ids"].dtype == np.int64
    assert item["labels"] == 1 and ds.arrays["labels"].tolist() == [0, 1, 3]   # A, B, d
    # choice 1 of question 1: [CLS] article [SEP] the dog ran fast . [SEP], the 12-token article
    # trimmed to 16 - 3 - 5 = 8 tokens (longest first)
    qa_ids = tokenizer.encode("the dog ran fast .")
    ids = item["input_ids"][1].tolist()
    n = int(item["attention_mask"][1].sum())
    assert ids[0] == tokenizer.cls_id and ids[n - 1] == tokenizer.sep_id
    assert ids[n - 1 - len(qa_ids):n - 1] == qa_ids and ids[n - 2 - len(qa_ids)] == tokenizer.sep_id
    art = tokenizer.encode(ART1["article"])
    assert n == 16 and ids[1:n - 2 - len(qa_ids)] == art[:8]
    assert item["token_type_ids"][1].tolist()[:n] == [0] * (n - 1 - len(qa_ids)) + [1] * (len(qa_ids) + 1)
    # the four choices differ only in the option
    assert len({tuple(row) for row in item["input_ids"].tolist()}) == 4


def test_question_with_option():
    assert question_with_option("the dog ran _ .", "fast") == "the dog ran  fast  ."
    assert question_with_option("who sat ?", "cat") == "who sat ? cat"


def test_json_list_jsonl_and_metrics(tmp_path, tokenizer):
    spec = get_task("race")
    ds = spec.load_dataset(write(tmp_path, "dev.json", json.dumps([ART1, ART2])), tokenizer, 32)
    assert len(ds) == 3 and ds.examples[2].guid == "dev-1:0"
    jl = spec.load_dataset(write(tmp_path, "dev.jsonl", json.dumps(ART1) + "\n\n" + json.dumps(ART2) + "\n"), tokenizer, 32)
    assert [e.label for e in jl.examples] == [0, 1, 3] and jl.examples[2].guid == "dev-3:0"
    logits = np.array([[5.0, 0, 0, 0], [0, 0, 3.0, 0], [0, 0, 0, 1.0]])   # 2 of 3 right
    metrics, preds = spec.evaluate(ds, logits)
    assert metrics == {"accuracy": pytest.approx(2 / 3)} and preds.tolist() == [0, 2, 3]
    spec.write_predictions(str(tmp_path / "p.jsonl"), ds, preds)
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert rows[1] == {"id": "high1.txt:1", "prediction": "C", "label": "B"}


@pytest.mark.parametrize("article, message", [
    ({**ART2, "options": [["a", "b", "c"]]}, r"x\.txt question 0: 3 options, expected 4"),
    ({**ART2, "answers": ["E"]}, r"x\.txt question 0: unknown answer 'E'.*A, B, C, D"),
    ({k: v for k, v in ART2.items() if k != "article"}, r"x\.txt: missing key 'article'"),
    ({**ART2, "answers": ["A", "B"]}, r"x\.txt: 1 questions but 1 option lists and 2 answers"),
])
def test_errors(tmp_path, article, message):
    with pytest.raises(TaskDataError, match=message) as e:
        get_task("race").load_examples(write(tmp_path, "x.txt", json.dumps(article)))
    assert "\n" not in str(e.value)


def test_invalid_json_line_numbers(tmp_path):
    with pytest.raises(TaskDataError, match=r"x\.txt:2: invalid JSON"):
        get_task("race").load_examples(write(tmp_path, "x.txt", '{\n "article": "a",,\n}'))
    with pytest.raises(TaskDataError, match=r"y\.jsonl:3: invalid JSON"):
        get_task("race").load_examples(write(tmp_path, "y.jsonl", json.dumps(ART2) + "\n" + json.dumps(ART2) + "\n{oops\n"))
