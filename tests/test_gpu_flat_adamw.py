"""GPU tests of the flat AdamW (megatron_bert/training/flat_adamw.py; skipped without CUDA + Triton): the
Triton kernel against torch's fused AdamW (today's GPU path) and, bit for bit, against the same update in
torch ops; the deferred grad copy (bf16 grads read in place) bit for bit against the copy; a CUDA-graph
capture of a flat step (copied or deferred grads) replayed against eager steps; the trainer with and
without it (MEGATRON_BERT_FLAT_ADAMW=0)."""
import pytest
import torch

from megatron_bert.training import flat_adamw
from megatron_bert.training.flat_adamw import FlatAdamW
from megatron_bert.training.optim import LRSchedule, MasterWeightsOptimizer, build_optimizer, step_if_finite

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not flat_adamw.available(), reason="needs a CUDA GPU and Triton")]

LR, WD, BETAS, EPS = 1e-3, 0.01, (0.9, 0.999), 1e-8
# step -> (clip coefficient, finite): grad_scale = 1 / coef != 1 on steps 1-3, step 2 skipped (non-finite)
PLAN = {0: (1.0, True), 1: (0.5, True), 2: (0.3, False), 3: (0.3, True), 4: (1.0, True)}
SCHEDULE = LRSchedule(LR, total_steps=5, warmup_steps=2)


def _model(seed=0):
    torch.manual_seed(seed)
    dev = torch.device("cuda", 0)
    # ~4.4M params over several Triton programs; sizes that are no multiple of the block or the alignment
    m = torch.nn.ModuleDict({"a": torch.nn.Linear(1024, 4099), "ln": torch.nn.LayerNorm(4099),
                             "b": torch.nn.Linear(4099, 37)})
    return m.to(dev, torch.bfloat16)


def _make(model, substitute):
    # what the trainer builds on GPU with train.cuda_graph (fused, capturable, the LR a device tensor)
    return build_optimizer(model, LR, WD, BETAS, EPS, torch.device("cuda", 0), substitute, capturable=True)


def _grads(model, step, micro=2):
    g = torch.Generator(device="cuda").manual_seed(100 + step)
    return [[(torch.randn(p.shape, device=p.device, generator=g) * (i + 1)).to(torch.bfloat16)
             for p in model.parameters()] for i in range(micro)]


def _step(model, opt, grads, coef, finite, fresh=False):
    """``fresh``: each grad a new tensor, as autograd's (a capture then sees addresses of its own)."""
    opt.zero_grad()
    for mb in grads:
        for p, g in zip(model.parameters(), mb):
            p.grad = g.clone() if fresh else g
        opt.accumulate_grads()
    step_if_finite(opt, opt.masters, coef, finite)


def _state(model, opt):
    out = []
    for p in model.parameters():
        m = opt.master_of[p]
        st = opt.state[m]
        out.append((m.detach().clone(), st["exp_avg"].clone(), st["exp_avg_sq"].clone(), st["step"].clone(),
                    p.detach().clone()))
    return out


def _run(opt_kind: str, micro: int = 2, defer: bool = False):
    model = _model()
    opt = MasterWeightsOptimizer(model, _make, flat=opt_kind != "torch-fused")
    if opt_kind == "flat-torch":
        opt.optimizer.impl = "torch"
    if defer:
        assert opt.enable_deferred_copy()
    states = []
    for step, (coef, finite) in PLAN.items():
        SCHEDULE.apply(opt, step)
        _step(model, opt, _grads(model, step, micro), torch.tensor(coef, device="cuda"),
              torch.tensor(finite, device="cuda"))
        states.append(_state(model, opt))
    return model, opt, states


def test_triton_flat_adamw_matches_torch_fused_adamw():
    _, ref, ref_states = _run("torch-fused")
    model, flat, flat_states = _run("flat-triton")
    assert isinstance(flat.optimizer, FlatAdamW) and flat.optimizer.impl == "triton" and flat.optimizer.exact
    for step, (rs, fs) in enumerate(zip(ref_states, flat_states)):
        for k, (r, f) in enumerate(zip(rs, fs)):
            # torch's CUDA kernel forms 1 - beta in fp32 from an fp32 beta: 1 - 0.999f = 0.00099998713,
            # 1.3e-5 off the 0.001 that ours (and torch's CPU AdamW) use, so exp_avg_sq differs by that
            # factor (measured on H200: 1.29e-5 of scale); 1 - 0.9f is 3.6e-7 off, within 8 ulps. Each
            # update (at most ~LR per element) then moves by up to ~1e-5 of itself: the masters may drift
            # apart by that much per step on top of rounding.
            for what, a, b, tol, slack in zip(("master", "exp_avg", "exp_avg_sq"), r, f,
                                              (8 * 2.0**-23, 8 * 2.0**-23, 2e-5), (2e-5 * LR * (step + 1), 0, 0)):
                scale = max(a.abs().max().item(), 1e-30)
                diff = (a - b).abs().max().item()
                assert diff <= tol * scale + slack, f"step {step} tensor {k} {what}: {diff:.3g} (scale {scale:.3g})"
            assert torch.equal(r[3], f[3]), f"step {step} tensor {k}: step count {r[3]} vs {f[3]}"
            assert torch.equal(f[4], f[0].to(torch.bfloat16)), f"step {step} tensor {k}: weight != rounded master"
    assert float(flat_states[-1][0][3]) == 4.0  # five steps, one skipped
    skipped_before, skipped_after = flat_states[1], flat_states[2]
    assert all(torch.equal(a, b) for s, t in zip(skipped_before, skipped_after) for a, b in zip(s, t))
    for p, w in zip(flat.model_params, flat.flat.weights):
        assert p.data_ptr() == w.data_ptr()


