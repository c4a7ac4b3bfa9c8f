"""Checks run inside each rank by test_parallel_core.py (one spawn runs them all).

Every check builds the single-process reference in the same process with the same global
weights, so a failure names the rank and the tensor that disagree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from parallel import (
    ColumnParallelLinear,
    ParallelState,
    RowParallelLinear,
    VocabParallelEmbedding,
    allreduce_data_parallel_grads,
    allreduce_sequence_parallel_grads,
    clip_grad_norm_,
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    grad_norm,
    normal_init,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
    shard_of,
    vocab_parallel_cross_entropy,
)
from parallel.cross_entropy import _split_cross_entropy

TOL = 1e-5


def _close(name, got, want, tol=TOL):
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"
    return diff


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- mappings
def check_mappings(ps: ParallelState):
    """Each mapping's forward and backward against the closed form."""
    g, tp, r = ps.tp_group, ps.tp_size, ps.tp_rank
    x_full = torch.randn(4, 3, 8, generator=_gen(1))
    weights = [torch.randn(4, 3, 8, generator=_gen(100 + k)) for k in range(tp)]  # rank k's upstream grad

    # copy: fwd identity, bwd all-reduce
    x = x_full.clone().requires_grad_()
    y = copy_to_tp(x, g)
    _close("copy fwd", y, x_full)
    (y * weights[r]).sum().backward()
    _close("copy bwd", x.grad, sum(weights))

    # reduce: fwd all-reduce, bwd identity
    x = (x_full * (r + 1)).requires_grad_()
    y = reduce_from_tp(x, g)
    _close("reduce fwd", y, x_full * sum(k + 1 for k in range(tp)))
    (y * weights[r]).sum().backward()
    _close("reduce bwd", x.grad, weights[r])

    # scatter (last dim): fwd split, bwd gather
    x = x_full.clone().requires_grad_()
    y = scatter_to_tp(x, g)
    _close("scatter fwd", y, x_full.chunk(tp, -1)[r])
    (y * weights[r].chunk(tp, -1)[r]).sum().backward()
    # x is replicated, so its gradient is every rank's chunk-gradient stitched together
    _close("scatter bwd", x.grad, torch.cat([weights[k].chunk(tp, -1)[k] for k in range(tp)], -1))

    # gather (last dim): fwd all-gather, bwd split
    x = x_full.chunk(tp, -1)[r].clone().requires_grad_()
    y = gather_from_tp(x, g)
    _close("gather fwd", y, x_full)
    (y * weights[r]).sum().backward()
    _close("gather bwd", x.grad, weights[r].chunk(tp, -1)[r])

    # sequence parallel: scatter (dim 0) fwd split, bwd all-gather
    x = x_full.clone().requires_grad_()
    y = scatter_to_sp(x, g)
    _close("sp scatter fwd", y, x_full.chunk(tp, 0)[r])
    (y * weights[r].chunk(tp, 0)[r]).sum().backward()
    _close("sp scatter bwd", x.grad, torch.cat([weights[k].chunk(tp, 0)[k] for k in range(tp)], 0))

    # sequence parallel: all-gather fwd, reduce-scatter bwd
    x = x_full.chunk(tp, 0)[r].clone().requires_grad_()
    y = gather_from_sp(x, g)
    _close("sp gather fwd", y, x_full)
    (y * weights[r]).sum().backward()
    _close("sp gather bwd (reduce-scatter)", x.grad, sum(weights).chunk(tp, 0)[r])

    # sequence parallel: reduce-scatter fwd, all-gather bwd
    x = (x_full * (r + 1)).requires_grad_()
    y = reduce_scatter_to_sp(x, g)
    _close("sp reduce-scatter fwd", y, (x_full * sum(k + 1 for k in range(tp))).chunk(tp, 0)[r])
    (y * weights[r].chunk(tp, 0)[r]).sum().backward()
    _close("sp reduce-scatter bwd", x.grad, torch.cat([weights[k].chunk(tp, 0)[k] for k in range(tp)], 0))
    return "mappings ok"


# --------------------------------------------------------------------------- layers
def _mlp(ps, h, ffn, seed, sequence_parallel=False):
    gen = _gen(seed)
    fc1 = ColumnParallelLinear(h, ffn, ps, init_method=normal_init(0.02, gen), sequence_parallel=sequence_parallel)
    fc2 = RowParallelLinear(ffn, h, ps, init_method=normal_init(0.02, gen), sequence_parallel=sequence_parallel)
    with torch.no_grad():  # non-zero biases so their grads/paths are exercised
        fc1.bias.copy_(shard_of(torch.randn(ffn, generator=_gen(seed + 1)), 0, ps.tp_rank, ps.tp_size))
        fc2.bias.copy_(torch.randn(h, generator=_gen(seed + 2)))
    return fc1, fc2


