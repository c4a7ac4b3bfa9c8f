"""Masked-LM corruption of one sample (BERT recipe), vectorised with numpy.

Of the eligible (non-special) positions, round(masked_lm_prob * n) (at least 1, at most
`max_predictions`) are chosen; each chosen position becomes [MASK] with p=0.8, a random ordinary token
with p=0.1, and stays unchanged with p=0.1. Labels hold the original id there and -100 elsewhere.
With whole-word masking, whole words (a word-start token plus its continuation pieces) are chosen, in a
random order, skipping any word that would overshoot the budget (as the original BERT code does).
"""
from __future__ import annotations

import numpy as np

IGNORE_INDEX = -100


def random_token_pool(vocab_size, special_ids):
    """Ids a '10% random token' may take: every id except the special ones ([CLS], [SEP], [PAD], ...)."""
    keep = np.ones(vocab_size, dtype=bool)
    keep[[i for i in special_ids if 0 <= i < vocab_size]] = False
    return np.nonzero(keep)[0].astype(np.int64)


def mask_tokens(tokens, eligible, rng, mask_id, random_pool, masked_lm_prob=0.15, max_predictions=None,
                word_start=None):
    """Return (input_ids, labels) for int64 `tokens`.

    eligible:   bool array, True where a prediction may be made (False on [CLS]/[SEP]/[PAD]).
    rng:        numpy Generator (the sample's own stream).
    word_start: optional bool array per position (tokenizer.word_start_mask[tokens]) -> whole-word masking.
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

    if word_start is None:
        chosen = cand[rng.permutation(cand.size)[:budget]]
    else:
        # A new word begins at a word-start piece or wherever the candidates are not contiguous
        # (e.g. the first token after [SEP] even if it is a '##' continuation).
        starts = np.asarray(word_start, dtype=bool)[cand]
        starts[0] = True
        starts[1:] |= np.diff(cand) != 1
        bounds = np.append(np.flatnonzero(starts), cand.size)
        sizes = np.diff(bounds)
        picked, total = [], 0
        for w in rng.permutation(sizes.size):
            if total + sizes[w] > budget:
                continue
            picked.append(cand[bounds[w]:bounds[w + 1]])
            total += sizes[w]
            if total == budget:
                break
        chosen = np.sort(np.concatenate(picked)) if picked else cand[:0]

    labels[chosen] = tokens[chosen]
    r = rng.random(chosen.size)
    input_ids[chosen[r < 0.8]] = mask_id
    rand_pos = chosen[(r >= 0.8) & (r < 0.9)]
    if rand_pos.size:
        input_ids[rand_pos] = random_pool[rng.integers(0, random_pool.size, rand_pos.size)]
    return input_ids, labels
