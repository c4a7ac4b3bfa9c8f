"""Masked-LM corruption of one sample (BERT recipe), vectorised with numpy.

Of the eligible (non-special) positions, round(masked_lm_prob * n) (at least 1, at most
`max_predictions`) are chosen; each chosen position becomes [MASK] with p=0.8, a random ordinary token
with p=0.1, and stays unchanged with p=0.1. Labels hold the original id there and -100 elsewhere.
With whole-word masking, whole words (a word-start token plus its continuation pieces) are chosen, in a
random order, skipping any word that would overshoot the budget (as the original BERT code does).

N-gram (span) masking, ``max_ngrams > 1``: each pick is a span of n consecutive units (words with
whole-word masking, else tokens) starting at a unit taken in random order, n drawn from
``ngram_distribution``: ``harmonic`` (p(n) ∝ 1/n, Megatron-LM's BERT default with max_ngrams=3) or
``geometric`` (p(n) ∝ 0.8^(n-1), SpanBERT's p=0.2, with max_ngrams=10), renormalised over the lengths that
fit. A span never crosses [SEP] or an earlier span and is shortened until it fits the budget; the
80/10/10 corruption is then drawn per token as for single tokens.
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100
NGRAM_DISTRIBUTIONS = ("harmonic", "geometric")


def ngram_length_table(max_ngrams: int, distribution: str = "harmonic") -> np.ndarray:
    """cdf[a - 1, :a] = cumulative p(n = 1..a) renormalised over n <= a, for spans that can be at most
    a units long (cdf[a - 1, a:] = 2, never reached by a uniform draw)."""
    if distribution not in NGRAM_DISTRIBUTIONS:
        raise ValueError(f"ngram_distribution={distribution!r} is not one of {', '.join(NGRAM_DISTRIBUTIONS)}")
    if int(max_ngrams) < 1:
        raise ValueError(f"max_ngrams={max_ngrams} must be >= 1")
    n = np.arange(1, int(max_ngrams) + 1, dtype=np.float64)
    p = 1.0 / n if distribution == "harmonic" else 0.8 ** (n - 1)
    cdf = np.full((n.size, n.size), 2.0)
    for a in range(1, n.size + 1):
        cdf[a - 1, :a] = np.cumsum(p[:a]) / p[:a].sum()
        cdf[a - 1, a - 1] = 1.0  # exactly: a uniform draw in [0, 1) never picks a span longer than a
    return cdf


def random_token_pool(vocab_size, special_ids):
    """Ids a '10% random token' may take: every id except the special ones ([CLS], [SEP], [PAD], ...)."""
    keep = np.ones(vocab_size, dtype=bool)
    keep[[i for i in special_ids if 0 <= i < vocab_size]] = False
    return np.nonzero(keep)[0].astype(np.int64)


def mask_tokens(tokens, eligible, rng, mask_id, random_pool, masked_lm_prob=0.15, max_predictions=None,
                word_start=None, ngram_cdf=None):
    """Return (input_ids, labels) for int64 `tokens`.

    eligible:   bool array, True where a prediction may be made (False on [CLS]/[SEP]/[PAD]).
    rng:        numpy Generator (the sample's own stream).
    word_start: optional bool array per position (tokenizer.word_start_mask[tokens]) -> whole-word masking.
    ngram_cdf:  optional :func:`ngram_length_table` with more than one length -> n-gram masking.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    input_ids = tokens.copy()
    labels = np.full_like(tokens, IGNORE_INDEX)
    cand = np.flatnonzero(eligible)
    if cand.size == 0 or masked_lm_prob <= 0:
        return input_ids, labels
    budget = max(1, int(round(cand.size * masked_lm_prob)))
    if max_predictions is not None:
        budget = min(budget, int(max_predictions))
    if budget <= 0:
        return input_ids, labels

    spans = ngram_cdf is not None and len(ngram_cdf) > 1
    if word_start is None and not spans:
        chosen = cand[rng.permutation(cand.size)[:budget]]
    else:
        # Units: whole words, or single tokens. A new word begins at a word-start piece or wherever
        # the candidates are not contiguous (e.g. the first token after [SEP] even if it is a '##'
        # continuation); a span of units stays within one contiguous run of candidates.
        breaks = np.ones(cand.size, dtype=bool)
        breaks[1:] = np.diff(cand) != 1
        starts = (np.ones(cand.size, dtype=bool) if word_start is None
                  else np.asarray(word_start, dtype=bool)[cand] | breaks)
        bounds = np.append(np.flatnonzero(starts), cand.size)  # unit u = cand[bounds[u]:bounds[u + 1]]
        picked = pick_spans(rng, bounds, breaks[bounds[:-1]], budget, ngram_cdf if spans else None)
        chosen = np.sort(np.concatenate([cand[bounds[w]:bounds[w + n]] for w, n in picked])) if picked else cand[:0]
    labels[chosen] = tokens[chosen]
    r = rng.random(chosen.size)
    input_ids[chosen[r < 0.8]] = mask_id
    rand_pos = chosen[(r >= 0.8) & (r < 0.9)]
    if rand_pos.size:
        input_ids[rand_pos] = random_pool[rng.integers(0, random_pool.size, rand_pos.size)]
    return input_ids, labels


def pick_spans(rng, bounds, run_start, budget, ngram_cdf=None):
    """[(first unit, number of units), ...] in the order picked. Units (``cand[bounds[u]:bounds[u + 1]]``)
    are visited in random order; from each not yet taken, a span of n units (1 without ``ngram_cdf``)
    that ends before the end of its contiguous run (``run_start`` marks each run's first unit) and before
    an earlier span, shortened until it fits the budget; one that cannot fit is skipped."""
    units = bounds.size - 1
    order = rng.permutation(units)
    if ngram_cdf is None:
        lengths = np.ones(units, dtype=np.int64)
    else:
        # Units left in each one's contiguous run, capped at max_ngrams: the longest span from there.
        run_id = np.cumsum(run_start) - 1
        run_end = np.append(np.flatnonzero(run_start)[1:], units)[run_id]
        room = np.minimum(run_end - np.arange(units), len(ngram_cdf))
        lengths = (rng.random(units)[:, None] >= ngram_cdf[room - 1]).sum(1) + 1
    taken = np.zeros(units, dtype=bool)
    picked, total = [], 0
    for w in order:
        if taken[w]:
            continue
        n = int(lengths[w])
        hit = np.flatnonzero(taken[w:w + n])
        if hit.size:  # stop before an earlier span
            n = int(hit[0])
        while n and bounds[w + n] - bounds[w] > budget - total:
            n -= 1
        if n == 0:
            continue
        taken[w:w + n] = True
        picked.append((int(w), n))
        total += bounds[w + n] - bounds[w]
        if total == budget:
            break
    return picked
