"""Rank-side checks for test_model.py: a TP model against a TP=1 model with the same seed."""
from __future__ import annotations

import torch

from megatron_bert.config import ModelConfig, ModelRuntime
from megatron_bert.model import MegatronBertForPreTraining, gather_lm_logits
from megatron_bert.model.heads import target_positions_of
from parallel import ParallelState, allreduce_sequence_parallel_grads
from parallel.init import is_tp_sharded, shard_of

TOL = 1e-5


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4, max_position_embeddings=32,
                hidden_dropout=0.1, attention_dropout=0.1)
    return ModelConfig(**{**base, **kw})


def make_batch(b=4, s=16, vocab=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    mask = torch.ones(b, s, dtype=torch.long)
    mask[0, s - 5:] = 0  # padding
    labels = torch.full((b, s), -100)
    pick = torch.rand(b, s, generator=g) < 0.3
    labels[pick] = torch.randint(0, vocab, (int(pick.sum()),), generator=g)
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, labels=labels,
                next_sentence_label=torch.tensor([0, 1, 1, 0][:b]), sample_ids=torch.arange(b) + 1000)


def _run(model, batch, only_masked=False, **kw):
    out = model(**batch, only_masked_logits=only_masked, **kw)
    out.loss.backward()
    if model.ps.tp_size > 1:
        allreduce_sequence_parallel_grads(model.parameters(), model.ps)
    return out


def _compare(ps, model, ref, out, out_ref, label):
    worst = 0.0
    d = (out.loss - out_ref.loss).abs().item()
    assert d <= TOL, f"{label}: loss differs by {d:.3g}"
    if out.prediction_logits is not None:
        logits = gather_lm_logits(out.prediction_logits.detach(), ps)
        d = (logits - out_ref.prediction_logits.detach()).abs().max().item()
        assert d <= TOL, f"{label}: logits differ by {d:.3g}"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_params[name].grad
        if is_tp_sharded(p):
            g_ref = shard_of(g_ref, p.partition_dim, ps.tp_rank, ps.tp_size, p.partition_stride)
        assert p.grad is not None, f"{label}: {name} got no gradient"
        d = (p.grad - g_ref).abs().max().item()
        assert d <= TOL, f"{label}: grad of {name} differs by {d:.3g}"
        worst = max(worst, d)
    return worst


def check_tp_equivalence(ps: ParallelState):
    """TP (± sequence parallel, ± recompute) vs TP=1, dropout on, fp32."""
    torch.manual_seed(0)
    cfg = tiny_config()
    batch = make_batch()
    ref = MegatronBertForPreTraining(cfg, ParallelState.single(), ModelRuntime(seed=7))
    out_ref = _run(ref, batch)
    report = {}
    for sp in (False, True):
        for recompute in ("none", "full"):
            model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=7, sequence_parallel=sp, recompute=recompute))
            out = _run(model, batch)
            report[f"sp={sp},recompute={recompute}"] = _compare(ps, model, ref, out, out_ref, f"sp={sp} rc={recompute}")
    # Only-masked logits (the fast path) give the same loss and grads.
    model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=7))
    out = model(**batch, only_masked_logits=True)
    d = (out.loss - out_ref.loss).abs().item()
    assert d <= TOL, f"only-masked logits: loss differs by {d:.3g}"
    return report


