"""optim=lamb: the update against the paper's formulas, whole-tensor trust ratios on real gloo ranks (TP
shards and ZeRO slices), and trainer runs at TP=1 and TP=2 × DP=2 (sharded moments) that take the same
steps and resume across layouts."""
import math

import pytest
import torch

from checkpoint_checks import describe, finish, launch
from dist_harness import run_distributed
from lamb_checks import check_lamb
from megatron_bert.training.lamb import Lamb
from parallel import ParallelState
from train_fixtures import base_overrides, build_dataset, metrics, resume_dir


def reference_lamb(ws, grads_per_step, lr, betas, eps, wd, trust):
    """The LAMB update written out per tensor with float64 tensors, one formula per line."""
    b1, b2 = betas
    ws = [w.double().clone() for w in ws]
    m = [torch.zeros_like(w) for w in ws]
    v = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        for i, (w, g) in enumerate(zip(ws, grads)):
            g = g.double()
            m[i] = b1 * m[i] + (1 - b1) * g
            v[i] = b2 * v[i] + (1 - b2) * g * g
            m_hat = m[i] / (1 - b1 ** t)
            v_hat = v[i] / (1 - b2 ** t)
            u = m_hat / (v_hat.sqrt() + eps) + wd[i] * w
            r = 1.0
            if trust[i]:
                wn, un = w.norm().item(), u.norm().item()
                r = wn / un if wn > 0 and un > 0 else 1.0
            ws[i] = w - lr * r * u
    return ws


def test_update_follows_the_formulas():
    g = torch.Generator().manual_seed(3)
    shapes = [(6, 5), (4, 7), (5,), (7,)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    ws.append(torch.zeros(3, 2))  # ‖w‖ = 0: ratio 1
    steps = [[torch.randn(w.shape, generator=g) for w in ws] for _ in range(4)]
    params = [torch.nn.Parameter(w.clone()) for w in ws]
    decayed = [params[0], params[1], params[4]]
    opt = Lamb([{"params": decayed, "weight_decay": 0.05},
                {"params": [params[2], params[3]], "weight_decay": 0.0, "trust_ratio": False}],
               ParallelState.single(), lr=0.02, betas=(0.9, 0.99), eps=1e-6)
    for grads in steps:
        for p, gr in zip(params, grads):
            p.grad = gr.clone()
        opt.step()
    want = reference_lamb(ws, steps, 0.02, (0.9, 0.99), 1e-6, [0.05, 0.05, 0.0, 0.0, 0.05],
                          [True, True, False, False, True])
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=2e-6, atol=2e-7)
    # the trust ratio is doing something: plain Adam (no ratio) lands elsewhere
    adam = reference_lamb(ws, steps, 0.02, (0.9, 0.99), 1e-6, [0.05, 0.05, 0.0, 0.0, 0.05], [False] * 5)
    assert not torch.allclose(adam[0], want[0], atol=1e-3)
    # AdamW's state layout: checkpoints read and write it as they do AdamW's
    st = opt.state[params[0]]
    assert set(st) == {"step", "exp_avg", "exp_avg_sq"} and float(st["step"]) == 4.0


def test_capturable_steps_equal_eager_ones_and_skip_on_the_device():
    """The CUDA-graph mode (step counts, LR, ratios on the device; grad_scale / found_inf from the trainer)
    against the eager mode driven as the trainer drives it (grads times the clip coefficient, the step
    not called when non-finite): step 2 has NaN grads and is skipped, step 3 clipped by 0.5."""
    g = torch.Generator().manual_seed(4)
    shapes = [(6, 5), (5,), (3, 4)]
    ws = [torch.randn(s, generator=g) for s in shapes]
    plan = [(1.0, True), (1.0, False), (0.5, True), (1.0, True)]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in plan]
    grads[1][0][2, 3] = float("nan")
    grads[1][2][0, 0] = float("inf")

    def make(capturable):
        params = [torch.nn.Parameter(w.clone()) for w in ws]
        groups = [{"params": [params[0], params[2]], "weight_decay": 0.05},
                  {"params": [params[1]], "weight_decay": 0.0, "trust_ratio": False}]
        lr = torch.tensor(0.02) if capturable else 0.02
        return params, Lamb(groups, ParallelState.single(), lr=lr, betas=(0.9, 0.99), capturable=capturable)

    (pe, eager), (pc, graph) = make(False), make(True)
    for (coef, finite), step in zip(plan, grads):
        for p, gr in zip(pe, step):
            p.grad = gr.clone() * coef
        if finite:
            eager.step()
        for p, gr in zip(pc, step):
            p.grad = gr.clone()
        graph.grad_scale = torch.tensor(1.0 / coef)
        graph.found_inf = torch.tensor(0.0 if finite else 1.0)
        graph.step()
    for a, b in zip(pe, pc):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            # (β1·m + (1-β1)·g against a lerp, g / (1/c) against g·c: last-bit differences)
            torch.testing.assert_close(graph.state[b][key], eager.state[a][key], rtol=1e-5, atol=1e-7)
        assert float(graph.state[b]["step"]) == float(eager.state[a]["step"]) == 3.0
    assert all(torch.isfinite(p).all() for p in pc)


