"""Evaluation metrics for the fine-tuning tasks, in plain numpy (no scipy/sklearn at run time).

Classification metrics return fractions in [0, 1]; the SQuAD scores return percentages (0-100)
because that is how the official evaluator and every published number report them.
Undefined correlations (a constant input) are reported as 0.0 rather than NaN so metrics.jsonl
stays valid JSON.
"""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np


# --------------------------------------------------------------------------- classification
def accuracy(preds, labels) -> float:
    preds, labels = np.asarray(preds), np.asarray(labels)
    if labels.size == 0:
        return 0.0
    return float(np.mean(preds == labels))


def f1_binary(preds, labels, positive: int = 1) -> float:
    """F1 of the positive class (GLUE MRPC/QQP report F1 of label 1)."""
    preds, labels = np.asarray(preds), np.asarray(labels)
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    return _f1(tp, tp + fp, tp + fn)


def _f1(correct: int, predicted: int, gold: int) -> float:
    # Written as 2c/(p+g), which equals 2PR/(P+R) and needs no special case when P or R is 0.
    return 2.0 * correct / (predicted + gold) if predicted + gold else 0.0


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (multi-class generalisation; equals the binary phi coefficient)."""
    preds, labels = np.asarray(preds).ravel(), np.asarray(labels).ravel()
    classes = np.union1d(preds, labels)
    p_idx = np.searchsorted(classes, preds)
    t_idx = np.searchsorted(classes, labels)
    k = len(classes)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (t_idx, p_idx), 1.0)
    n = conf.sum()
    correct = np.trace(conf)
    pred_counts, true_counts = conf.sum(axis=0), conf.sum(axis=1)
    cov_pt = correct * n - pred_counts @ true_counts
    cov_pp = n * n - pred_counts @ pred_counts
    cov_tt = n * n - true_counts @ true_counts
    if cov_pp == 0 or cov_tt == 0:
        return 0.0
    return float(cov_pt / np.sqrt(cov_pp * cov_tt))


def pearson(x, y) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc @ xc) * (yc @ yc))
    return float((xc @ yc) / denom) if denom > 0 else 0.0


def average_ranks(x) -> np.ndarray:
    """1-based ranks where tied values all get the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks_sorted = np.empty(len(x), dtype=np.float64)
    for s, e in zip(starts, ends):
        ranks_sorted[s:e] = (s + 1 + e) / 2.0  # mean of ranks s+1 .. e
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho = Pearson correlation of average ranks (correct with ties)."""
    return pearson(average_ranks(x), average_ranks(y))


# --------------------------------------------------------------------------- entity-level (NER)
def _split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare 'PER' is read as inside-of-PER."""
    if tag == "O" or tag == "":
        return "O", ""
    if len(tag) > 2 and tag[1] in "-_" and tag[0] in "BIESLU":
        prefix = tag[0]
        # BILOU spellings map onto BIOES: L(ast) = E, U(nit) = S.
        return {"L": "E", "U": "S"}.get(prefix, prefix), tag[2:]
    return "I", tag


def extract_entities(tags: list[str]) -> list[tuple[str, int, int]]:
    """Entities as (type, first, last) word indices (inclusive), tolerant of BIO, IOB1 and IOBES.

    A chunk starts at B/S, at an I/E whose type differs from the open chunk, or at an I/E right
    after a chunk was closed (E/S/O before it); it ends before O/B/S, before a type change, and
    after E/S. These are the counting rules of the CoNLL conlleval script, so ill-formed
    sequences (I-X after O, I-Y after B-X) are scored the same way published numbers are.
    """
    entities = []
    open_type, open_start = None, 0
    for i, tag in enumerate(tags):
        prefix, etype = _split_tag(tag)
        continues = open_type is not None and etype == open_type and prefix in ("I", "E")
        if not continues and open_type is not None:
            entities.append((open_type, open_start, i - 1))
            open_type = None
        if prefix == "O":
            continue
        if not continues:
            open_type, open_start = etype, i
        if prefix in ("E", "S"):
            entities.append((open_type, open_start, i))
            open_type = None
    if open_type is not None:
        entities.append((open_type, open_start, len(tags) - 1))
    return entities


def entity_scores(gold: list[list[str]], pred: list[list[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 over entities of all sentences (exact type and span match), plus
    per-type F1 (`f1_<TYPE>`) and word-level tag accuracy."""
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted")
    gold_set, pred_set = set(), set()
    words = right = 0
    for sid, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {sid}: {len(g)} gold tags but {len(p)} predicted")
        gold_set.update((sid, *e) for e in extract_entities(g))
        pred_set.update((sid, *e) for e in extract_entities(p))
        words += len(g)
        right += sum(a == b for a, b in zip(g, p))
    correct = gold_set & pred_set
    out = {
        "precision": len(correct) / len(pred_set) if pred_set else 0.0,
        "recall": len(correct) / len(gold_set) if gold_set else 0.0,
        "f1": _f1(len(correct), len(pred_set), len(gold_set)),
        "accuracy": right / words if words else 0.0,
    }
    for etype in sorted({e[1] for e in gold_set | pred_set}):
        c = sum(1 for e in correct if e[1] == etype)
        out[f"f1_{etype}"] = _f1(c, sum(1 for e in pred_set if e[1] == etype),
                                 sum(1 for e in gold_set if e[1] == etype))
    return out


# --------------------------------------------------------------------------- SQuAD EM / F1
_PUNCT = set(string.punctuation)  # ASCII punctuation only, as the official SQuAD scorer
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        # Unanswerable gold ("") only matches an empty prediction.
        return float(pred_toks == gold_toks)
    common = sum((Counter(pred_toks) & Counter(gold_toks)).values())
    return _f1(common, len(pred_toks), len(gold_toks))


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, float]:
    """Official-style SQuAD EM/F1 in percent: max over gold answers, averaged over questions.

    `golds[qid]` lists the gold answer texts; an empty list means unanswerable, scored against ""
    (as are answers that normalize to nothing, e.g. "The"). Questions missing from `predictions`
    count as wrong. When some questions are unanswerable (v2.0), `has_ans_*` and `no_ans_*` break
    the scores down as the v2.0 evaluator does.
    """
    if not golds:
        return {"exact_match": 0.0, "f1": 0.0}
    em, f1, answerable = {}, {}, {}
    for qid, answers in golds.items():
        answerable[qid] = bool(answers)
        answers = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions.get(qid)
        if pred is None:
            em[qid] = f1[qid] = 0.0
            continue
        em[qid] = max(exact_match(pred, a) for a in answers)
        f1[qid] = max(token_f1(pred, a) for a in answers)

    def mean(values):
        return 100.0 * sum(values) / len(values) if values else 0.0

    out = {"exact_match": mean(list(em.values())), "f1": mean(list(f1.values()))}
    has = [q for q in golds if answerable[q]]
    no = [q for q in golds if not answerable[q]]
    if no:
        out.update(has_ans_exact_match=mean([em[q] for q in has]), has_ans_f1=mean([f1[q] for q in has]),
                   no_ans_exact_match=mean([em[q] for q in no]), no_ans_f1=mean([f1[q] for q in no]))
    return out
