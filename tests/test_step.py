"""The pieces that keep a training step free of host decisions (so CUDA graphs can capture it):
padded MLM target positions, the device-side clip coefficient, the skip of non-finite steps and
the device-tensor learning rate, and the LR schedules' shapes. All on CPU; tests/test_gpu.py replays the
captured step."""
import math
import types

import pytest
import torch
from omegaconf import OmegaConf

import model_checks
from megatron_bert.config import ModelRuntime
from megatron_bert.model import MegatronBertForPreTraining
from megatron_bert.training.config import Schema
from megatron_bert.training.optim import LRSchedule, step_if_finite
from megatron_bert.training.pretrain import PretrainTask
from parallel import ParallelState
from parallel.grads import clip_coefficient


def _task(device: str, masked_lm_prob=0.15, prune=True):
    cfg = OmegaConf.structured(Schema)
    cfg.data.masked_lm_prob = masked_lm_prob
    cfg.train.prune_last_layer = prune
    ps = types.SimpleNamespace(device=torch.device(device))
    return PretrainTask(cfg, ps, print)


def _collated(b=4, s=20, picks_per_row=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (b, s), generator=g)
    labels = torch.full((b, s), -100)
    for i in range(b):
        pos = 1 + torch.randperm(s - 1, generator=g)[:picks_per_row - (i == 2)]  # sample 2: one fewer
        labels[i, pos] = ids[i, pos]
    mask = torch.ones(b, s, dtype=torch.long)
    return dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=mask, labels=labels,
                binary_label=torch.zeros(b, dtype=torch.long), sample_id=torch.arange(b))


def test_inputs_name_each_samples_targets_in_order_padded_to_a_fixed_count_on_gpu():
    mb = _collated(picks_per_row=2)
    gpu, cpu = _task("cuda").model_inputs(mb), _task("cpu").model_inputs(mb)
    assert "lm_positions" not in gpu
    assert cpu["target_positions"].shape == (4, 2)  # the most targets of a sample
    assert gpu["target_positions"].shape == (4, math.ceil(20 * 0.15))  # the masking budget: static shapes
    for i in range(4):
        want = (mb["labels"][i] != -100).nonzero().squeeze(1)
        for got in (cpu["target_positions"][i], gpu["target_positions"][i]):
            assert torch.equal(got[:want.numel()], want) and (got[want.numel():] == -1).all()
    assert gpu["attention_mask"] is None  # no padding → no mask (flash attention)
    mb["attention_mask"][1, -2:] = 0
    assert _task("cuda").model_inputs(mb)["attention_mask"] is mb["attention_mask"]


def test_gpu_inputs_unpruned_pad_mlm_targets_to_a_fixed_count_with_unlabelled_positions():
    mb = _collated()
    gpu, cpu = _task("cuda", prune=False).model_inputs(mb), _task("cpu", prune=False).model_inputs(mb)
    cap = 4 * math.ceil(20 * 0.15)
    assert "target_positions" not in gpu
    assert cpu["lm_positions"].numel() == 11 and gpu["lm_positions"].numel() == cap
    assert torch.equal(gpu["lm_positions"][:11], cpu["lm_positions"])
    flat = mb["labels"].reshape(-1)
    assert (flat[gpu["lm_positions"][11:]] == -100).all()


@pytest.mark.parametrize("prune", [True, False])
def test_more_targets_than_the_capacity_are_kept_not_cut(prune):
    mb = _collated(picks_per_row=6)  # over ceil(20 * 0.15) = 3 per sample: shapes change, nothing is lost
    x = _task("cuda", prune=prune).model_inputs(mb)
    assert (x["target_positions"] >= 0).sum() == 23 if prune else x["lm_positions"].numel() == 23


def test_padded_target_positions_change_neither_loss_nor_gradients():
    cfg = model_checks.tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
    batch = model_checks.make_batch()
    flat = batch["labels"].reshape(-1)
    positions = (flat != -100).nonzero().squeeze(1)
    filler = (flat == -100).nonzero()[0]
    padded = torch.cat([positions, filler.expand(7)])
    runs = []
    for pos in (positions, padded):
        model = MegatronBertForPreTraining(cfg, ParallelState.single(), ModelRuntime(seed=5))
        out = model(**batch, only_masked_logits=True, lm_positions=pos)
        out.loss.backward()
        runs.append((out.lm_loss_sum.detach(), out.lm_tokens, [p.grad.clone() for p in model.parameters()]))
    (s0, t0, g0), (s1, t1, g1) = runs
    assert int(t0) == int(t1) == positions.numel()
    torch.testing.assert_close(s1, s0, rtol=1e-6, atol=1e-6)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_clip_coefficient_on_the_device():
    assert clip_coefficient(torch.tensor(4.0), 1.0).item() == pytest.approx(0.25, rel=1e-5)
    assert clip_coefficient(torch.tensor(0.5), 1.0).item() == 1.0
    assert clip_coefficient(torch.tensor(float("nan")), 1.0).item() == 1.0
    assert clip_coefficient(torch.tensor(float("inf")), 1.0).item() == 1.0
    assert clip_coefficient(torch.tensor(4.0), 0.0).item() == 1.0  # clipping off


def _param(value, grad):
    p = torch.nn.Parameter(torch.full((8,), value))
    p.grad = torch.full((8,), grad)
    return p