def check_native_recompute(ps: ParallelState):
    """Native (torch RNG) dropout: recompute replays the tracker streams and the default generator, so
    results are identical; also with the last layer pruned (at TP > 1 its attention mask is salted by
    the rank's heads from a seed of the default generator)."""
    cfg = tiny_config()
    batch = make_batch()
    for pruned in (False, True):
        kw = {"target_positions": target_positions(batch["labels"])} if pruned else {}
        outs = {}
        for recompute in ("none", "selective", "full"):
            torch.manual_seed(3)
            rt = ModelRuntime(seed=9, dropout_impl="native", recompute=recompute)
            model = MegatronBertForPreTraining(cfg, ps, rt)
            out = _run(model, batch, **kw)
            outs[recompute] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
        base_loss, base_grads = outs["none"]
        for mode in ("selective", "full"):
            loss, grads = outs[mode]
            label = f"native recompute={mode} pruned={pruned}"
            assert torch.equal(loss, base_loss), f"{label}: loss {loss.item()} != {base_loss.item()}"
            for n, g in grads.items():
                assert torch.equal(g, base_grads[n]), f"{label}: grad of {n} differs"
    return "native recompute ok"


def target_positions(labels: torch.Tensor, spare: int = 2) -> torch.Tensor:
    """Each sample's labelled positions in order, then ``spare`` or more unused slots (-1)."""
    return target_positions_of(labels, int((labels != -100).sum(1).max()) + spare)


def check_pruned_last_layer(ps: ParallelState):
    """The last layer computed only at [CLS] and the MLM targets (``target_positions``), at this TP size
    ± sequence parallel (the rows then sharded over the ranks, padded to a multiple of tp) ± recompute,
    against the full TP=1 model: loss, binary loss, the targets' logits and every grad, keyed dropout on
    (its masks are indexed by position, so the kept rows see the full layer's masks), padded batch."""
    cfg = tiny_config()
    batch = make_batch()
    targets = target_positions(batch["labels"])
    ref = MegatronBertForPreTraining(cfg, ParallelState.single(), ModelRuntime(seed=7))
    out_ref = _run(ref, batch)
    flat = (torch.arange(targets.shape[0])[:, None] * batch["labels"].shape[1] + targets.clamp(min=0))[targets >= 0]
    ref_logits = out_ref.prediction_logits.detach().reshape(-1, out_ref.prediction_logits.shape[-1])[flat]
    report = {}
    # Under SP two budgets of target slots, one more than the other: one of them pads the rows
    # ([CLS] + slots) to a multiple of tp at TP=2 and 4.
    for sp, recompute, spare in ((False, "none", 0), (False, "selective", 0), (False, "full", 0), (True, "none", 0),
                                 (True, "none", 1), (True, "full", 1)):
        slots = torch.cat([targets, torch.full_like(targets[:, :spare], -1)], dim=1)
        used = slots >= 0
        label = f"pruned sp={sp} rc={recompute} slots={slots.shape[1]}"
        model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=7, sequence_parallel=sp, recompute=recompute))
        out = model(**batch, target_positions=slots)
        out.loss.backward()
        if ps.tp_size > 1:
            allreduce_sequence_parallel_grads(model.parameters(), ps)
        d = (out.binary_loss - out_ref.binary_loss).abs().item()
        assert d <= TOL, f"{label}: binary loss differs by {d:.3g}"
        assert torch.equal(out.lm_labels[used.reshape(-1)], batch["labels"].reshape(-1)[flat]), f"{label}: labels"
        assert (out.lm_labels[~used.reshape(-1)] == -100).all(), f"{label}: unused slots are labelled"
        logits = gather_lm_logits(out.prediction_logits.detach(), ps)[used.reshape(-1)]
        out.prediction_logits = None  # compared above, on the targets' rows; _compare: loss and grads
        d = (logits - ref_logits).abs().max().item()
        assert d <= TOL, f"{label}: target logits differ by {d:.3g}"
        report[label] = _compare(ps, model, ref, out, out_ref, label)
    return report


