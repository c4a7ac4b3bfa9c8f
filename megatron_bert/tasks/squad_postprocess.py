"""Turn SQuAD start/end logits back into answer text.

For every window (feature) of a question we take the `n_best_size` highest start logits among
the tokens whose best-centred window is this one and the `n_best_size` highest end logits among
the window's context tokens, keep the pairs with start <= end and at most `max_answer_length`
tokens, and score them start + end. The question's answer is the best pair over all its
windows, cut out of the original context with the tokens' character offsets.

SQuAD v2.0: the "no answer" score is start[CLS] + end[CLS]; the minimum over the windows is used
(the window that is most confident there *is* an answer in the context speaks for the question).
The question is left unanswered ("") when null - best_span > null_score_diff_threshold.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SquadDecoding:
    predictions: dict[str, str]        # qid -> answer text ("" = no answer)
    null_score_diff: dict[str, float]  # qid -> null score - best span score (inf when no valid span)
    nbest: dict[str, list[dict]]       # qid -> [{"text", "score", "probability", "start", "end"}], best first


def window_candidates(start_logits: np.ndarray, end_logits: np.ndarray, meta, n_best_size: int,
                      max_answer_length: int) -> list[tuple[float, int, int]]:
    """Valid spans of one window as (score, first context token, last context token); token
    indices are into the example's full context token list."""
    window = len(meta.max_context)
    if window == 0:
        return []
    positions = meta.ctx_pos + np.arange(window)
    start_ok = positions[meta.max_context]
    if len(start_ok) == 0:
        return []
    # Stable sorts keep the earlier position first on equal logits, so results are deterministic.
    top_start = start_ok[np.argsort(-start_logits[start_ok], kind="stable")[:n_best_size]]
    top_end = positions[np.argsort(-end_logits[positions], kind="stable")[:n_best_size]]
    s, e = top_start[:, None], top_end[None, :]
    valid = (e >= s) & (e - s < max_answer_length)
    scores = start_logits[s] + end_logits[e]
    shift = meta.tok_start - meta.ctx_pos  # sequence position -> context token index
    return [(float(scores[i, j]), int(top_start[i] + shift), int(top_end[j] + shift))
            for i, j in zip(*np.nonzero(valid))]


def decode_predictions(dataset, start_logits, end_logits, n_best_size: int = 20, max_answer_length: int = 30,
                       version_2: bool = False, null_score_diff_threshold: float = 0.0) -> SquadDecoding:
    start_logits = np.asarray(start_logits, dtype=np.float64)
    end_logits = np.asarray(end_logits, dtype=np.float64)
    if start_logits.shape != end_logits.shape or start_logits.shape[0] != len(dataset):
        raise ValueError(f"start/end logits {start_logits.shape}/{end_logits.shape} do not match "
                         f"{len(dataset)} features")
    by_example: dict[int, list[int]] = {}
    for fi, ei in enumerate(dataset.feature_to_example):
        by_example.setdefault(int(ei), []).append(fi)

    predictions, null_diff, nbest = {}, {}, {}
    for ei, ex in enumerate(dataset.examples):
        candidates, null_score = [], np.inf
        offsets = None
        for fi in by_example.get(ei, []):
            meta = dataset.meta[fi]
            offsets = meta.offsets
            null_score = min(null_score, start_logits[fi, 0] + end_logits[fi, 0])
            candidates += window_candidates(start_logits[fi], end_logits[fi], meta, n_best_size, max_answer_length)
        # Python's sort is stable: on equal scores the earlier window / higher start logit stays first.
        candidates.sort(key=lambda c: -c[0])
        entries, seen = [], set()
        for score, tok_s, tok_e in candidates:
            span = (int(offsets[tok_s, 0]), int(offsets[tok_e, 1]))
            if span in seen:  # the same characters reached from two windows
                continue
            seen.add(span)
            entries.append({"text": ex.context[span[0]:span[1]], "score": score, "start": span[0], "end": span[1]})
            if len(entries) == n_best_size:
                break
        best = entries[0] if entries else None
        diff = (null_score - best["score"]) if best is not None else np.inf
        if version_2:
            entries.append({"text": "", "score": float(null_score), "start": -1, "end": -1})
            entries.sort(key=lambda c: -c["score"])
            answer = "" if best is None or diff > null_score_diff_threshold else best["text"]
        else:
            answer = "" if best is None else best["text"]
        _add_probabilities(entries)
        predictions[ex.qid] = answer
        null_diff[ex.qid] = float(diff)
        nbest[ex.qid] = entries
    return SquadDecoding(predictions, null_diff, nbest)


def _add_probabilities(entries: list[dict]) -> None:
    """Softmax over the kept candidates' scores (a confidence for the n-best file, nothing more)."""
    if not entries:
        return
    scores = np.array([e["score"] for e in entries], dtype=np.float64)
    scores = np.exp(scores - scores.max())
    for e, p in zip(entries, scores / scores.sum()):
        e["probability"] = float(p)
