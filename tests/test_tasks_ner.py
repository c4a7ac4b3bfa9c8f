"""CoNLL reader, first-sub-token label alignment, word-level reconstruction, entity metrics."""
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from task_fixtures import tokenizer, write  # noqa: E402,F401

from megatron_bert.tasks import TaskDataError, get_task  # noqa: E402

CONLL = """-DOCSTART- -X- -X- O

John NNP B-NP B-PER
Berlinx NNP I-NP I-PER
played VBD B-VP O
in IN B-PP O
Berlin NNP B-NP B-LOC
. . O O

-DOCSTART- -X- -X- O
Acme NNP B-NP B-ORG
Corp NNP I-NP I-ORG


Mary NNP B-NP B-PER
"""


def test_reader_conll2003_layout(tmp_path):
    spec = get_task("ner")
    examples = spec.load_examples(write(tmp_path, "train.txt", CONLL))
    assert [e.words for e in examples] == [["John", "Berlinx", "played", "in", "Berlin", "."], ["Acme", "Corp"], ["Mary"]]
    assert examples[0].tags == ["B-PER", "I-PER", "O", "O", "B-LOC", "O"]
    assert [e.guid for e in examples] == ["train.txt:3", "train.txt:11", "train.txt:15"]
    # "O" first, then sorted: fixed by the train file
    assert spec.label_names == ["O", "B-LOC", "B-ORG", "B-PER", "I-ORG", "I-PER"] and spec.num_labels == 6


@pytest.mark.parametrize("text, message", [
    ("John B-PER\nSmith NNP I-PER\n", r"x\.txt:2: expected 2 whitespace-separated columns .* found 3"),
    ("John B-PER\nSmith PER\n", r"x\.txt:2: tag 'PER' is not O or B-/I-/E-/S-<TYPE>"),
    ("John B-PER\n\nParis B-GPE\n", r"x\.txt:3: unknown label 'B-GPE'"),
])
def test_reader_errors(tmp_path, text, message):
    spec = get_task("ner", labels=["O", "B-PER", "I-PER"])
    with pytest.raises(TaskDataError, match=message) as e:
        spec.load_examples(write(tmp_path, "x.txt", text))
    assert "\n" not in str(e.value)


def test_dev_label_outside_train_set(tmp_path):
    spec = get_task("ner")
    spec.load_examples(write(tmp_path, "train.txt", "John B-PER\nin O\n"))
    with pytest.raises(TaskDataError, match=r"dev\.txt:2: unknown label 'B-LOC' \(not in the training label set\)"):
        spec.load_examples(write(tmp_path, "dev.txt", "John B-PER\nBerlin B-LOC\n"))


def test_first_subtoken_alignment(tmp_path, tokenizer):
    spec = get_task("ner")
    ds = spec.load_dataset(write(tmp_path, "train.txt", CONLL), tokenizer, 16)
    item = ds[0]
    ids = item["input_ids"].tolist()
    # [CLS] john berlin ##x played in berlin . [SEP]
    assert tokenizer.convert_ids_to_tokens(ids[:9]) == ["[CLS]", "john", "berlin", "##x", "played", "in", "berlin",
                                                       ".", "[SEP]"]
    lab = spec.label_names.index
    expected = [-100, lab("B-PER"), lab("I-PER"), -100, lab("O"), lab("O"), lab("B-LOC"), lab("O")] + [-100] * 8
    assert item["labels"].tolist() == expected
    assert item["labels"].dtype == np.int64 and item["token_type_ids"].tolist() == [0] * 16
    assert item["attention_mask"].tolist() == [1] * 9 + [0] * 7


def fake_logits(ds, spec, tags_per_example, noise_label="B-ORG"):
    """Logits that put each word's tag on its first sub-token and a *different* tag everywhere else,
    so reconstruction that looked past the first sub-token would come out wrong."""
    n_labels = spec.num_labels
    logits = np.zeros((len(ds), ds.arrays["input_ids"].shape[1], n_labels))
    logits[:, :, spec.label_names.index(noise_label)] = 5.0
    for fi, (first, positions) in enumerate(ds.meta):
        tags = tags_per_example[ds.feature_to_example[fi]]
        for k, pos in enumerate(positions):
            logits[fi, pos, spec.label_names.index(tags[first + k])] = 10.0
    return logits


def test_word_reconstruction_and_metrics(tmp_path, tokenizer):
    spec = get_task("ner")
    ds = spec.load_dataset(write(tmp_path, "train.txt", CONLL), tokenizer, 16)
    gold = [ex.tags for ex in ds.examples]
    metrics, preds = spec.evaluate(ds, fake_logits(ds, spec, gold))
    assert preds == gold
    assert metrics["f1"] == 1.0 and metrics["precision"] == 1.0 and metrics["accuracy"] == 1.0
    # "Berlinx" predicted O instead of I-PER: PER shrinks to John only -> 3 of 4 entities right
    wrong = [list(t) for t in gold]
    wrong[0][1] = "O"
    metrics, preds = spec.evaluate(ds, fake_logits(ds, spec, wrong))
    assert preds[0][:2] == ["B-PER", "O"]
    assert metrics["precision"] == pytest.approx(3 / 4) and metrics["recall"] == pytest.approx(3 / 4)
    out = tmp_path / "pred.conll"
    spec.write_predictions(str(out), ds, preds)
    lines = out.read_text().split("\n")
    assert lines[:2] == ["John B-PER B-PER", "Berlinx I-PER O"] and lines[6] == ""


def test_long_sentence_split_into_features(tmp_path, tokenizer):
    words = ["John", "Johnsmith", "played", "in", "Berlin"] * 3   # Johnsmith = 6 word pieces
    tags = ["B-PER", "I-PER", "O", "O", "B-LOC"] * 3
    path = write(tmp_path, "t.txt", "".join(f"{w} {t}\n" for w, t in zip(words, tags)) + "\nMary B-PER\n")
    spec = get_task("ner")
    ds = spec.load_dataset(path, tokenizer, 10)  # 8 word pieces per feature
    assert len(ds) > 2 and ds.feature_to_example.tolist()[-1] == 1
    # every word of sentence 0 is labelled exactly once across its features
    n_labelled = sum(int((ds[i]["labels"] != -100).sum()) for i in range(len(ds)) if ds.feature_to_example[i] == 0)
    assert n_labelled == len(words)
    assert all(int(ds[i]["attention_mask"].sum()) <= 10 for i in range(len(ds)))
    _, preds = spec.evaluate(ds, fake_logits(ds, spec, [tags, ["B-PER"]], noise_label="I-PER"))
    assert preds == [tags, ["B-PER"]]


def test_unlabeled_file(tmp_path, tokenizer):
    spec = get_task("ner", labels=["O", "B-PER"])
    ds = spec.load_dataset(write(tmp_path, "test.txt", "John\nruns\n"), tokenizer, 8, split="test")
    assert not ds.has_labels and ds.examples[0].tags is None and (ds[0]["labels"] == -100).all()
    metrics, preds = spec.evaluate(ds, fake_logits(ds, spec, [["B-PER", "O"]], noise_label="O"))
    assert metrics == {} and preds == [["B-PER", "O"]]
