"""SQuAD: reader checks, exact-character decoding (whitespace / unicode), doc-stride windows,
best window across features, v2 null threshold, EM/F1 and the prediction file."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
from task_fixtures import tokenizer, write  # noqa: E402,F401

from megatron_bert.tasks import TaskDataError, get_task  # noqa: E402
from megatron_bert.tasks.squad import max_context_owner, window_starts  # noqa: E402

ODD = "The  café\tin Paris\n\nsells 北京 coffee 😀 daily. Ñandú  birds"


def squad_json(paragraphs, version="1.1"):
    return json.dumps({"version": version, "data": [{"title": "t", "paragraphs": paragraphs}]}, ensure_ascii=False)


def qa(qid, question, answers=(), impossible=None):
    out = {"id": qid, "question": question, "answers": [{"text": t, "answer_start": s} for t, s in answers]}
    if impossible is not None:
        out["is_impossible"] = impossible
    return out


def logits_at(ds, spans, other=0.0):
    """Start/end logits of `other` everywhere except `spans` = {feature: (start, end, value)}."""
    n, s = ds.arrays["input_ids"].shape
    start, end = np.full((n, s), other), np.full((n, s), other)
    for fi, (a, b, value) in spans.items():
        start[fi, a] = value
        end[fi, b] = value
    return start, end


def test_decoding_recovers_exact_original_characters(tmp_path, tokenizer):
    answers = ["café\tin Paris", "北京", "😀", "sells 北京 coffee 😀 daily", "Ñandú  birds", "The", "daily."]
    qas = [qa(f"q{i}", "what?", [(a, ODD.index(a))]) for i, a in enumerate(answers)]
    spec = get_task("squad")
    path = write(tmp_path, "train-v1.1.json", squad_json([{"context": ODD, "qas": qas}]))
    ds = spec.load_dataset(path, tokenizer, 64)
    assert len(ds) == len(answers)  # context fits one window
    # the labels point at the right tokens: "北京" is the two CJK tokens
    f1 = ds[1]
    assert tokenizer.convert_ids_to_tokens([f1["input_ids"][f1["start_positions"]], f1["input_ids"][f1["end_positions"]]]) == ["北", "京"]
    assert f1["token_type_ids"][f1["start_positions"]] == 1
    # logits at the labelled span, plus higher decoys on question tokens (position 1 = "what") and
    # an end before the start — none of which may win
    start, end = logits_at(ds, {i: (int(ds[i]["start_positions"]), int(ds[i]["end_positions"]), 10.0)
                                for i in range(len(ds))})
    start[:, 1] = end[:, 1] = 20.0
    end[:, int(ds[0]["start_positions"]) - 1] = 15.0
    metrics, decoding = spec.evaluate(ds, (start, end))
    for i, a in enumerate(answers):
        assert decoding.predictions[f"q{i}"] == a == ODD[ODD.index(a):ODD.index(a) + len(a)]
    assert metrics == {"exact_match": 100.0, "f1": 100.0}


def test_window_starts_and_max_context_by_hand():
    assert window_starts(10, 6, 2) == [0, 2, 4]
    assert window_starts(10, 6, 100) == [0, 6]    # stride capped at the window: no token skipped
    assert window_starts(0, 6, 2) == [0] and window_starts(6, 6, 2) == [0]
    # windows [0..5], [2..7], [4..9]; score = min(left, right) (+0.06, same length everywhere):
    # token 3: w0 min(3,2)=2, w1 min(1,4)=1 -> w0;  token 4: w0 1, w1 2, w2 0 -> w1;  token 6: w1 1, w2 2 -> w2
    assert max_context_owner(10, [0, 2, 4], 6).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]


LONG = " ".join(["the cat sat on the mat"] * 10) + " paris is the capital of france"


def test_doc_stride_windows_cover_context(tmp_path, tokenizer):
    spec = get_task("squad", doc_stride=10)
    start = LONG.index("france")
    path = write(tmp_path, "d.json", squad_json([{"context": LONG, "qas": [qa("q", "where?", [("france", start)])]}]))
    ds = spec.load_dataset(path, tokenizer, 32, split="valid")
    n_ctx = len(tokenizer.encode(LONG))
    assert n_ctx == 66
    # question "where ?" = 2 tokens -> 27 context tokens per window, starting 0, 10, 20, 30, 40
    assert [m.tok_start for m in ds.meta] == [0, 10, 20, 30, 40]
    covered = set()
    for i, m in enumerate(ds.meta):
        n_here = int((ds[i]["token_type_ids"] == 1).sum()) - 1   # context tokens (minus the final [SEP])
        assert n_here == len(m.max_context) <= 27
        covered.update(range(m.tok_start, m.tok_start + n_here))
        assert ds[i]["attention_mask"].sum() <= 32
    assert covered == set(range(n_ctx))
    # every token is "max context" in exactly one window
    assert sum(int(m.max_context.sum()) for m in ds.meta) == n_ctx
    # the answer (last token) is only inside the last window; the others point at CLS
    assert [int(ds[i]["start_positions"]) for i in range(len(ds))][:4] == [0, 0, 0, 0]
    assert ds[4]["start_positions"] > 0 and ds[4]["start_positions"] == ds[4]["end_positions"]


def test_best_window_wins(tmp_path, tokenizer):
    spec = get_task("squad", doc_stride=10)
    path = write(tmp_path, "d.json", squad_json([{"context": LONG, "qas": [
        qa("q", "where?", [("paris is the capital of france", LONG.index("paris"))])]}]))
    ds = spec.load_dataset(path, tokenizer, 32)
    last = len(ds) - 1
    gold = (int(ds[last]["start_positions"]), int(ds[last]["end_positions"]))
    # decoy in window 0: "cat sat" (context tokens 1..2 -> sequence positions 5..6)
    decoy = (ds.meta[0].ctx_pos + 1, ds.meta[0].ctx_pos + 2)
    for gold_value, decoy_value, expected in [(8.0, 5.0, "paris is the capital of france"), (5.0, 8.0, "cat sat")]:
        start, end = logits_at(ds, {last: (*gold, gold_value), 0: (*decoy, decoy_value)})
        decoding = spec.decode(ds, (start, end))
        assert decoding.predictions["q"] == expected
        assert decoding.nbest["q"][0]["text"] == expected and decoding.nbest["q"][0]["score"] == 2 * max(gold_value, decoy_value)
    # max_answer_length: the 6-token gold span is too long at 5 -> the decoy wins even when weaker
    spec_short = get_task("squad", doc_stride=10, max_answer_length=5)
    start, end = logits_at(ds, {last: (*gold, 8.0), 0: (*decoy, 5.0)})
    assert spec_short.decode(ds, (start, end)).predictions["q"] == "cat sat"


def test_start_only_from_max_context_window(tmp_path, tokenizer):
    # Windows start at tokens 0 and 10 (27 long). Token 15 sits 15/11 from window 0's edges and
    # 5/21 from window 1's, so only window 0 may start an answer there.
    spec = get_task("squad", doc_stride=10)
    path = write(tmp_path, "d.json", squad_json([{"context": LONG, "qas": [qa("q", "where?", [("france", LONG.index("france"))])]}]))
    ds = spec.load_dataset(path, tokenizer, 32)
    p0, p1 = ds.meta[0].ctx_pos + 15, ds.meta[1].ctx_pos + 5     # token 15 in both windows
    start, end = logits_at(ds, {0: (p0, p0 + 2, 8.0), 1: (p1, p1 + 1, 9.0)})
    # window 1's "on the" (score 18) is ignored; window 0's "on the mat" (16) wins
    assert spec.decode(ds, (start, end)).predictions["q"] == "on the mat"


def test_v2_null_threshold(tmp_path, tokenizer):
    context = "the cat sat on the mat"
    path = write(tmp_path, "dev-v2.0.json", squad_json([{"context": context, "qas": [
        qa("has", "who sat?", [("the cat", 0)], impossible=False),
        qa("none", "who ran?", [], impossible=True)]}], version="v2.0"))
    spec = get_task("squad")
    ds = spec.load_dataset(path, tokenizer, 24, split="valid")
    assert spec.version_2 is True
    assert ds[1]["start_positions"] == 0 and ds[1]["end_positions"] == 0   # unanswerable -> CLS
    pos = ds.meta[0].ctx_pos
    assert (int(ds[0]["start_positions"]), int(ds[0]["end_positions"])) == (pos, pos + 1)
    # both questions: span "the cat" scores 2.5 + 2.5 = 5, null (CLS) 3 + 3 = 6 -> diff 1
    start, end = logits_at(ds, {0: (pos, pos + 1, 2.5), 1: (pos, pos + 1, 2.5)})
    start[:, 0] = end[:, 0] = 3.0
    for threshold, answer in [(0.0, ""), (0.99, ""), (1.5, "the cat")]:
        spec.null_score_diff_threshold = threshold
        metrics, decoding = spec.evaluate(ds, (start, end))
        assert decoding.predictions == {"has": answer, "none": answer}
        assert decoding.null_score_diff["has"] == pytest.approx(1.0)
        # one of the two questions is right either way
        assert metrics["exact_match"] == 50.0 and metrics["has_ans_exact_match"] == (100.0 if answer else 0.0)
    # v1 decoding of the same logits always answers
    assert get_task("squad", version_2_with_negative=False).decode(ds, (start, end)).predictions["none"] == "the cat"


def test_v2_null_score_is_min_over_windows(tmp_path, tokenizer):
    spec = get_task("squad", version_2_with_negative=True, doc_stride=10)
    path = write(tmp_path, "d.json", squad_json([{"context": LONG, "qas": [qa("q", "where?", [("france", LONG.index("france"))])]}]))
    ds = spec.load_dataset(path, tokenizer, 32)
    last = len(ds) - 1
    start, end = logits_at(ds, {last: (int(ds[last]["start_positions"]), int(ds[last]["end_positions"]), 2.5)})
    start[:, 0] = end[:, 0] = 3.0        # null 6 > span 5 in every window ...
    assert spec.decode(ds, (start, end)).predictions["q"] == ""
    start[last, 0] = end[last, 0] = 1.0  # ... until one window is sure the answer is there: null = min = 2
    assert spec.decode(ds, (start, end)).predictions["q"] == "france"


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(answer_start=5),
     r"x\.json: example q1: answer 'cat' does not match the context at answer_start=5 .*set answer_start to 4"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0]["answers"][0].update(text="dog"),
     r"example q1: answer 'dog' does not match .*does not occur in the context"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].pop("question"), r"example q1: missing key 'question'"),
    (lambda d: d["data"][0]["paragraphs"][0].pop("context"), r"data\[0\]\.paragraphs\[0\]: missing key 'context'"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"].append(qa("q1", "again?", [("the", 0)])),
     r"example q1: duplicate question id"),
    (lambda d: d["data"][0]["paragraphs"][0]["qas"][0].update(answers=[]), r"example q1: answerable question without"),
])
def test_reader_errors(tmp_path, mutate, message):
    data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
        {"context": "the cat sat", "qas": [qa("q1", "who?", [("cat", 4)])]}]}]}
    mutate(data)
    with pytest.raises(TaskDataError, match=message) as e:
        get_task("squad").load_examples(write(tmp_path, "x.json", json.dumps(data)))
    assert "\n" not in str(e.value)


def test_invalid_json_names_line(tmp_path):
    with pytest.raises(TaskDataError, match=r"x\.json:3: invalid JSON"):
        get_task("squad").load_examples(write(tmp_path, "x.json", '{"data": [\n {"paragraphs": []},\n ]\n}'))


def test_write_predictions_and_files(tmp_path, tokenizer):
    write(tmp_path, "train-v1.1.json", squad_json([]))
    write(tmp_path, "dev-v1.1.json", squad_json([{"context": ODD, "qas": [qa("q", "what?", [("北京", ODD.index("北京"))])]}]))
    spec = get_task("squad")
    files = spec.data_files(str(tmp_path))
    assert files == {"train": str(tmp_path / "train-v1.1.json"), "valid": str(tmp_path / "dev-v1.1.json")}
    assert len(spec.load_dataset(files["train"], tokenizer, 32)) == 0
    ds = spec.load_dataset(files["valid"], tokenizer, 64)
    start, end = logits_at(ds, {0: (int(ds[0]["start_positions"]), int(ds[0]["end_positions"]), 9.0)})
    _, decoding = spec.evaluate(ds, np.stack([start, end], axis=-1))   # [N, s, 2] form works too
    spec.write_predictions(str(tmp_path / "out" / "predictions.json"), ds, decoding,
                           nbest_path=str(tmp_path / "out" / "nbest.json"))
    raw = (tmp_path / "out" / "predictions.json").read_text(encoding="utf-8")
    assert json.loads(raw) == {"q": "北京"} and "北京" in raw   # unescaped UTF-8, official-evaluator layout
    nbest = json.loads((tmp_path / "out" / "nbest.json").read_text(encoding="utf-8"))
    assert nbest["q"][0]["text"] == "北京" and abs(sum(e["probability"] for e in nbest["q"]) - 1) < 1e-9