def test_trust_ratios_use_whole_tensor_norms_on_tp2_dp2_gloo():
    results = run_distributed(4, 2, check_lamb)
    for r in results:
        assert r["max_err"] < 1e-6, r
        assert r["local_differs"], "local norms must give other steps (or the check cannot fail)"
        assert r["nan_everywhere"], r


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("lamb_data"))


def _steps(run_dir, steps):
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(steps), [r["step"] for r in rows]
    return [(r["loss"], r["grad_norm"]) for r in rows]


def test_lamb_runs_agree_across_layouts_and_resume(dataset, tmp_path):
    """fp32 with (keyed) dropout, lr 1e-2 so that the trust ratios shape the steps: TP=1 against TP=2 × DP=2
    with sequence parallelism and the distributed optimizer (1e-5); then the sharded run's step-3 checkpoint
    resumed at TP=1 unsharded continues as the TP=1 run did, and an AdamW run resumes from it too (the
    moments are AdamW's layout)."""
    def ov(name, **extra):
        return base_overrides(dataset, tmp_path / name, **{"optim": "lamb", "train.lr": 1e-2,
                                                           "checkpoint.save_interval": 3, **extra})

    runs = {"tp1": (1, ov("tp1")),
            "tp2_dp2_zero": (4, ov("tp2_dp2_zero", **{"parallel.tensor": 2, "parallel.sequence_parallel": True,
                                                      "optim.distributed_optimizer": True}))}
    res = finish({k: launch(o, nproc=n) for k, (n, o) in runs.items()}, timeout=420)
    for k in runs:
        assert res[k][0] == 0, f"{k}: {describe(res[k])}"
    ref = _steps(tmp_path / "tp1", range(1, 7))
    for (loss, norm), (want_loss, want_norm) in zip(_steps(tmp_path / "tp2_dp2_zero", range(1, 7)), ref):
        assert loss == pytest.approx(want_loss, rel=1e-5) and norm == pytest.approx(want_norm, rel=1e-4)
    assert ref[-1][0] < ref[0][0] and all(math.isfinite(x) for x, _ in ref)
    again = resume_dir(tmp_path / "tp2_dp2_zero" / "checkpoints", tmp_path / "resumed", step=3)
    resume_dir(tmp_path / "tp2_dp2_zero" / "checkpoints", tmp_path / "adamw", step=3)
    res = finish({"resumed": launch(ov("resumed")), "adamw": launch(ov("adamw", optim="adamw"))})
    for k, (code, stdout, _) in res.items():
        assert code == 0, f"{k}: {describe(res[k])}"
        assert "resumed from" in stdout and "saved at TP=2 DP=2, now TP=1 DP=1" in stdout, k
    for (loss, _), (want, _) in zip(_steps(again, range(4, 7)), ref[3:]):
        assert loss == pytest.approx(want, rel=1e-5)
    adamw = _steps(tmp_path / "adamw", range(4, 7))
    assert adamw[0][0] == pytest.approx(ref[3][0], rel=1e-5)  # the same weights at step 3 ...
    assert adamw[1][0] != pytest.approx(ref[4][0], rel=1e-5)  # ... then another optimizer's steps
