"""GLUE readers (real TSV layouts), pair encoding, metrics through `evaluate`, prediction files."""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from task_fixtures import tokenizer, write  # noqa: E402,F401

from megatron_bert.tasks import TaskDataError, collate, get_task, list_tasks  # noqa: E402
from megatron_bert.tasks.common import truncate_longest_first  # noqa: E402
from megatron_bert.tasks.glue import SentenceExample  # noqa: E402

MNLI_TRAIN_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                     "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tgold_label\n")
MNLI_DEV_HEADER = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
                   "sentence1_parse\tsentence2_parse\tsentence1\tsentence2\tlabel1\tlabel2\tlabel3\tlabel4\t"
                   "label5\tgold_label\n")


def mnli_row(i, s1, s2, label, n_votes=1):
    return "\t".join([str(i), "1", "1e", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", s1, s2]
                     + [label] * n_votes + [label]) + "\n"


def test_registry():
    assert {"glue", "ner", "squad", "race", "mnli", "cola", "stsb"} <= set(list_tasks())
    assert get_task("mnli").name == get_task("glue/mnli").name == get_task("glue", dataset="MNLI").name
    assert get_task("stsb").problem_type == "regression" and get_task("stsb").num_labels == 1
    assert get_task("qnli").label_names == ["entailment", "not_entailment"]
    assert get_task("ner").head_type == "token_classification"
    assert get_task("squad").label_fields == ("start_positions", "end_positions")
    assert get_task("race").head_type == "multiple_choice" and get_task("race").num_labels == 4
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


def test_mnli_files_labels_and_split_metrics(tmp_path, tokenizer):
    write(tmp_path, "train.tsv", MNLI_TRAIN_HEADER + mnli_row(0, "the cat sat", "a cat sat", "entailment")
          + mnli_row(1, "he ran \"fast", "he was slow", "contradiction"))   # unbalanced quote is just text
    write(tmp_path, "dev_matched.tsv", MNLI_DEV_HEADER + mnli_row(0, "a dog", "the dog", "neutral", 5)
          + mnli_row(1, "a dog", "no dog", "contradiction", 5))
    write(tmp_path, "dev_mismatched.tsv", MNLI_DEV_HEADER + mnli_row(0, "a", "b", "entailment", 5))
    spec = get_task("mnli")
    files = spec.data_files(str(tmp_path))
    assert set(files) == {"train", "matched", "mismatched"} and spec.eval_splits == ("matched", "mismatched")
    assert spec.label_names == ["contradiction", "entailment", "neutral"]
    train = spec.load_dataset(files["train"], tokenizer, 16, split="train")
    assert [e.text_b for e in train.examples] == ["a cat sat", "he was slow"]
    assert train.examples[1].text_a == 'he ran "fast'
    assert train.arrays["labels"].tolist() == [1, 0]
    batch = collate([train[0], train[1]])   # what a DataLoader would hand the model
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.int64
    assert batch["labels"].tolist() == [1, 0] and batch["sample_id"].tolist() == [0, 1]
    dev = spec.load_dataset(files["matched"], tokenizer, 16, split="matched")
    metrics, preds = spec.evaluate(dev, np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))
    assert metrics == {"accuracy_matched": 0.5}  # neutral right, contradiction predicted as entailment
    assert preds.tolist() == [2, 1]


def test_pair_encoding_and_longest_first(tokenizer):
    assert truncate_longest_first([1] * 10, [2] * 3, 8) == ([1] * 5, [2] * 3)
    assert truncate_longest_first([1] * 3, [2] * 10, 8) == ([1] * 3, [2] * 5)
    assert truncate_longest_first([1] * 5, [2] * 5, 7) == ([1] * 4, [2] * 3)  # tie: b loses first
    spec = get_task("rte")
    a, b = tokenizer.encode("the cat sat on the mat"), tokenizer.encode("dog")
    ds = spec.featurize([SentenceExample("x", "the cat sat on the mat", "dog", "entailment")], tokenizer, 7)
    item = ds[0]
    c, s, p = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    assert item["input_ids"].tolist() == [c, a[0], a[1], a[2], s, b[0], s]  # a trimmed 6 -> 3
    assert item["token_type_ids"].tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert item["attention_mask"].tolist() == [1] * 7
    assert item["input_ids"].dtype == np.int64 and item["labels"].dtype == np.int64
    assert item["labels"] == 0 and item["sample_id"] == 0
    ds = spec.featurize([SentenceExample("x", "cat", "dog", "not_entailment")], tokenizer, 8)
    assert ds[0]["input_ids"].tolist() == [c, a[1], s, b[0], s, p, p, p]
    assert ds[0]["attention_mask"].tolist() == [1] * 5 + [0] * 3