def check_rows_of_shards(ps: ParallelState):
    """rows.rows_of_shards on sequence shards: this rank's chunk of the rows of the whole sequence,
    exactly, with positions at the shards' edges and repeated ones (their grads add up), forward and
    backward against take_rows on the unsharded tensor."""
    from megatron_bert.model.rows import row_index, rows_of_shards, take_rows

    s, b, h, tp, r = 16, 3, 5, ps.tp_size, ps.tp_rank
    g = torch.Generator().manual_seed(4)
    x, upstream = torch.randn(s, b, h, generator=g), torch.randn(8, b, h, generator=g)
    edge = s // tp
    rows = torch.tensor([[0, edge - 1, edge, s - 1, 5, 5, 2, 9], [s - 1, 0, 0, edge, 7, 3, 12, 1],
                         [4, 4, 4, 4, 15, 14, 13, 0]])  # [b, n = 8]
    ref = x.clone().requires_grad_()
    full = take_rows(ref, row_index(rows, b))  # [n, b, h]
    full.backward(upstream)
    shard = x[r * edge:(r + 1) * edge].clone().requires_grad_()
    n = rows.shape[1] // tp
    got = rows_of_shards(shard, rows, ps)
    assert torch.equal(got, full[r * n:(r + 1) * n].detach()), "rows_of_shards: rows differ"
    got.backward(upstream[r * n:(r + 1) * n])
    d = (shard.grad - ref.grad[r * edge:(r + 1) * edge]).abs().max().item()
    assert d <= 1e-6, f"rows_of_shards: shard grad differs by {d:.3g}"
    return "rows of shards ok"


def run_all(ps: ParallelState):
    return [check_tp_equivalence(ps), check_native_recompute(ps), check_pruned_last_layer(ps)]


