"""Per-rank checks of parallel/dp_shard.py (run on real gloo ranks by tests/test_distributed_optimizer.py)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel import grad_norm, set_tp_metadata
from parallel.dp_shard import DPShardPlan

# (shape, TP partition dim or None): column- and row-parallel weights, a replicated matrix, a 1-D TP
# bias (no other dim: stays whole), a LayerNorm-like vector, and shapes smaller than the DP size.
SHAPES = [((6, 5), 0), ((5, 3), 1), ((2, 7), None), ((6,), 0), ((7,), None), ((1, 2), None), ((4, 1), 1)]


def _params(dtype=torch.float32):
    out = []
    for shape, tp_dim in SHAPES:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        if tp_dim is not None:
            set_tp_metadata(p, tp_dim)
        out.append(p)
    return out


def _integer_grads(seed: int):
    """Integer-valued floats: their sums are exact in any order, so slices must equal the all-reduce."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(-50, 50, shape, generator=g).float() for shape, _ in SHAPES]


def reduce_scatter_gather_and_norm(ps) -> dict:
    params = _params()
    plan = DPShardPlan(params, ps, bucket_elems=20)  # small buckets: several collectives, params split across them
    assert len(plan.buckets) > 1, plan.buckets
    grads = _integer_grads(seed=1000 + ps.rank)
    reference = [g.clone() for g in grads]
    for g in reference:
        dist.all_reduce(g, group=ps.dp_group)
    out = plan.reduce_scatter(grads)
    for i, (o, ref) in enumerate(zip(out, reference)):
        assert tuple(o.shape) == plan.slice_shape(i)
        assert torch.equal(o, plan.slice_of(ref, i)), f"param {i} {SHAPES[i]}: slice of the DP sum differs"
    mine = _integer_grads(seed=1000 + ps.rank)
    for i in plan.sharded:  # (the others are summed in place)
        assert torch.equal(grads[i], mine[i]), f"param {i}: input changed"

    # the norm over slices (summed over DP) is the norm of the whole summed grads
    shards = [d is not None for d in plan.dims]
    got = grad_norm(params, ps, grads=out, dp_sharded=shards)
    want = grad_norm(params, ps, grads=reference)
    assert torch.allclose(got, want, rtol=1e-6), (float(got), float(want))
    inf_got = grad_norm(params, ps, float("inf"), grads=out, dp_sharded=shards)
    assert float(inf_got) == float(grad_norm(params, ps, float("inf"), grads=reference))
    # a NaN in one DP rank's slice reaches every rank's norm
    if ps.dp_rank == 0:
        out[0].view(-1)[-1] = float("nan")
    nan_norm = grad_norm(params, ps, grads=out, dp_sharded=shards)

    # all-gather: every rank writes only its slices; every replica ends with the whole tensors (bf16 too)
    for dtype in (torch.float32, torch.bfloat16):
        targets = [torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) * (i + 1) / 7
                   for i, p in enumerate(params)]
        model = _params(dtype)
        with torch.no_grad():
            for p in model:
                p.fill_(-1.0)
        plan.all_gather([plan.slice_of(t, i).clone() for i, t in enumerate(targets)], model)
        for i, (p, t) in enumerate(zip(model, targets)):
            assert torch.equal(p, t.to(dtype)), f"param {i} {SHAPES[i]} {dtype}: gathered tensor differs"
    return {"nan": bool(torch.isnan(nan_norm)), "dims": plan.dims, "buckets": len(plan.buckets)}