def test_cola_headerless_and_test_file(tmp_path, tokenizer):
    path = write(tmp_path, "train.tsv", "gj04\t1\t\tthe cat sat.\ngj04\t0\t*\tcat the sat.\n")
    spec = get_task("cola")
    ds = spec.load_dataset(path, tokenizer, 12)
    assert [e.text_a for e in ds.examples] == ["the cat sat.", "cat the sat."]
    assert ds.arrays["labels"].tolist() == [1, 0] and ds.has_labels
    # GLUE test files have a header and no label column: unlabeled, no metrics, still predictable
    test = spec.load_dataset(write(tmp_path, "test.tsv", "index\tsentence\n0\tthe dog ran.\n"), tokenizer, 12, "test")
    assert not test.has_labels and test[0]["labels"] == -100
    metrics, preds = spec.evaluate(test, np.array([[0.2, 0.1]]))
    assert metrics == {} and preds.tolist() == [0]


@pytest.mark.parametrize("task, header, row, text_a, text_b, label", [
    ("sst2", "sentence\tlabel", "loved it \t1", "loved it ", None, 1),
    ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "1\t7\t8\the ran\the was fast", "he ran", "he was fast", 1),
    ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate", "5\t1\t2\twho?\twhat?\t0", "who?", "what?", 0),
    ("qnli", "index\tquestion\tsentence\tlabel", "0\twhere?\tin paris.\tnot_entailment", "where?", "in paris.", 1),
    ("rte", "index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "a", "b", 0),
    ("wnli", "index\tsentence1\tsentence2\tlabel", "0\ta\tb\t1", "a", "b", 1),
])
def test_glue_layouts(tmp_path, tokenizer, task, header, row, text_a, text_b, label):
    ds = get_task(task).load_dataset(write(tmp_path, "dev.tsv", f"{header}\n{row}\n"), tokenizer, 16)
    ex = ds.examples[0]
    assert (ex.text_a, ex.text_b, int(ds.arrays["labels"][0])) == (text_a, text_b, label)