def check_compiled_tp(ps: ParallelState, backend: str = "aot_eager"):
    """Each layer's two halves torch.compile'd (as train.compile does; Inductor on GPU) at TP>1, ±
    sequence parallel, ± the fused-epilogue layout (biases handed to the epilogues), and the last layer
    pruned to the MLM targets: the TP collectives trace with no graph break, and loss, logits and every
    grad match TP=1 eager (keyed dropout on: its masks do not depend on the layout)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    cfg = tiny_config(num_layers=1)
    batch = make_batch()
    ref = MegatronBertForPreTraining(cfg, ParallelState.single(), ModelRuntime(seed=7))
    out_ref = _run(ref, batch)
    report = {}
    targets = target_positions(batch["labels"])
    for sp, fuse, pruned in ((False, False, False), (True, False, False), (True, True, False), (False, True, True),
                             (True, True, True)):
        label = f"sp={sp},fuse={fuse}" + (",pruned" if pruned else "")
        torch._dynamo.reset()
        counters.clear()
        model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=7, sequence_parallel=sp, fuse_elementwise=fuse))
        for layer in model.bert.encoder.layers:
            layer.compile_halves(None, backend)
        if pruned:  # the one layer is the last: its row halves compile (loss and grads compared)
            out = _run(model, batch, target_positions=targets)
            out.prediction_logits = None
        else:
            out = _run(model, batch)
        breaks = dict(counters["graph_break"])
        assert not breaks, f"{label}: graph breaks in the compiled halves: {breaks}"
        assert counters["stats"]["unique_graphs"] >= 2, f"{label}: nothing was compiled ({dict(counters['stats'])})"
        report[label] = _compare(ps, model, ref, out, out_ref, f"compiled {label}")
    return report


def check_flash_attention_tp(ps: ParallelState):
    """Run by tests/kernel_checks.py in Triton's interpreter on 2 gloo ranks: SelfAttention's path on our
    attention kernels at TP>1, ± sequence parallel (the column-parallel projection, then flash_attention
    on this rank's heads), against TP=1's SDPA path with the same weights, fp32. Without dropout the
    output and every grad match; with it, each rank's output is the float64 reference's on the mask
    that ``drop_bits`` draws from the step's seed salted with the TP rank."""
    from megatron_bert.model import attention_kernels, drop_mask_kernels, dropout_kernels
    from megatron_bert.model.dropout import DropoutContext
    from megatron_bert.model.transformer import SelfAttention
    from parallel.init import normal_init

    attention_kernels.supports = lambda *_: True  # fp32 here: the interpreter's dot takes fp32 operands
    s, b, heads, hd = 32, 2, 4, 16
    g = torch.Generator().manual_seed(3)
    x, dout = torch.randn(s, b, heads * hd, generator=g), torch.randn(s, b, heads * hd, generator=g)
    mask = torch.ones(b, 1, 1, s, dtype=torch.bool)
    mask[0, ..., s - 9:] = False  # a padded sample

    def build(state, sp, p):
        cfg = ModelConfig(hidden_size=heads * hd, num_attention_heads=heads, num_layers=1, vocab_size=128,
                          attention_dropout=p)
        inits = [normal_init(0.08, torch.Generator().manual_seed(k)) for k in (1, 2)]
        attn = SelfAttention(cfg, ModelRuntime(sequence_parallel=sp, dropout_impl="native"), state, 0, *inits)
        for bias in (attn.query_key_value.bias, attn.dense.bias):  # the same nonzero biases at any TP
            n = bias.numel() * (state.tp_size if is_tp_sharded(bias) else 1)
            full = torch.randn(n, generator=torch.Generator().manual_seed(n))
            bias.data.copy_(shard_of(full, 0, state.tp_rank, state.tp_size) if is_tp_sharded(bias) else full)
        return attn

    def shard(t, sp):
        return shard_of(t, 0, ps.tp_rank, ps.tp_size) if sp else t

    ref = build(ParallelState.single(), False, 0.0)
    xr = x.clone().requires_grad_()
    out_ref = ref(xr, mask, DropoutContext(True, "native", 0, None, s, 0))
    out_ref.backward(dout)
    ref_grads = dict(ref.named_parameters())
    report = {}
    for sp in (False, True):
        attn = build(ps, sp, 0.0)
        attn.flash = True
        dctx = DropoutContext(True, "native", 0, None, s, ps.tp_rank * s // ps.tp_size if sp else 0)
        xt = shard(x, sp).clone().requires_grad_()
        out = attn(xt, mask, dctx)
        out.backward(shard(dout, sp))
        allreduce_sequence_parallel_grads(attn.parameters(), ps)
        worst = _close_all(f"flash TP sp={sp}", [("output", out, shard(out_ref, sp)), ("d input", xt.grad, shard(xr.grad, sp))]
                           + [(n, p_.grad, shard_of(ref_grads[n].grad, p_.partition_dim, ps.tp_rank, ps.tp_size)
                               if is_tp_sharded(p_) else ref_grads[n].grad) for n, p_ in attn.named_parameters()])
        # dropout: this rank's mask is drop_bits(seed, salt = TP rank), the seed from the default generator
        p = 0.25
        attn = build(ps, sp, p)
        attn.flash = True
        torch.manual_seed(11)
        with torch.no_grad():
            out = attn(shard(x, sp), mask, dctx)
            torch.manual_seed(11)
            seed = dropout_kernels.draw_seed(torch.device("cpu"))
            mixed = attn.query_key_value(shard(x, sp)).double()  # [s, b, heads_local · 3 · hd]
            hl = heads // ps.tp_size
            bits = drop_mask_kernels.drop_bits(seed, b * hl * s, s, p, ps.tp_rank)
            ctx = attention_kernels.reference(mixed, mask[:, 0, 0, :], bits, hl, hd, p)
            want = attn.dense(ctx.float())
        worst = max(worst, _close_all(f"flash TP sp={sp} p={p}", [("output", out, want)]))
        report[f"sp={sp}"] = worst
    return report


def _close_all(label, triples, tol=TOL):
    worst = 0.0
    for name, got, want in triples:
        assert got is not None and got.shape == want.shape, f"{label}: {name} missing or misshapen"
        d = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()  # relative to its largest
        assert d <= tol, f"{label}: {name} differs by {d:.3g} (relative)"
        worst = max(worst, d)
    return worst
