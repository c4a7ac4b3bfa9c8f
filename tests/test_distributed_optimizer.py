"""optim.distributed_optimizer (ZeRO-1): the DP slices (parallel/dp_shard.py), their collectives on real gloo
ranks against all-reduce, and trainer runs that agree with unsharded ones and resume across layouts."""
import re

import pytest
import torch

from checkpoint_checks import describe, finish, launch
from dist_harness import run_distributed
from dp_shard_checks import SHAPES, _params, reduce_scatter_gather_and_norm
from parallel import ParallelState
from parallel.dp_shard import DPShardPlan, chunk_range, shard_dim
from train_fixtures import base_overrides, build_dataset, metrics, resume_dir


@pytest.mark.parametrize("dp", [1, 2, 3, 4, 5])
def test_the_slices_of_all_dp_ranks_tile_every_parameter_once(dp):
    params = _params()
    plans = [DPShardPlan(params, ParallelState(dp_size=dp, dp_rank=k)) for k in range(dp)]
    for i, p in enumerate(params):
        d = shard_dim(p)
        if d is None:  # only a 1-D TP-sharded tensor has no other dimension to cut
            assert p.ndim == 1 and getattr(p, "tensor_parallel", False)
            continue
        assert d != getattr(p, "partition_dim", None)
        hits = torch.zeros(p.shape)
        for plan in plans:
            plan.slice_of(hits, i).add_(1)
            assert tuple(plan.slice_of(hits, i).shape) == plan.slice_shape(i)
        assert torch.equal(hits, torch.ones(p.shape)), f"{SHAPES[i]} at DP={dp}"
        # DTensor's Shard cut: ceil(n / dp) each, then what is left (torch.chunk sizes, padded with empties)
        sizes = [chunk_range(p.shape[d], dp, k)[1] for k in range(dp)]
        chunks = [c.shape[d] for c in torch.ones(p.shape).chunk(dp, d)]
        assert sizes == chunks + [0] * (dp - len(chunks))


@pytest.mark.parametrize("world,tp", [(3, 1), (4, 2)])
def test_reduce_scatter_all_gather_and_norm_match_all_reduce_on_gloo(world, tp):
    results = run_distributed(world, tp, reduce_scatter_gather_and_norm)
    assert all(r["nan"] for r in results), "a NaN in one rank's slice must reach every rank's norm"
    assert results[0]["dims"] == [1, 0, 1, None, 0, 1, 0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("zero_data"))


def _state_mib(stdout: str) -> tuple[float, float]:
    m = re.search(r"distributed optimizer: fp32 masters \+ AdamW moments ([\d.]+) MiB per rank \(([\d.]+) MiB unsharded", stdout)
    assert m, stdout[-2000:]
    return float(m.group(1)), float(m.group(2))


def _losses(run_dir, steps):
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(steps), [r["step"] for r in rows]
    return [(r["loss"], r["grad_norm"]) for r in rows]