def check_mlp(ps: ParallelState, sequence_parallel: bool):
    """Column → GeLU → Row against torch.nn with the same global weights, fwd and all grads."""
    s, b, h, ffn = 8, 3, 16, 64
    single = ParallelState.single()
    fc1, fc2 = _mlp(ps, h, ffn, 7, sequence_parallel)
    ref1, ref2 = _mlp(single, h, ffn, 7)
    # TP-invariant init: my weights are exactly the slices of the TP=1 weights.
    assert torch.equal(fc1.weight, shard_of(ref1.weight.detach(), 0, ps.tp_rank, ps.tp_size)), "fc1 init slice"
    assert torch.equal(fc2.weight, shard_of(ref2.weight.detach(), 1, ps.tp_rank, ps.tp_size)), "fc2 init slice"

    x_full = torch.randn(s, b, h, generator=_gen(3))
    upstream = torch.randn(s, b, h, generator=_gen(4))
    x_ref = x_full.clone().requires_grad_()
    y_ref = ref2(F.gelu(ref1(x_ref)))
    (y_ref * upstream).sum().backward()

    if sequence_parallel:
        x = x_full.chunk(ps.tp_size, 0)[ps.tp_rank].clone().requires_grad_()
        y = fc2(F.gelu(fc1(x)))
        _close("mlp fwd (sp shard)", y, y_ref.detach().chunk(ps.tp_size, 0)[ps.tp_rank])
        (y * upstream.chunk(ps.tp_size, 0)[ps.tp_rank]).sum().backward()
        allreduce_sequence_parallel_grads([fc1.bias, fc2.bias], ps)
        _close("mlp dL/dx (sp shard)", x.grad, x_ref.grad.chunk(ps.tp_size, 0)[ps.tp_rank])
    else:
        x = x_full.clone().requires_grad_()
        y = fc2(F.gelu(fc1(x)))
        _close("mlp fwd", y, y_ref.detach())
        (y * upstream).sum().backward()
        _close("mlp dL/dx", x.grad, x_ref.grad)
    r, tp = ps.tp_rank, ps.tp_size
    _close("fc1 dW", fc1.weight.grad, shard_of(ref1.weight.grad, 0, r, tp))
    _close("fc1 db", fc1.bias.grad, shard_of(ref1.bias.grad, 0, r, tp))
    _close("fc2 dW", fc2.weight.grad, shard_of(ref2.weight.grad, 1, r, tp))
    _close("fc2 db", fc2.bias.grad, ref2.bias.grad)

    # Global grad norm counts shards once each and replicated params once.
    got = grad_norm(list(fc1.parameters()) + list(fc2.parameters()), ps)
    want = torch.nn.utils.get_total_norm([p.grad for p in list(ref1.parameters()) + list(ref2.parameters())])
    _close("grad norm", got, want)
    norm = clip_grad_norm_(list(fc1.parameters()) + list(fc2.parameters()), 0.5 * want.item(), ps)
    _close("clip returns pre-clip norm", norm, want)
    after = grad_norm(list(fc1.parameters()) + list(fc2.parameters()), ps)
    _close("norm after clip", after, 0.5 * want, tol=1e-4)
    return "mlp ok"


def check_embedding(ps: ParallelState):
    vocab, h = 32, 8
    emb = VocabParallelEmbedding(vocab, h, ps, init_method=normal_init(1.0, _gen(11)))
    ref = VocabParallelEmbedding(vocab, h, ParallelState.single(), init_method=normal_init(1.0, _gen(11)))
    assert torch.equal(emb.weight, shard_of(ref.weight.detach(), 0, ps.tp_rank, ps.tp_size)), "embedding init slice"
    ids = torch.randint(0, vocab, (5, 4), generator=_gen(12))
    upstream = torch.randn(5, 4, h, generator=_gen(13))
    out, out_ref = emb(ids), F.embedding(ids, ref.weight)
    _close("embedding fwd", out, out_ref.detach())
    (out * upstream).sum().backward()
    (out_ref * upstream).sum().backward()
    _close("embedding dW", emb.weight.grad, shard_of(ref.weight.grad, 0, ps.tp_rank, ps.tp_size))
    # a caller's own lookup (the model passes one with a Triton backward) serves this rank's local ids
    looked_up = []

    def one_hot_lookup(local_ids, weight):
        looked_up.append(int(local_ids.max()))
        return F.one_hot(local_ids, weight.shape[0]).to(weight.dtype) @ weight  # backward: a GEMM

    own = VocabParallelEmbedding(vocab, h, ps, init_method=normal_init(1.0, _gen(11)), lookup=one_hot_lookup)
    out_own = own(ids)
    _close("embedding fwd, own lookup", out_own, out_ref.detach())
    (out_own * upstream).sum().backward()
    _close("embedding dW, own lookup", own.weight.grad, shard_of(ref.weight.grad, 0, ps.tp_rank, ps.tp_size))
    assert looked_up and looked_up[0] < vocab // ps.tp_size, looked_up
    return "embedding ok"