def test_triton_kernel_equals_the_torch_implementation_bit_for_bit():
    _, _, tri = _run("flat-triton")
    _, _, ref = _run("flat-torch")
    for step, (ts, rs) in enumerate(zip(tri, ref)):
        for k, (t, r) in enumerate(zip(ts, rs)):
            for what, a, b in zip(("master", "exp_avg", "exp_avg_sq", "step", "weight"), t, r):
                n = int((a != b).sum())
                worst = (a.float() - b.float()).abs().max().item()
                assert n == 0, f"step {step} tensor {k} {what}: {n} elements differ (max {worst:.3g})"


@pytest.mark.parametrize("micro", [1, 2])
def test_the_deferred_grad_copy_steps_bit_for_bit_like_the_copy(micro):
    """enable_deferred_copy: with one micro-batch the table kernel reads the bf16 grads in place; with two
    the first micro-batch's grads go to fp32 when the second comes. Either way the states are those of
    the copying path, bit for bit (the skipped step and the clipping included)."""
    _, _, copied = _run("flat-triton", micro)
    model, opt, deferred = _run("flat-triton", micro, defer=True)
    opt.zero_grad()
    for p, g in zip(model.parameters(), _grads(model, 0, micro)[0]):
        p.grad = g
    opt.accumulate_grads()
    assert (opt.deferred is not None) and opt.flat.grad is None and all(m.grad is None for m in opt.masters)
    for step, (cs, ds) in enumerate(zip(copied, deferred)):
        for k, (c, d) in enumerate(zip(cs, ds)):
            for what, a, b in zip(("master", "exp_avg", "exp_avg_sq", "step", "weight"), c, d):
                assert torch.equal(a, b), f"step {step} tensor {k} {what}: deferred differs from the copy"


@pytest.mark.parametrize("defer", [False, True])
def test_a_flat_step_captured_in_a_cuda_graph_replays_like_eager_steps(defer):
    eager_model, graph_model = _model(), _model()
    eager = MasterWeightsOptimizer(eager_model, _make, flat=True)
    graphed = MasterWeightsOptimizer(graph_model, _make, flat=True)
    if defer:  # one micro-batch, the grads read in place through a pointer table uploaded in the graph
        assert eager.enable_deferred_copy() and graphed.enable_deferred_copy()
    micro = 1 if defer else 2
    static = [[torch.empty_like(g) for g in mb] for mb in _grads(graph_model, 0, micro)]
    coef, finite = torch.ones((), device="cuda"), torch.ones((), dtype=torch.bool, device="cuda")

    def feed(step):
        c, f = PLAN[step % len(PLAN)]
        grads = _grads(graph_model, step, micro)
        for dst, src in zip(static, grads):
            torch._foreach_copy_(dst, src)
        coef.fill_(c)
        finite.fill_(f)
        SCHEDULE.apply(eager, step % len(PLAN))
        SCHEDULE.apply(graphed, step % len(PLAN))
        _step(eager_model, eager, grads, torch.tensor(c, device="cuda"), torch.tensor(f, device="cuda"))

    for step in (0, 1):  # eager warm-up of the graphed optimizer (Triton compiles here)
        feed(step)
        _step(graph_model, graphed, static, coef, finite, fresh=defer)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # deferred: the grads' pointer table is uploaded inside the graph
        _step(graph_model, graphed, static, coef, finite, fresh=defer)
    assert (graphed.deferred is not None) == defer
    if defer:
        assert any(captured for _, _, captured in graphed.flat._pointer_tables.values())
    for step in range(2, 8):  # includes the skipped step (PLAN[2]) and LR changes between replays
        feed(step)
        graph.replay()
        torch.cuda.synchronize()
        for k, (e, g) in enumerate(zip(_state(eager_model, eager), _state(graph_model, graphed))):
            for what, a, b in zip(("master", "exp_avg", "exp_avg_sq", "step", "weight"), e, g):
                assert torch.equal(a, b), f"replay {step}: tensor {k} {what} differs from the eager step"
    counted = sum(PLAN[step % len(PLAN)][1] for step in range(8))  # steps 2 and 7 are skipped
    assert float(graphed.state[graphed.masters[0]]["step"]) == counted == 6
    assert graphed.optimizer.exact


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trainer_losses_with_and_without_the_flat_optimizer(monkeypatch, cuda_graph):
    from gpu_steps import step_losses

    monkeypatch.setenv("MEGATRON_BERT_FLAT_ADAMW", "0")
    base, t0 = step_losses(cuda_graph=False, dropout=0.0)
    assert t0.optimizer.flat is None
    monkeypatch.setenv("MEGATRON_BERT_FLAT_ADAMW", "1")
    flat, t1 = step_losses(cuda_graph=cuda_graph, dropout=0.0)
    assert isinstance(t1.optimizer.optimizer, FlatAdamW) and t1.optimizer.optimizer.exact
    for step, (a, b) in enumerate(zip(base, flat), 1):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: flat loss {b} vs per-tensor {a}"
    assert flat[-1] < flat[0]