def test_sharded_runs_match_unsharded_ones_and_resume_across_layouts(dataset, tmp_path):
    """fp32 with dropout: TP=2×DP=2 + SP sharded vs TP=1 (1e-5, like the other layouts); bf16 TP=1×DP=2 with
    clipping off: sharded vs unsharded losses bit for bit (same sums, elementwise AdamW, same casts). Then
    resumes: the sharded checkpoint at TP=1 unsharded, the unsharded one at TP=1×DP=2 sharded."""
    def ov(name, **extra):
        return base_overrides(dataset, tmp_path / name, **{"checkpoint.save_interval": 3, **extra})

    zero = {"optim.distributed_optimizer": True}
    bf16 = {"train.precision": "bf16", "optim.clip_grad": 0.0}
    first = {
        "zero_tp2_dp2": (4, ov("zero_tp2_dp2", **{"parallel.tensor": 2, "parallel.sequence_parallel": True, **zero})),
        "ref_tp1": (1, ov("ref_tp1")),
        "zero_bf16": (2, ov("zero_bf16", **bf16, **zero, **{"checkpoint.async_save": True})),  # staged slices
        "plain_bf16": (2, ov("plain_bf16", **bf16)),
    }
    res = finish({k: launch(o, nproc=n) for k, (n, o) in first.items()}, timeout=480)
    for k in first:
        assert res[k][0] == 0, f"{k}: {describe(res[k])}"
    ref = _losses(tmp_path / "ref_tp1", range(1, 7))
    zero_run = _losses(tmp_path / "zero_tp2_dp2", range(1, 7))
    for step, ((l1, g1), (l2, g2)) in enumerate(zip(ref, zero_run), 1):
        assert abs(l1 - l2) <= 1e-5 and abs(g1 - g2) <= 1e-4 * max(1.0, g1), (step, l1, l2, g1, g2)
    # the losses bit for bit; the norm sums its squares in another grouping (slices, then over DP)
    for step, ((l1, g1), (l2, g2)) in enumerate(zip(_losses(tmp_path / "plain_bf16", range(1, 7)),
                                                   _losses(tmp_path / "zero_bf16", range(1, 7))), 1):
        assert l1 == l2 and abs(g1 - g2) <= 1e-6 * g1, (step, l1, l2, g1, g2)
    # the state is split over DP=2 (the 1-D TP-sharded biases stay whole on both: a little over half)
    assert "saving checkpoint" in res["zero_bf16"][1] and "in the background" in res["zero_bf16"][1]
    mine, whole = _state_mib(res["zero_bf16"][1])
    assert 0.5 * whole <= mine <= 0.52 * whole, (mine, whole)

    # the sharded checkpoints hold DP (× TP) chunks of each matrix; read whole, they are the replicated
    # optimizer's tensors: bit for bit in the bf16 pair (the sharded one written by the background saver
    # from its CPU copy), and close to TP=1's (AdamW moves elements
    # whose grads are ~0 by ~lr whatever their size, so layouts that round differently differ there)
    from megatron_bert.checkpoint.sharded import read_full_state, tensor_index

    def step3(run):
        return tmp_path / run / "checkpoints" / "step_3"

    assert {n for _, _, n in tensor_index(step3("zero_tp2_dp2")).values()} >= {2, 4}, "no DP × TP chunks"
    assert {n for _, _, n in tensor_index(step3("zero_bf16")).values()} >= {2}, "no DP chunks"
    import io

    from megatron_bert.checkpoint.__main__ import inspect

    out = io.StringIO()
    inspect(step3("zero_tp2_dp2"), out)
    assert "optimizer state: fp32 masters and moments in DP slices (optim.distributed_optimizer, DP=2)" in out.getvalue()
    assert "(4 shards)" in out.getvalue()
    sharded, plain = read_full_state(step3("zero_bf16")), read_full_state(step3("plain_bf16"))
    assert sharded.keys() == plain.keys() and all(torch.equal(t, plain[k]) for k, t in sharded.items())
    full, ref_full = read_full_state(step3("zero_tp2_dp2")), read_full_state(step3("ref_tp1"))
    assert full.keys() == ref_full.keys()
    for k, t in full.items():
        assert torch.allclose(t, ref_full[k], atol=1e-4), k

    # resume: sharded (TP=2×DP=2) → unsharded TP=1; unsharded TP=1 → sharded TP=1×DP=2 (another cut)
    for src, dst in (("zero_tp2_dp2", "from_zero"), ("ref_tp1", "to_zero")):
        resume_dir(tmp_path / src / "checkpoints", tmp_path / dst, step=3)
    # (beside them, fp16: loss scaling unscales the slices' grads; the losses are again the replicated ones)
    fp16 = {"train.precision": "fp16", "optim.clip_grad": 0.0}
    second = {"from_zero": (1, ov("from_zero")), "to_zero": (2, ov("to_zero", **zero)),
              "zero_fp16": (2, ov("zero_fp16", **fp16, **zero)), "plain_fp16": (2, ov("plain_fp16", **fp16))}
    res = finish({k: launch(o, nproc=n) for k, (n, o) in second.items()}, timeout=300)
    for k in second:
        assert res[k][0] == 0, f"{k}: {describe(res[k])}"
    for k in ("from_zero", "to_zero"):
        assert "resumed from" in res[k][1]
        for step, ((l1, g1), (l2, g2)) in enumerate(zip(ref[3:], _losses(tmp_path / k, range(4, 7))), 4):
            assert abs(l1 - l2) <= 1e-5 and abs(g1 - g2) <= 1e-4 * max(1.0, g1), (k, step, l1, l2, g1, g2)
    # (step 1 overflows at the initial loss scale in both: skipped, the scale halved, on every rank alike)
    plain, sharded = metrics(tmp_path / "plain_fp16"), metrics(tmp_path / "zero_fp16")
    assert [r["step"] for r in plain] == [r["step"] for r in sharded] == list(range(1, 7))
    assert [r["loss_scale"] for r in plain] == [r["loss_scale"] for r in sharded]
    assert [r.get("loss") for r in plain] == [r.get("loss") for r in sharded]
    assert sum(r.get("grad_norm") is not None for r in sharded) >= 4, "fp16 steps should mostly go through"
    for a, b in zip(plain, sharded):
        assert (a["grad_norm"] is None) == (b["grad_norm"] is None)
        if a["grad_norm"] is not None:
            assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-6 * a["grad_norm"], (a, b)


def test_grads_reduced_in_bf16_track_the_fp32_reduction(dataset, tmp_path):
    """optim.grad_reduce_dtype=param (bf16 run, TP=1×DP=2, two micro-batches per rank: autograd accumulates them
    in bf16, the reduce-scatter sums in bf16): the same run as the fp32 reduction within bf16 rounding, and
    every grad norm within 1% (a grad summed wrongly, e.g. not over DP or a micro-batch lost, moves it far more)."""
    common = {"train.precision": "bf16", "optim.distributed_optimizer": True, "train.micro_batch_size": 2}
    runs = {name: launch(base_overrides(dataset, tmp_path / name, **common, **{"optim.grad_reduce_dtype": dtype}),
                         nproc=2) for name, dtype in (("fp32", "fp32"), ("param", "param"))}
    res = finish(runs, timeout=300)
    for k in runs:
        assert res[k][0] == 0, f"{k}: {describe(res[k])}"
    assert "grads reduced in bfloat16" in res["param"][1] and "grads reduced in float32" in res["fp32"][1]
    a, b = _losses(tmp_path / "fp32", range(1, 7)), _losses(tmp_path / "param", range(1, 7))
    for step, ((l1, g1), (l2, g2)) in enumerate(zip(a, b), 1):
        assert abs(l1 - l2) <= 2e-3 * l1 and abs(g1 - g2) <= 1e-2 * g1, (step, l1, l2, g1, g2)
    assert a != b, "the 16-bit sums should round differently somewhere"