def check_cross_entropy(ps: ParallelState):
    n, vocab = 12, 32
    logits_full = torch.randn(3, n, vocab, generator=_gen(21)) * 4
    target = torch.randint(0, vocab, (3, n), generator=_gen(22))
    target[0, :3] = -100
    upstream = torch.rand(3, n, generator=_gen(23))
    # The Function, and at TP > 1 the plain-torch formula that compiled=True hands to torch.compile on
    # GPU: eagerly, and traced (aot_eager: Dynamo + AOT autograd through the collectives, no codegen).
    split = torch.compile(_split_cross_entropy, backend="aot_eager", fullgraph=True)
    ways = {"function": lambda x, t, ls: vocab_parallel_cross_entropy(x, t, ps.tp_group, label_smoothing=ls)}
    if ps.tp_size > 1:
        ways.update(plain=lambda x, t, ls: _split_cross_entropy(x, t, ps.tp_group, -100, ls),
                    traced=lambda x, t, ls: split(x, t, ps.tp_group, -100, ls))
    for smoothing in (0.0, 0.1):
        ref_in = logits_full.clone().requires_grad_()
        ref = F.cross_entropy(ref_in.view(-1, vocab), target.view(-1), reduction="none",
                              ignore_index=-100, label_smoothing=smoothing).view(3, n)
        (ref * upstream).sum().backward()
        for way, fn in ways.items():
            logits = logits_full.chunk(ps.tp_size, -1)[ps.tp_rank].clone().requires_grad_()
            loss = fn(logits, target, smoothing)
            _close(f"CE loss ({way}, ls={smoothing})", loss, ref.detach())
            (loss * upstream).sum().backward()
            _close(f"CE dlogits ({way}, ls={smoothing})", logits.grad, ref_in.grad.chunk(ps.tp_size, -1)[ps.tp_rank])
    # Huge logits stay finite (max-subtraction).
    big = (logits_full * 1e4).chunk(ps.tp_size, -1)[ps.tp_rank]
    assert torch.isfinite(vocab_parallel_cross_entropy(big, target, ps.tp_group)).all(), "CE overflowed"
    return "cross entropy ok"


def check_data_parallel(ps: ParallelState):
    """TP×DP: each DP replica sees its slice of the batch; averaged grads equal the full-batch grads."""
    s, b, h, ffn = 4, 4 * ps.dp_size, 16, 32
    fc1, fc2 = _mlp(ps, h, ffn, 31)
    ref1, ref2 = _mlp(ParallelState.single(), h, ffn, 31)
    x = torch.randn(s, b, h, generator=_gen(32))
    mine = x.chunk(ps.dp_size, 1)[ps.dp_rank]
    fc2(F.gelu(fc1(mine))).pow(2).mean().backward()
    ref2(F.gelu(ref1(x))).pow(2).mean().backward()
    allreduce_data_parallel_grads(list(fc1.parameters()) + list(fc2.parameters()), ps)
    r, tp = ps.tp_rank, ps.tp_size
    _close("dp fc1 dW", fc1.weight.grad, shard_of(ref1.weight.grad, 0, r, tp))
    _close("dp fc2 dW", fc2.weight.grad, shard_of(ref2.weight.grad, 1, r, tp))
    _close("dp fc2 db", fc2.bias.grad, ref2.bias.grad)
    return "dp ok"


def run_all(ps: ParallelState):
    torch.manual_seed(0)
    out = [check_mappings(ps), check_mlp(ps, False), check_embedding(ps), check_cross_entropy(ps)]
    if ps.tp_size > 1:
        out.append(check_mlp(ps, True))
    if ps.dp_size > 1:
        out.append(check_data_parallel(ps))
    return out
