"""Fine-tuning sample stream: per-epoch permutations, consumed_samples-only positions, DP splits."""
import numpy as np
import pytest

from megatron_bert.training.finetune_data import FinetuneLoader, SampleStream, epoch_permutation


class _DS:
    """Stand-in dataset: sample i is {"x": i}."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"x": np.asarray(i, dtype=np.int64), "sample_id": np.asarray(i, dtype=np.int64)}


def _ids(loader, steps):
    it = iter(loader)
    return [[(mb["x"].tolist(), mb["sample_id"].tolist()) for mb in next(it)] for _ in range(steps)]


def test_each_epoch_is_a_seeded_permutation_and_sample_ids_are_unique():
    n, seed = 10, 3
    stream = SampleStream(n, seed)
    got = [stream(p) for p in range(3 * n)]
    for e in range(3):
        idx = [i for i, _ in got[e * n:(e + 1) * n]]
        assert sorted(idx) == list(range(n))
        assert idx == epoch_permutation(seed, e, n).tolist()
        assert all(sid == e * n + i for i, sid in got[e * n:(e + 1) * n])
    assert len({sid for _, sid in got}) == 3 * n
    assert epoch_permutation(seed, 0, n).tolist() != epoch_permutation(seed, 1, n).tolist()
    assert epoch_permutation(seed, 0, n).tolist() != epoch_permutation(seed + 1, 0, n).tolist()


def test_step_depends_only_on_consumed_samples_across_dp_and_micro_batch_splits():
    ds, G, seed = _DS(7), 4, 5  # steps straddle epoch boundaries (7 is not a multiple of 4)
    one = _ids(FinetuneLoader(ds, G, 2, 0, 1, seed), 6)
    flat = [[x for xs, _ in step for x in xs] for step in one]
    sids = [[s for _, ss in step for s in ss] for step in one]
    # DP=2: the ranks' micro-batches together are the DP=1 step, rank 0 first.
    for mbs in (1, 2):
        r0 = _ids(FinetuneLoader(ds, G, mbs, 0, 2, seed), 6)
        r1 = _ids(FinetuneLoader(ds, G, mbs, 1, 2, seed), 6)
        for k in range(6):
            both = r0[k] + r1[k]
            assert [x for xs, _ in both for x in xs] == flat[k]
            assert [s for _, ss in both for s in ss] == sids[k]
    # Resuming at consumed_samples = 3 steps continues the same stream.
    resumed = _ids(FinetuneLoader(ds, G, 2, 0, 1, seed, consumed_samples=3 * G), 3)
    assert resumed == one[3:]
    stream = SampleStream(len(ds), seed)
    assert flat == [[stream(p)[0] for p in range(k * G, (k + 1) * G)] for k in range(6)]


def test_empty_train_set_is_an_error():
    with pytest.raises(ValueError, match="empty"):
        SampleStream(0, 1)
