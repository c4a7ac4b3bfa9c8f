"""Batching by consumed_samples: DP layout, resume, prefetching loader."""
import types

import numpy as np
import pytest
import torch

from megatron_bert.data.dataset import build_pretraining_datasets
from megatron_bert.data.indexed import write_indexed_dataset
from megatron_bert.data.loader import PretrainingLoader, collate, micro_batch_sample_ids

SEQ = 32


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    rng = np.random.default_rng(0)
    docs = [[rng.integers(10, 500, int(rng.integers(3, 20))) for _ in range(int(rng.integers(2, 6)))]
            for _ in range(60)]
    prefix = write_indexed_dataset(tmp_path_factory.mktemp("ld") / "d", docs, vocab_size=500)
    tok = types.SimpleNamespace(vocab_size=500, pad_id=0, unk_id=1, cls_id=2, sep_id=3, mask_id=4,
                                word_start_mask=np.ones(500, bool))
    return build_pretraining_datasets(prefix, tok, SEQ, seed=3)[0]


def test_micro_batch_ids_layout():
    # G=8, micro=2, dp=2: rank r takes [c + 4r, c + 4r + 4) in micro-batches of 2
    assert micro_batch_sample_ids(16, 8, 2, 0, 2) == [[16, 17], [18, 19]]
    assert micro_batch_sample_ids(16, 8, 2, 1, 2) == [[20, 21], [22, 23]]
    assert micro_batch_sample_ids(0, 6, 3, 0, 1) == [[0, 1, 2], [3, 4, 5]]
    G = 12
    for step in range(5):
        c = step * G
        dp1 = [i for mb in micro_batch_sample_ids(c, G, 2, 0, 1) for i in mb]
        for dp in (2, 3, 6):
            per_rank = [[i for mb in micro_batch_sample_ids(c, G, 2, r, dp) for i in mb] for r in range(dp)]
            union = [i for ids in per_rank for i in ids]
            assert len(union) == len(set(union)) and set(union) == set(dp1) == set(range(c, c + G))
            assert [i for ids in per_rank for i in ids] == dp1  # contiguous slices in rank order


@pytest.mark.parametrize("args,msg", [((0, 10, 4, 0, 1), "divisible"), ((0, 8, 2, 0, 3), "divisible"),
                                      ((0, 8, 2, 2, 2), "dp_rank"), ((-8, 8, 2, 0, 1), "consumed"),
                                      ((0, 0, 2, 0, 1), "positive")])
def test_micro_batch_ids_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        micro_batch_sample_ids(*args)


def _steps(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _by_id(steps):
    out = {}
    for step in steps:
        for mb in step:
            for j, sid in enumerate(mb["sample_id"].tolist()):
                out[sid] = {k: v[j] for k, v in mb.items()}
    return out


def test_loader_dp1_equals_dp2_and_resume(train):
    G, m, n_steps = 8, 2, 3
    dp1 = _steps(PretrainingLoader(train, G, m), n_steps)
    assert all(len(step) == 4 and step[0]["input_ids"].shape == (m, SEQ) for step in dp1)
    assert all(v.dtype == torch.int64 for v in dp1[0][0].values())
    ranks = [_steps(PretrainingLoader(train, G, m, dp_rank=r, dp_size=2), n_steps) for r in range(2)]
    for k in range(n_steps):
        ids1 = {i for mb in dp1[k] for i in mb["sample_id"].tolist()}
        ids2 = {i for r in range(2) for mb in ranks[r][k] for i in mb["sample_id"].tolist()}
        assert ids1 == ids2 == set(range(k * G, (k + 1) * G))   # same global batch per step
    a, b = _by_id(dp1), _by_id(ranks[0] + ranks[1])
    assert a.keys() == b.keys()
    for sid in a:
        for key in a[sid]:
            assert torch.equal(a[sid][key], b[sid][key])
    # resume from consumed_samples: continues exactly where the first run was
    loader = PretrainingLoader(train, G, m, consumed_samples=2 * G)
    resumed = _steps(loader, 1)[0]
    assert loader.consumed_samples == 3 * G
    for x, y in zip(resumed, dp1[2]):
        for key in x:
            assert torch.equal(x[key], y[key])


def test_loader_with_workers_matches_in_process(train):
    G, m = 8, 4
    ref = _steps(PretrainingLoader(train, G, m, consumed_samples=len(train) - 4), 2)  # crosses an epoch
    par = _steps(PretrainingLoader(train, G, m, consumed_samples=len(train) - 4, num_workers=2), 2)
    for s1, s2 in zip(ref, par):
        for x, y in zip(s1, s2):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("static_lm_prob,prune", [(None, True), (0.15, True), (0.15, False)])
def test_model_inputs_made_in_the_workers_equal_those_made_in_process(train, static_lm_prob, prune):
    """The pretraining task's transform (micro-batch → model inputs) runs in the loader's workers: the
    training process then receives the same inputs it would have computed itself."""
    from functools import partial

    from megatron_bert.training.pretrain import to_model_inputs

    opts = dict(prune_last_layer=prune, use_binary=True, static_lm_prob=static_lm_prob)
    G, m = 8, 4
    ref = [[to_model_inputs(mb, **opts) for mb in step] for step in _steps(PretrainingLoader(train, G, m), 2)]
    par = _steps(PretrainingLoader(train, G, m, num_workers=2, transform=partial(to_model_inputs, **opts)), 2)
    for s1, s2 in zip(ref, par):
        for x, y in zip(s1, s2):
            assert x.keys() == y.keys() and "next_sentence_label" in x
            assert ("target_positions" in x) == prune and ("lm_positions" in x) != prune
            for k in x:
                assert (x[k] is None and y[k] is None) or torch.equal(x[k], y[k]), k


def test_collate():
    samples = [{"a": np.arange(3), "b": np.array(i)} for i in range(4)]
    out = collate(samples)
    assert out["a"].shape == (4, 3) and out["b"].tolist() == [0, 1, 2, 3] and out["a"].dtype == torch.int64
    with pytest.raises(ValueError):
        collate([])
