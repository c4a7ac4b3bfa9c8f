"""GPU test of optim=lamb (skipped without CUDA): the CUDA step (multi-tensor kernels, per-tensor trust
ratios as device tensors) against the CPU step on the same tensors, and a bf16 trainer run with it."""
import pytest
import torch

from megatron_bert.training.lamb import Lamb
from parallel import ParallelState

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _steps(device):
    g = torch.Generator().manual_seed(5)
    shapes = [(1024, 4099), (4099,), (37, 4099), (37,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    grads = [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(3)]
    opt = Lamb([{"params": [params[0], params[2]], "weight_decay": 0.01},
                {"params": [params[1], params[3]], "weight_decay": 0.0, "trust_ratio": False}],
               ParallelState.single(device), lr=1e-2)
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr.clone()
        opt.step()
    return [p.detach().cpu() for p in params]


def test_cuda_step_matches_cpu():
    for got, want in zip(_steps(torch.device("cuda", 0)), _steps(torch.device("cpu"))):
        # fp32 rounding of values ~1-4 over three steps (norms summed in another order; c2: 1.4e-6 seen)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=5e-6)


def test_bf16_trainer_run_with_lamb(tmp_path):
    from train_fixtures import base_overrides, build_dataset, metrics, train

    data = build_dataset(tmp_path / "data")
    run = tmp_path / "run"
    res = train(base_overrides(data, run, **{"optim": "lamb", "train.device": "cuda", "train.precision": "bf16",
                                             "train.lr": 1e-2, "train.max_steps": 8}))
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_graphed_lamb_steps_match_eager_ones():
    """train.cuda_graph with optim=lamb: the capturable LAMB (device step counts, LR and ratios; the
    trainer's grad_scale / found_inf) replayed in the captured step gives the eager run's losses."""
    from gpu_steps import run_steps, small_config

    def losses(graph: bool):
        cfg = small_config(7, global_batch_size=16, micro_batch_size=8, lr=1e-3, cuda_graph=graph)
        cfg.model.update(hidden_dropout=0.0, attention_dropout=0.0)
        cfg.optim.update(name="lamb", eps=1e-6, warmup_steps=0, lr_schedule="constant")
        return run_steps(cfg, ParallelState.single(torch.device("cuda", 0)), 7)

    eager, t_eager = losses(False)
    graphed, trainer = losses(True)
    assert not t_eager.optimizer.optimizer.capturable and trainer.optimizer.optimizer.capturable
    assert trainer.step_graphs is not None and len(trainer.step_graphs.graphs) >= 1
    for step, (a, b) in enumerate(zip(eager, graphed), 1):
        assert abs(a - b) <= 2e-3 * abs(a), f"step {step}: graphed loss {b} vs eager {a}"
    assert graphed[-1] < graphed[0]
