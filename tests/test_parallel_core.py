"""The tensor-parallel core against single-process torch.nn references (real gloo ranks)."""
import pytest
import torch

import parallel_checks
from dist_harness import run_distributed
from parallel import (
    ColumnParallelLinear,
    ParallelConfigError,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    shard_of,
    unshard,
    validate_layout,
)
from parallel.random import RNGTracker, keyed_keep_mask, slice_index


@pytest.mark.parametrize("world,tp", [(1, 1), (2, 2), (4, 4), (4, 2)], ids=["tp1", "tp2", "tp4", "tp2xdp2"])
def test_parallel_core_matches_single_process(world, tp):
    results = run_distributed(world, tp, parallel_checks.run_all)
    expected = ["mappings ok", "mlp ok", "embedding ok", "cross entropy ok"]
    if tp > 1:
        expected.append("mlp ok")
    if world // tp > 1:
        expected.append("dp ok")
    assert results == [expected] * world


def test_single_process_state_needs_no_process_group():
    ps = ParallelState.from_env(1, device="cpu", env={})
    assert (ps.world_size, ps.tp_size, ps.dp_size, ps.tp_group) == (1, 1, 1, None)
    layer = ColumnParallelLinear(4, 6, ps, init_method=normal_init(0.02))
    assert layer(torch.randn(2, 4)).shape == (2, 6)


def test_weights_at_tp4_are_slices_of_tp1():
    """Build the same layers with (fake) TP ranks 0..3 and stitch them back: equals TP=1."""
    full = ColumnParallelLinear(8, 16, ParallelState.single(), init_method=normal_init(0.02, torch.Generator().manual_seed(5)))
    shards = []
    for rank in range(4):
        ps = ParallelState(tp_size=4, tp_rank=rank, world_size=4, rank=rank)
        layer = ColumnParallelLinear(8, 16, ps, init_method=normal_init(0.02, torch.Generator().manual_seed(5)))
        assert layer.weight.partition_dim == 0 and layer.weight.tensor_parallel
        shards.append(layer.weight.detach())
    assert torch.equal(unshard(shards, 0), full.weight.detach())


def test_strided_shard_roundtrip():
    full = torch.arange(24.0).view(12, 2)  # 3 stacked blocks of 4 rows
    shards = [shard_of(full, 0, r, 2, stride=3) for r in range(2)]
    assert torch.equal(shards[0][:2], full[0:2]) and torch.equal(shards[0][2:4], full[4:6])
    assert torch.equal(unshard(shards, 0, stride=3), full)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda ps: ColumnParallelLinear(8, 6, ps, init_method=normal_init(0.02)), "output size .* not divisible by 4"),
        (lambda ps: RowParallelLinear(6, 8, ps, init_method=normal_init(0.02)), "input size .* not divisible by 4"),
        (lambda ps: VocabParallelEmbedding(30, 8, ps, init_method=normal_init(0.02)), "vocabulary size .* not divisible by 4"),
    ],
)
def test_bad_sizes_give_one_clear_error(build, match):
    ps = ParallelState(tp_size=4, tp_rank=0, world_size=4)
    with pytest.raises(ParallelConfigError, match=match) as info:
        build(ps)
    assert "\n" not in str(info.value)


def test_world_size_not_divisible_by_tp():
    with pytest.raises(ParallelConfigError, match=r"world size \(6\) is not divisible by 4.*parallel.tensor"):
        validate_layout(6, 4)
    with pytest.raises(ParallelConfigError, match="parallel.tensor must be >= 1"):
        validate_layout(2, 0)
    with pytest.raises(ParallelConfigError, match="not divisible"):
        ParallelState.from_env(4, device="cpu", env={"WORLD_SIZE": "6", "RANK": "0"})


def test_rng_tracker_streams_are_separate_and_restorable():
    tracker = RNGTracker("cpu")
    torch.manual_seed(1)
    tracker.add("model-parallel", 123)
    saved = tracker.get_states()
    with tracker.fork():
        a = torch.rand(4)
    default_after = torch.rand(4)
    torch.manual_seed(1)
    assert torch.equal(default_after, torch.rand(4)), "fork must not advance the default stream"
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(a, torch.rand(4)), "restored stream must replay"
    with tracker.fork():
        assert not torch.equal(a, torch.rand(4)), "stream must advance"


def test_keyed_mask_is_layout_independent_and_unbiased():
    keys = torch.tensor([11, 12, 13], dtype=torch.int64).view(1, 3, 1)
    glob = (16, 3, 32)
    full = keyed_keep_mask(keys, slice_index(glob, (0, 0, 0), glob, "cpu"), 0.25)
    half = keyed_keep_mask(keys, slice_index(glob, (8, 0, 0), (8, 3, 32), "cpu"), 0.25)
    assert torch.equal(full[8:], half)
    big = keyed_keep_mask(torch.tensor([7]), torch.arange(200_000), 0.1)
    assert abs(big.float().mean().item() - 0.9) < 0.005


def test_grad_norm_sees_a_nan_in_replicated_grads_on_any_tp_rank():
    """Replicated grads count once (TP rank 0) but a NaN there on another rank must still show."""
    from parallel.grads import grad_norm

    rep = torch.nn.Parameter(torch.ones(3))
    rep.grad = torch.tensor([float("nan"), 1.0, 1.0])
    shard = torch.nn.Parameter(torch.ones(2))
    shard.tensor_parallel = True
    shard.grad = torch.ones(2)
    on_rank1 = ParallelState(tp_size=2, tp_rank=1, world_size=2, rank=1)  # no group: the reduce is local
    assert torch.isnan(grad_norm([rep, shard], on_rank1))
    rep.grad = torch.full((3,), 5.0)
    assert torch.allclose(grad_norm([rep, shard], on_rank1), torch.tensor(2.0 ** 0.5))  # rep not counted here


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_plain_torch_cross_entropy_matches_the_vocab_parallel_function(smoothing):
    """The one-rank formula that ``compiled=True`` hands to torch.compile on GPU (tests/test_gpu.py
    runs it compiled) computes the vocab-parallel Function's loss and gradient."""
    from parallel.cross_entropy import _local_cross_entropy, vocab_parallel_cross_entropy

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 97, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 97, (40,), generator=g)
    target[::5] = -100
    want = vocab_parallel_cross_entropy(logits, target, None, label_smoothing=smoothing)
    got = _local_cross_entropy(logits, target, -100, smoothing)
    assert torch.equal(got[::5], torch.zeros(8, dtype=got.dtype))
    torch.testing.assert_close(got, want.to(got.dtype), rtol=1e-6, atol=1e-6)
    (g_want,), (g_got,) = torch.autograd.grad(want.sum(), logits), torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-7)