def test_stsb_regression(tmp_path, tokenizer):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = "".join(f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tthe cat\ta cat\t{y}\n" for i, y in enumerate([5.0, 1.2, 3.0]))
    spec = get_task("stsb")
    ds = spec.load_dataset(write(tmp_path, "dev.tsv", header + rows), tokenizer, 16)
    assert ds[1]["labels"].dtype == np.float32 and ds[1]["labels"] == pytest.approx(1.2)
    # predictions rank like the labels (Spearman 1) but are not linear in them
    metrics, preds = spec.evaluate(ds, np.array([[10.0], [0.0], [1.0]]))
    assert metrics["spearman"] == pytest.approx(1.0) and metrics["pearson"] < 1.0
    bad = write(tmp_path, "bad.tsv", header + rows + "3\tmain\tf\t2012\t3\tnone\tnone\ta\tb\thigh\n")
    with pytest.raises(TaskDataError, match=r"bad\.tsv:5: label 'high' is not a number"):
        spec.load_examples(bad)


def test_binary_metrics_through_evaluate(tmp_path, tokenizer):
    header = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    rows = "".join(f"{y}\t1\t2\ta\tb\n" for y in [1, 1, 1, 0, 0])
    spec = get_task("mrpc")
    ds = spec.load_dataset(write(tmp_path, "dev.tsv", header + rows), tokenizer, 8)
    logits = np.eye(2)[[1, 0, 1, 1, 0]]   # same case as the hand-computed metrics test
    metrics, _ = spec.evaluate(ds, logits)
    assert metrics == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    cola = get_task("cola")
    ds = cola.load_dataset(write(tmp_path, "c.tsv", "".join(f"s\t{y}\t\tx\n" for y in [1, 1, 1, 0, 0])), tokenizer, 8)
    assert cola.evaluate(ds, logits)[0]["mcc"] == pytest.approx(1 / 6)


@pytest.mark.parametrize("task, text, message", [
    ("mrpc", "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n1\t1\t2\ta\n",
     r"x\.tsv:3: expected 5 tab-separated columns, found 4"),
    ("qqp", "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n1\t1\t2\ta\tb\t2\n", r"x\.tsv:2: unknown label '2'"),
    ("mnli", MNLI_TRAIN_HEADER + mnli_row(0, "a", "b", "maybe"), r"x\.tsv:2: unknown label 'maybe'.*contradiction"),
    ("sst2", "text\tlabel\nfoo\t1\n", r"x\.tsv:1: expected a header row"),
    ("cola", "gj04\t1\t\ta\ngj04\t1\ta\n", r"x\.tsv:2: expected 4 tab-separated columns, found 3"),
])
def test_glue_malformed(tmp_path, task, text, message):
    with pytest.raises(TaskDataError, match=message) as e:
        get_task(task).load_examples(write(tmp_path, "x.tsv", text))
    assert "\n" not in str(e.value) and "; " in str(e.value)  # one line, with a fix


def test_generic_tsv_and_jsonl(tmp_path, tokenizer):
    spec = get_task("glue")  # generic: label set inferred (sorted) from the first labelled file
    train = spec.load_dataset(write(tmp_path, "train.tsv", "good movie\tpos\nbad film\tneg\nfine\tpos\n"), tokenizer, 8)
    assert spec.label_names == ["neg", "pos"] and spec.num_labels == 2
    assert train.arrays["labels"].tolist() == [1, 0, 1] and train.examples[0].text_b is None
    pairs = spec.load_dataset(write(tmp_path, "dev.tsv", "text\ttext_b\tlabel\na\tb\tneg\n"), tokenizer, 8)
    assert pairs.examples[0].text_b == "b" and pairs[0]["token_type_ids"].tolist()[:5] == [0, 0, 0, 1, 1]
    jsonl = write(tmp_path, "dev.jsonl", '{"text": "a", "text_b": "b", "label": "pos", "id": "r1"}\n\n'
                  '{"text": "c", "label": "neg"}\n')
    ds = spec.load_dataset(jsonl, tokenizer, 8)
    assert [e.guid for e in ds.examples] == ["r1", "dev.jsonl:3"] and ds.arrays["labels"].tolist() == [1, 0]
    with pytest.raises(TaskDataError, match=r"bad\.jsonl:2: invalid JSON"):
        spec.load_examples(write(tmp_path, "bad.jsonl", '{"text": "a", "label": "pos"}\n{"text": \n'))
    with pytest.raises(TaskDataError, match=r"bad2\.jsonl:1: missing string key 'text'"):
        spec.load_examples(write(tmp_path, "bad2.jsonl", '{"sentence": "a", "label": "pos"}\n'))
    with pytest.raises(TaskDataError, match=r"unknown label 'meh'"):
        spec.load_examples(write(tmp_path, "bad3.tsv", "a\tmeh\n"))
    with pytest.raises(TaskDataError, match=r"bad4\.tsv:2: expected 2 tab-separated columns, found 3"):
        spec.load_examples(write(tmp_path, "bad4.tsv", "a\tpos\na\tb\tpos\n"))
    reg = get_task("glue", regression=True)
    assert reg.load_dataset(write(tmp_path, "r.tsv", "a\t0.5\n"), tokenizer, 8)[0]["labels"] == pytest.approx(0.5)


def test_write_predictions(tmp_path, tokenizer):
    spec = get_task("glue", labels=["neg", "pos"])
    ds = spec.load_dataset(write(tmp_path, "d.tsv", "a\tpos\nb\tneg\n"), tokenizer, 8)
    _, preds = spec.evaluate(ds, np.array([[0.0, 1.0], [0.0, 1.0]]))
    out = tmp_path / "out" / "pred.jsonl"
    spec.write_predictions(str(out), ds, preds)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"id": "d.tsv:1", "prediction": "pos", "label": "pos"},
                    {"id": "d.tsv:2", "prediction": "pos", "label": "neg"}]