@pytest.mark.parametrize("fused", [False, True])
def test_step_if_finite_clips_and_skips(fused):
    """The plain loop (CPU default) scales grads then decides on the host; torch's fused AdamW (the GPU
    path, also available on CPU) unscales and skips inside its kernel. Both must agree."""
    def run(coef, finite):
        p = _param(1.0, 2.0)
        opt = torch.optim.AdamW([p], lr=0.1, fused=fused, foreach=None if fused else False)
        step_if_finite(opt, [p], torch.tensor(coef), torch.tensor(finite))
        return p.detach().clone(), opt

    skipped, opt = run(0.5, False)
    assert torch.equal(skipped, torch.full((8,), 1.0))
    assert not opt.state or float(opt.state[opt.param_groups[0]["params"][0]]["step"]) == 0.0
    clipped, _ = run(0.5, True)
    reference = _param(1.0, 1.0)  # the same step on grads already multiplied by 0.5
    ref_opt = torch.optim.AdamW([reference], lr=0.1, foreach=False)
    ref_opt.step()
    torch.testing.assert_close(clipped, reference.detach(), rtol=1e-6, atol=1e-7)


def test_lr_schedule_fills_a_device_tensor_lr_in_place():
    p = torch.nn.Parameter(torch.zeros(3))
    lr = torch.tensor(1.0)
    opt = torch.optim.AdamW([p], lr=lr, fused=True)
    sched = LRSchedule(1e-3, total_steps=10, warmup_steps=2)
    assert sched.apply(opt, 0) == pytest.approx(5e-4)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(5e-4)


def test_lr_schedules_warm_up_then_follow_their_shapes():
    """Every schedule: linear warmup to lr over 4 steps, then its own shape down to min_lr at step 20."""
    lr, lo, total, warm = 1.0, 0.1, 20, 4

    def at(style, step, **kw):
        return LRSchedule(lr, total, warm, style, lo, **kw)(step)

    for style in ("linear", "cosine", "constant", "wsd", "inverse_sqrt"):
        assert [at(style, s) for s in range(warm)] == pytest.approx([0.25, 0.5, 0.75, 1.0]), style
    assert at("linear", 12) == pytest.approx(lo + (lr - lo) * (1 - 8 / 16))
    assert at("cosine", 12) == pytest.approx(lo + (lr - lo) * 0.5 * (1 + math.cos(math.pi * 8 / 16)))
    assert at("constant", 19) == lr
    assert at("inverse_sqrt", 15) == pytest.approx(math.sqrt(4 / 16)) and at("inverse_sqrt", 10_000) == lo
    # wsd: stable until the last 5 steps, then each decay shape from lr towards min_lr
    for shape, left in (("linear", lambda p: 1 - p), ("cosine", lambda p: 0.5 * (1 + math.cos(math.pi * p))),
                        ("1-sqrt", lambda p: 1 - math.sqrt(p))):
        got = [at("wsd", s, decay_steps=5, decay_style=shape) for s in range(warm, total + 1)]
        want = [lr] * 11 + [lo + (lr - lo) * left(k / 5) for k in range(5)] + [lo]
        assert got == pytest.approx(want), shape
    # a decay longer than what follows the warmup starts right after it
    assert at("wsd", warm, decay_steps=100) == pytest.approx(lr) and at("wsd", 12, decay_steps=100) == at("linear", 12)


def test_the_trainer_applies_the_wsd_schedule_it_logs(tmp_path):
    """optim.lr_schedule=wsd from the command line: the lr of each logged step is the schedule's for it."""
    from train_fixtures import base_overrides, build_dataset, metrics, train

    data = build_dataset(tmp_path / "data")
    res = train(base_overrides(data, tmp_path / "run", **{
        "optim.lr_schedule": "wsd", "optim.decay_fraction": 0.5, "optim.decay_style": "1-sqrt", "optim.min_lr": 1e-4}))
    assert res.returncode == 0, res.stderr[-3000:]
    sched = LRSchedule(1e-3, 6, 2, "wsd", 1e-4, decay_steps=3, decay_style="1-sqrt")
    assert [r["lr"] for r in metrics(tmp_path / "run")] == pytest.approx([sched(s) for s in range(6)], rel=1e-12)
    assert [round(sched(s), 8) for s in range(6)] == [5e-4, 1e-3, 1e-3, 1e-3, round(1e-4 + 9e-4 * (1 - (1 / 3) ** 0.5), 8),
                                                      round(1e-4 + 9e-4 * (1 - (2 / 3) ** 0.5), 8)]


def test_trainer_steps_are_the_same_with_the_last_layer_pruned(tmp_path):
    """Through the trainer (host-side inputs, forward/backward over micro-batches, AdamW): the last layer
    pruned to [CLS] + the MLM targets gives the losses of the full last layer, keyed dropout on (CPU)."""
    from gpu_steps import run_steps, small_config

    def run(prune: bool):
        cfg = small_config(3, global_batch_size=4, micro_batch_size=2, device="cpu", precision="fp32",
                           prune_last_layer=prune)
        cfg.run_dir = str(tmp_path / f"prune_{prune}")
        cfg.model.update(num_layers=2, hidden_size=64, num_attention_heads=4)
        cfg.data.update(seq_length=32)
        losses, trainer = run_steps(cfg, ParallelState.single(), 3)
        inputs = next(trainer.task.train_batches(0))[0]
        assert ("target_positions" in inputs) == prune and ("lm_positions" in inputs) != prune
        return losses

    full, pruned = run(False), run(True)
    assert abs(pruned[0] - full[0]) <= 1e-6 * full[0], (full, pruned)  # the same weights: rounding only
    for a, b in zip(full, pruned):  # later steps: AdamW after grads a few ulps apart
        assert abs(a - b) <= 1e-5 * a, (full, pruned)
