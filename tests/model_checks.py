"""Rank-side checks for test_model.py: a TP model against a TP=1 model with the same seed."""
from __future__ import annotations

import torch

from megatron_bert.config import ModelConfig, ModelRuntime
from megatron_bert.model import MegatronBertForPreTraining, gather_lm_logits
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


def _run(model, batch, only_masked=False):
    out = model(**batch, only_masked_logits=only_masked)
    out.loss.backward()
    if model.ps.tp_size > 1:
        allreduce_sequence_parallel_grads(model.parameters(), model.ps)
    return out


def _compare(ps, model, ref, out, out_ref, label):
    worst = 0.0
    d = (out.loss - out_ref.loss).abs().item()
    assert d <= TOL, f"{label}: loss differs by {d:.3g}"
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
    """Native (torch RNG) dropout: recompute replays the tracker streams, so results are identical."""
    cfg = tiny_config()
    batch = make_batch()
    outs = {}
    for recompute in ("none", "selective", "full"):
        torch.manual_seed(3)
        model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=9, dropout_impl="native", recompute=recompute))
        out = _run(model, batch)
        outs[recompute] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()})
    base_loss, base_grads = outs["none"]
    for mode in ("selective", "full"):
        loss, grads = outs[mode]
        assert torch.equal(loss, base_loss), f"native recompute={mode}: loss {loss.item()} != {base_loss.item()}"
        for n, g in grads.items():
            assert torch.equal(g, base_grads[n]), f"native recompute={mode}: grad of {n} differs"
    return "native recompute ok"


def run_all(ps: ParallelState):
    return [check_tp_equivalence(ps), check_native_recompute(ps)]
