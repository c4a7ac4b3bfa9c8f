"""Rank-side checks for test_tp8.py: TP=8 on 8 gloo ranks (tiny model), then the same checkpoint
resumed at TP=4 × DP=2 inside the same processes."""
from __future__ import annotations

import torch

from megatron_bert.checkpoint import load_checkpoint, save_checkpoint
from megatron_bert.config import ModelRuntime
from megatron_bert.model import MegatronBertForPreTraining
from parallel import ParallelState, allreduce_sequence_parallel_grads
from parallel.init import is_tp_sharded, shard_of

from model_checks import make_batch, tiny_config

TOL = 1e-5


def _cfg():
    return tiny_config(hidden_size=64, num_attention_heads=8)


def run(ps: ParallelState, ckpt_dir: str):
    cfg = _cfg()
    batch = make_batch(b=4, s=16)
    ref = MegatronBertForPreTraining(cfg, ParallelState.single(), ModelRuntime(seed=11))
    out_ref = ref(**batch)
    out_ref.loss.backward()

    # TP=8 with sequence parallel and dropout on equals TP=1
    model = MegatronBertForPreTraining(cfg, ps, ModelRuntime(seed=11, sequence_parallel=True))
    out = model(**batch)
    out.loss.backward()
    allreduce_sequence_parallel_grads(model.parameters(), ps)
    d = abs(out.loss.item() - out_ref.loss.item())
    assert d <= TOL, f"TP=8 loss differs from TP=1 by {d:.3g}"
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g = ref_params[name].grad
        if is_tp_sharded(p):
            g = shard_of(g, p.partition_dim, ps.tp_rank, ps.tp_size)
        diff = (p.grad - g).abs().max().item()
        assert diff <= TOL, f"TP=8 grad of {name} differs by {diff:.3g}"

    # save at TP=8 with an optimizer step taken, resume at TP=4 x DP=2 in the same processes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    save_checkpoint(ckpt_dir, 1, model, opt, ps, {"model": cfg.to_dict(), "consumed_samples": 4})
    with torch.no_grad():
        after_step = model(**batch).loss.item()  # eval of the stepped weights at TP=8 (train mode, same masks)

    ps4 = ParallelState.from_process_group(4, torch.device("cpu"), "gloo")
    # same seed (it also keys the dropout masks), weights wiped: the load must restore every tensor
    model4 = MegatronBertForPreTraining(cfg, ps4, ModelRuntime(seed=11))
    with torch.no_grad():
        for p in model4.parameters():
            p.zero_()
    opt4 = torch.optim.AdamW(model4.parameters(), lr=1e-3)
    _, meta, _ = load_checkpoint(ckpt_dir, model4, opt4, ps4)
    assert meta["saved_tp"] == 8 and meta["saved_dp"] == 1
    with torch.no_grad():
        resumed = model4(**batch).loss.item()
    d = abs(resumed - after_step)
    assert d <= TOL, f"TP=4xDP=2 resume: loss {resumed} vs TP=8 {after_step}"
    # the optimizer moments came along: one more step agrees across layouts
    for st in opt4.state.values():
        assert float(st["step"]) == 1.0
    return {"tp8_loss": out.loss.item(), "resumed": resumed, "tp": ps.tp_size, "tp_after": ps4.tp_size,
            "dp_after": ps4.dp_size}
