"""LAMB on real gloo ranks (run by tests/test_lamb.py through dist_harness): every rank steps its TP shard
/ ZeRO slice of the same full tensors and must land on the slices of a one-process LAMB run on the
full tensors; with the sharding metadata dropped (each rank taking its local norms) it must not."""
from __future__ import annotations

import torch

from megatron_bert.training.lamb import Lamb
from parallel import ParallelState, whole_tensor_norms

# (shape, TP partition dim or None, ZeRO slice dim or None)
LAYOUT = [((8, 6), 0, 1), ((6, 8), 1, 0), ((8,), 0, None), ((5, 4), None, 0), ((7,), None, None)]


def _part(full: torch.Tensor, tp_dim, dp_dim, ps: ParallelState) -> torch.Tensor:
    t = full
    if tp_dim is not None:
        t = t.chunk(ps.tp_size, tp_dim)[ps.tp_rank]
    if dp_dim is not None:
        t = t.chunk(ps.dp_size, dp_dim)[ps.dp_rank]
    return t.clone()


def _run(ps: ParallelState, with_metadata: bool, steps: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    fulls = [torch.randn(shape, generator=g) for shape, _, _ in LAYOUT]
    grads = [[torch.randn(shape, generator=g) for shape, _, _ in LAYOUT] for _ in range(steps)]
    params = []
    for full, (_, tp_dim, dp_dim) in zip(fulls, LAYOUT):
        p = torch.nn.Parameter(_part(full, tp_dim, dp_dim, ps))
        if with_metadata:
            p.tensor_parallel, p.dp_sliced = tp_dim is not None, dp_dim is not None
        params.append(p)
    # two groups as the trainer makes them: trust ratio on the decayed matrices, not on the 1-D ones
    opt = Lamb([{"params": [p for p in params if p.ndim > 1], "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim == 1], "weight_decay": 0.0, "trust_ratio": False}],
               ps, lr=0.05)
    for step_grads in grads:
        for p, full_g, (_, tp_dim, dp_dim) in zip(params, step_grads, LAYOUT):
            p.grad = _part(full_g, tp_dim, dp_dim, ps)
        opt.step()
    return [p.detach() for p in params]


def check_lamb(ps: ParallelState) -> dict:
    single = ParallelState.single()
    reference = _run(single, True)  # the full tensors, one process
    mine = _run(ps, True)
    local = _run(ps, False)
    out = {"max_err": 0.0, "local_differs": False}
    for ref, got, loc, (_, tp_dim, dp_dim) in zip(reference, mine, local, LAYOUT):
        want = _part(ref, tp_dim, dp_dim, ps)
        out["max_err"] = max(out["max_err"], float((got - want).abs().max()) if got.numel() else 0.0)
        if got.numel() and not torch.allclose(loc, want, atol=1e-4):
            out["local_differs"] = True
    # whole_tensor_norms itself, with a NaN in one rank's part: every rank's entry must be NaN
    t = [torch.ones(2, 3), torch.ones(4)]
    if ps.rank == ps.world_size - 1:
        t[0][0, 0] = float("nan")
    norms = whole_tensor_norms(t, ps, [True, False], [True, False])
    out["nan_everywhere"] = bool(torch.isnan(norms[0])) and float(norms[1]) == 2.0
    return out
