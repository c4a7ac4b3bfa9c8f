"""Metrics against values worked out by hand (the arithmetic is in the comments)."""
import math

import numpy as np
import pytest

from megatron_bert.tasks import metrics as M


def test_accuracy_f1_mcc_binary():
    preds = [1, 0, 1, 1, 0]
    labels = [1, 1, 1, 0, 0]
    # right at 0, 2, 4 -> 3/5
    assert M.accuracy(preds, labels) == pytest.approx(0.6)
    # tp = {0, 2} = 2, fp = {3} = 1, fn = {1} = 1 -> P = R = 2/3 -> F1 = 2/3
    assert M.f1_binary(preds, labels) == pytest.approx(2 / 3)
    # tn = {4} = 1: (tp*tn - fp*fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (2-1)/sqrt(3*3*2*2) = 1/6
    assert M.matthews_corrcoef(preds, labels) == pytest.approx(1 / 6)


def test_f1_edge_cases():
    assert M.f1_binary([0, 0], [0, 0]) == 0.0           # no positives anywhere
    assert M.f1_binary([1, 1], [1, 1]) == pytest.approx(1.0)
    # Positive class 0 instead: tp = {1}, fp = {0}, fn = {} -> P = 1/2, R = 1 -> F1 = 2/3
    assert M.f1_binary([0, 0], [1, 0], positive=0) == pytest.approx(2 / 3)


def test_mcc_multiclass_and_degenerate():
    # Confusion (true x pred): t0p0 = 2, t1p2 = 1, t2p2 = 1; n = 4, trace = 3,
    # pred counts [2, 0, 2], true counts [2, 1, 1]:
    # (3*4 - (4 + 0 + 2)) / sqrt((16 - 8) * (16 - 6)) = 6 / sqrt(80)
    assert M.matthews_corrcoef([0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(6 / math.sqrt(80))
    assert M.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0   # constant prediction: undefined -> 0
    assert M.matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_pearson_by_hand():
    # x - 2.5 = [-1.5, -.5, .5, 1.5], y - 5 = [-3, -1, 0, 4]; sum xy = 11, sum xx = 5, sum yy = 26
    assert M.pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(5 * 26))
    assert M.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_average_ranks_and_spearman_with_ties():
    # sorted: 10 10 20 20 20 30 -> ranks 10: (1+2)/2, 20: (3+4+5)/3, 30: 6
    np.testing.assert_allclose(M.average_ranks([10, 20, 10, 30, 20, 20]), [1.5, 4, 1.5, 6, 4, 4])
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5]
    # sum xy = 4.5, sum xx = 4.5, sum yy = 5 -> 4.5 / sqrt(22.5)
    assert M.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    # Monotone but non-linear: Spearman 1, Pearson not.
    assert M.spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)
    assert M.pearson([1, 2, 3, 4], [1, 8, 27, 1000]) < 0.9


@pytest.mark.parametrize("tags, expected", [
    (["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"], [("PER", 0, 1), ("LOC", 3, 3), ("ORG", 5, 6)]),
    # IOB1: I- starts an entity after O; B- only separates two adjacent same-type entities
    (["I-PER", "I-PER", "B-PER", "O", "I-LOC"], [("PER", 0, 1), ("PER", 2, 2), ("LOC", 4, 4)]),
    # IOBES
    (["S-LOC", "B-PER", "E-PER", "O"], [("LOC", 0, 0), ("PER", 1, 2)]),
    (["B-PER", "I-PER", "E-PER", "E-PER"], [("PER", 0, 2), ("PER", 3, 3)]),
    # type change inside a chunk splits it; B- after B- starts a new one
    (["B-PER", "I-LOC", "B-LOC", "B-LOC"], [("PER", 0, 0), ("LOC", 1, 1), ("LOC", 2, 2), ("LOC", 3, 3)]),
    (["O", "O"], []),
    (["B-MISC"], [("MISC", 0, 0)]),
])
def test_extract_entities(tags, expected):
    assert M.extract_entities(tags) == expected


def test_entity_scores_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC", "O", "B-ORG", "I-ORG"],
            ["I-PER", "I-PER", "B-PER", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-ORG", "O"],   # PER right; LOC->ORG type wrong; ORG span short
            ["I-PER", "I-PER", "I-PER", "O"]]                       # one PER(0,2) instead of PER(0,1)+PER(2,2)
    s = M.entity_scores(gold, pred)
    # gold entities 3 + 2 = 5, predicted 3 + 1 = 4, correct 1
    assert s["precision"] == pytest.approx(1 / 4)
    assert s["recall"] == pytest.approx(1 / 5)
    assert s["f1"] == pytest.approx(2 * 1 / (4 + 5))
    # per type: PER gold 3 pred 2 correct 1 -> 2/5; LOC gold 1 pred 0 -> 0; ORG gold 1 pred 2 -> 0
    assert s["f1_PER"] == pytest.approx(2 / 5)
    assert s["f1_LOC"] == 0.0 and s["f1_ORG"] == 0.0
    # word accuracy: sentence 1 differs at 3 and 6, sentence 2 at 2 -> 8/11
    assert s["accuracy"] == pytest.approx(8 / 11)
    perfect = M.entity_scores(gold, gold)
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == 1.0


@pytest.mark.parametrize("text, normalized", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("theory of anthems", "theory of anthems"),   # articles only as whole words
    ("  A.B.C\t\n", "abc"),                        # punctuation goes before article removal
    ("Café Ñandú", "café ñandú"),                  # no accent stripping
    ("the", ""),
])
def test_normalize_answer(text, normalized):
    assert M.normalize_answer(text) == normalized


def test_squad_em_f1_by_hand():
    assert M.exact_match("the Eiffel Tower", "Eiffel tower.") == 1.0
    # pred toks [cat, sat, on, mat] vs gold [cat, on, mat]: common 3 -> 2*3/(4+3)
    assert M.token_f1("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    assert M.token_f1("", "") == 1.0 and M.token_f1("x", "") == 0.0 and M.token_f1("", "x") == 0.0
    # repeated tokens count with multiplicity: pred [a1, b, b] vs gold [b]: common 1 -> 2/(3+1)
    assert M.token_f1("a1 b b", "b") == pytest.approx(0.5)

    preds = {"q1": "Eiffel tower", "q2": "cat sat", "q3": "", "q4": "something"}
    golds = {"q1": ["the Eiffel Tower", "Paris"], "q2": ["the cat sat on the mat", "cat"],
             "q3": [], "q4": [], "q5": ["missing prediction"]}
    s = M.squad_scores(preds, golds)
    # EM: 1, 0, 1, 0, 0 -> 40%.  F1: 1; max(2*2/6, 2*1/3) = 2/3; 1; 0; 0 -> (8/3)/5
    assert s["exact_match"] == pytest.approx(40.0)
    assert s["f1"] == pytest.approx(100 * (8 / 3) / 5)
    # answerable q1, q2, q5: EM 1/3, F1 (1 + 2/3) / 3; unanswerable q3, q4: 1/2 each
    assert s["has_ans_exact_match"] == pytest.approx(100 / 3)
    assert s["has_ans_f1"] == pytest.approx(100 * (5 / 3) / 3)
    assert s["no_ans_exact_match"] == pytest.approx(50.0) and s["no_ans_f1"] == pytest.approx(50.0)
    # v1-style input (all answerable) has no breakdown
    assert set(M.squad_scores({"q": "x"}, {"q": ["x"]})) == {"exact_match", "f1"}
