"""GPU tests (skipped without CUDA): TP=2 vs TP=1 losses agree in bf16, eager and compiled (2 GPUs over
NCCL; and TP=2 / TP=4 with the ranks sharing one GPU over gloo); on one GPU the CUDA-graphed step
against the eager one, fresh dropout per replay, the Triton GeLU and LayerNorm kernels, the fused QKV
projection, our attention kernels and their dropout mask, the compiled cross-entropy, a graphed bf16
run with async checkpoints resumed mid-way, the Triton dropout keep-mask (alone) and residual
epilogue (in a compiled layer), the residual epilogue + LayerNorm kernels and the encoder path on
them (its last layer pruned too), pruned-last-layer steps against full ones, compiled graphed steps
against eager ones (bf16 grads read in place), a TP rank's graphed step (fake process group), a
compiled run restarted on a warm Inductor cache, and the word embeddings' Triton backward. The flat
AdamW's GPU tests are in test_gpu_flat_adamw.py, the distributed optimizer's in
test_gpu_distributed_optimizer.py."""
import json
import subprocess
import sys

import pytest
import torch

from train_fixtures import REPO, env, resume_dir

pytestmark = pytest.mark.gpu


def _last_result(stdout: str) -> dict:
    """The last ``RESULT {json}`` line a bench or check script printed."""
    return json.loads([ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1][len("RESULT "):])


def _bench_env(**extra) -> dict:
    """The subprocess environment for bench/ scripts: the repo importable."""
    import os

    e = {**env(), **extra}
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), e.get("PYTHONPATH")]))
    return e


def _tp_check(tp: int, shared_gpu: bool) -> None:
    """tests/gpu_tp_check.py under torchrun: TP=tp vs TP=1 losses, eager (keyed dropout) and compiled."""
    e = {**env(), "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1",
         "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={tp}",
           "tests/gpu_tp_check.py", f"--tp={tp}"] + (["--shared-gpu"] if shared_gpu else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=e, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    r = _last_result(res.stdout)
    for suffix in ("", "_compiled"):  # eager with keyed dropout; train.compile without dropout
        tp1, tpn = r["tp1" + suffix], r["tp" + suffix]
        assert len(tp1) == len(tpn) == 5
        for step, (a, b) in enumerate(zip(tp1, tpn), 1):
            # session 17, ranks sharing one GPU: within 0.09% at TP=2 and TP=4
            assert abs(a - b) <= 5e-3 * abs(a), f"step {step}{suffix}: TP={tp} loss {b} vs TP=1 {a} (bf16, 0.5%)"
        assert tp1[-1] < tp1[0]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_tp2_matches_tp1_in_bf16_on_two_gpus():
    _tp_check(2, shared_gpu=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tp", [2, 4])
def test_tp_ranks_sharing_one_gpu_over_gloo_match_tp1_in_bf16(tp):
    """The GPU paths at TP>1 (our kernels on a rank's heads and vocab shard, sequence parallel, the
    compiled halves with their collectives) on a one-GPU machine: N ranks on cuda:0, gloo between them."""
    _tp_check(tp, shared_gpu=True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
@pytest.mark.parametrize("pad", [True, False])
def test_cuda_graph_step_matches_eager(pad):
    """Without dropout a replayed step computes what the eager step computes, step after step
    (two eager warm-up steps, then the captured graph replays with new batches and a changing model)."""
    from gpu_steps import step_losses

    eager, _ = step_losses(cuda_graph=False, dropout=0.0, pad=pad)
    graphed, trainer = step_losses(cuda_graph=True, dropout=0.0, pad=pad)
    assert trainer.step_graphs.replays == len(graphed) - 2
    assert len(trainer.step_graphs.graphs) == 1
    for step, (a, b) in enumerate(zip(eager, graphed), 1):
        assert abs(a - b) <= 1e-3 * abs(a), f"step {step}: graphed loss {b} vs eager {a}"
    assert graphed[-1] < graphed[0]


@needs_cuda
def test_cuda_graph_replays_draw_fresh_dropout_masks():
    """With the model held still (lr ~ 0) the same batch comes back every other step: its loss must
    change from replay to replay when dropout is on (fresh masks), and must not when it is off."""
    from gpu_steps import step_losses

    with_dropout, trainer = step_losses(cuda_graph=True, dropout=0.1, lr=1e-30, steps=9)
    without, _ = step_losses(cuda_graph=True, dropout=0.0, lr=1e-30, steps=9)
    assert trainer.step_graphs.replays == 7
    same_batch = [2, 4, 6, 8]  # 0-based steps that replay batch 0 of the stream
    assert len({round(without[i], 6) for i in same_batch}) == 1, without
    assert len({round(with_dropout[i], 6) for i in same_batch}) == len(same_batch), with_dropout


@needs_cuda
def test_triton_bias_gelu_matches_exact_gelu_both_ways_and_compiles():
    """Each output within one bf16 ulp of exact GeLU and almost all correctly rounded, tails included
    (where torch's erf form cancels), eager and inside a compiled graph."""
    from kernel_checks import gelu_accuracy

    from megatron_bert.model import gelu_kernels

    assert gelu_kernels.available()
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, n = 4096 + 13, 4096  # a ragged last row block
    x = (3 * torch.randn(rows, n, device="cuda", generator=g)).bfloat16()
    x.view(-1)[:4801] = torch.linspace(-12, 12, 4801, device="cuda").bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    dy = torch.randn(rows, n, device="cuda", generator=g).bfloat16()
    for fn in (gelu_kernels.bias_gelu, torch.compile(lambda u, v: gelu_kernels.bias_gelu(u, v) * 1.0, fullgraph=True)):
        xt, bt = x.clone().requires_grad_(), b.clone().requires_grad_()
        y = fn(xt, bt)
        y.backward(dy)
        wrong = gelu_accuracy(y.detach().cpu(), xt.grad.cpu(), bt.grad.cpu(), x.cpu(), b.cpu(), dy.cpu())
        assert not wrong, wrong


@needs_cuda
def test_every_bias_gelu_tile_shape_is_exact():
    """Each tile shape the autotuner may pick on some machine, forced one at a time: ragged programs
    (rows not a multiple of the row walk or of its sub-blocks) and a column count no tile divides."""
    from kernel_checks import gelu_accuracy

    from megatron_bert.model import gelu_kernels as gk

    g = torch.Generator(device="cuda").manual_seed(1)
    rows, n = 2 * 128 + 37, 1000
    x = (3 * torch.randn(rows, n, device="cuda", generator=g)).bfloat16()
    b = torch.randn(n, device="cuda", generator=g).bfloat16()
    dy = torch.randn(rows, n, device="cuda", generator=g).bfloat16()
    for k in (gk._fwd_kernel, gk._bwd_kernel):  # one forced at a time, the other left to its autotuner
        configs, cache = k.configs, k.cache
        try:
            for cfg in configs:
                k.configs, k.cache = [cfg], {}
                y = gk.bias_gelu(x, b)
                dx, db = gk.bias_gelu_backward(dy, x, b)
                wrong = gelu_accuracy(y.cpu(), dx.cpu(), db.cpu(), x.cpu(), b.cpu(), dy.cpu())
                assert not wrong, f"{k.fn.__name__} {cfg}: {wrong}"
        finally:
            k.configs, k.cache = configs, cache


@needs_cuda
def test_triton_layer_norm_matches_torch_both_ways_eager_and_compiled():
    """Output, statistics and the grads of x, weight and bias against nn.LayerNorm in float64, bf16
    inputs; compiled, the backward (aten's formula on the saved statistics) goes through Inductor."""
    from megatron_bert.model import layernorm_kernels

    assert layernorm_kernels.available()
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, h = 257, 8, 1024
    x = (2 * torch.randn(s, b, h, device="cuda", generator=g) + 0.5).bfloat16()
    dy = torch.randn(s, b, h, device="cuda", generator=g).bfloat16()
    ref = torch.nn.LayerNorm(h, device="cuda", dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(1 + 0.3 * torch.randn(h, device="cuda", generator=g))
        ref.bias.copy_(0.2 * torch.randn(h, device="cuda", generator=g))
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    y64.backward(dy.double())
    want = (y64.detach(), x64.grad, ref.weight.grad, ref.bias.grad)
    for fn in (layernorm_kernels.layer_norm, torch.compile(lambda u, m: layernorm_kernels.layer_norm(u, m) + 0.0)):
        norm = torch.nn.LayerNorm(h, device="cuda", dtype=torch.bfloat16)
        norm.load_state_dict(ref.state_dict())
        xt = x.clone().requires_grad_()
        y = fn(xt, norm)
        y.backward(dy)
        got = (y, xt.grad, norm.weight.grad, norm.bias.grad)
        for name, a, r in zip(("y", "dx", "dweight", "dbias"), got, want):
            assert a.dtype == torch.bfloat16
            rel = ((a.double() - r).norm() / r.norm()).item()
            assert rel < 4e-3, f"{name}: relative error {rel:.3g}"


@needs_cuda
def test_fused_qkv_projection_matches_the_linear_layer_eager_and_compiled():
    """q, k, v of the fused projection equal the linear layer's views; through cuDNN attention (its
    grad strides) the packed backward gives the linear layer's grads of x, W and b."""
    import torch.nn.functional as F

    from megatron_bert.model import qkv_kernels

    assert qkv_kernels.available()
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b, heads, hd = 160, 6, 4, 64  # 960 tokens: 15 blocks of 64
    h = heads * hd
    x = torch.randn(s, b, h, device="cuda", generator=g).bfloat16()
    w = (0.05 * torch.randn(3 * h, h, device="cuda", generator=g)).bfloat16()
    bias = torch.randn(3 * h, device="cuda", generator=g).bfloat16()

    def plain(x, w, bias):
        return F.linear(x, w, bias).view(s, b, heads, 3, hd).permute(3, 1, 2, 0, 4).unbind(0)

    def run(project):
        xt, wt, bt = (t.clone().requires_grad_() for t in (x, w, bias))
        q, k, v = project(xt, wt, bt)
        F.scaled_dot_product_attention(q, k, v).float().pow(2).sum().backward()
        return (q, k, v), (xt.grad, wt.grad, bt.grad)

    want_qkv, want_grads = run(plain)
    fused = lambda x, w, bias: qkv_kernels.project_qkv(x, w, bias, heads, hd)  # noqa: E731
    for project in (fused, torch.compile(fused, fullgraph=True)):
        got_qkv, got_grads = run(project)
        assert all(torch.equal(a, c) for a, c in zip(got_qkv, want_qkv))
        for name, a, c in zip(("x", "W", "b"), got_grads, want_grads):
            assert a.dtype == c.dtype == torch.bfloat16 and a.shape == c.shape
            rel = ((a.float() - c.float()).norm() / c.float().norm()).item()
            assert rel < 1e-2, f"grad of {name}: relative difference {rel:.3g}"


@needs_cuda
def test_compiled_cross_entropy_matches_the_vocab_parallel_function_on_gpu():
    from parallel import vocab_parallel_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(3000, 30592, device="cuda", generator=g)).bfloat16()
    target = torch.randint(0, 30592, (3000,), device="cuda", generator=g)
    target[::7] = -100
    runs = []
    for compiled in (False, True):
        x = logits.clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(x, target, None, compiled=compiled)
        loss.sum().backward()
        runs.append((loss, x.grad.float()))
    (l0, g0), (l1, g1) = runs
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    assert ((g1 - g0).norm() / g0.norm()).item() < 1e-2  # both grads are rounded to bf16


@needs_cuda
def test_cuda_graph_run_saves_in_the_background_and_resumes(tmp_path):
    """The CLI on real (padded) data with train.cuda_graph=true, bf16, async checkpoints (pinned
    staging): a run resumed from its step-6 checkpoint re-captures and continues the same losses."""
    from train_fixtures import base_overrides, build_dataset, metrics, train

    data = build_dataset(tmp_path / "data")
    common = {"train.device": "cuda", "train.precision": "bf16", "train.cuda_graph": "true", "train.max_steps": 12,
              "model.hidden_size": 128, "train.micro_batch_size": 8, "train.global_batch_size": 16,
              "checkpoint.async_save": "true", "checkpoint.save_interval": 6}
    ref_dir = tmp_path / "ref"
    res = train(base_overrides(data, ref_dir, **common))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "train.cuda_graph: captured the training step" in res.stdout + res.stderr
    ckpts = ref_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip().endswith("step_12") and (ckpts / "step_6").is_dir()
    resumed_dir = resume_dir(ckpts, tmp_path / "resumed")
    res = train(base_overrides(data, resumed_dir, **common))
    assert res.returncode == 0, res.stderr[-3000:]
    ref = {r["step"]: r["loss"] for r in metrics(ref_dir)}
    again = {r["step"]: r["loss"] for r in metrics(resumed_dir)}
    assert sorted(again) == list(range(7, 13))
    for step in again:
        assert abs(again[step] - ref[step]) <= 2e-3 * abs(ref[step]), (step, again[step], ref[step])


@needs_cuda
def test_a_tp2_gpu_run_resumes_from_its_checkpoint_at_tp2_and_at_tp1(tmp_path):
    """The CLI at TP=2 + sequence parallel on the GPU (ranks sharing it over gloo), bf16, checkpoint
    at step 6; resumed at TP=2 it continues the same losses, resumed at TP=1 (the shards merged on
    load) it continues them within bf16's TP=1-vs-TP=2 spread."""
    from train_fixtures import base_overrides, build_dataset, metrics, train

    data = build_dataset(tmp_path / "data")
    common = {"train.device": "cuda", "train.precision": "bf16", "train.max_steps": 12, "model.hidden_size": 128,
              "train.micro_batch_size": 8, "train.global_batch_size": 16, "checkpoint.save_interval": 6,
              "parallel.dropout_impl": "keyed"}  # keyed masks do not depend on the layout
    tp2 = {"parallel.tensor": 2, "parallel.sequence_parallel": "true"}
    shared = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
              "tests/shared_gpu_train.py"]

    def run(run_dir, tp2_run: bool):
        ov = base_overrides(data, run_dir, **common, **(tp2 if tp2_run else {}))
        if not tp2_run:
            return train(ov)
        return subprocess.run(shared + ov, capture_output=True, text=True, timeout=300, env=env(), cwd=REPO)

    ref_dir = tmp_path / "ref"
    res = run(ref_dir, True)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = {r["step"]: r["loss"] for r in metrics(ref_dir)}
    assert sorted(ref) == list(range(1, 13)) and ref[12] < ref[1]
    for tp2_run, tol in ((True, 2e-3), (False, 5e-3)):
        resumed_dir = resume_dir(ref_dir / "checkpoints", tmp_path / f"resumed_tp{2 if tp2_run else 1}")
        res = run(resumed_dir, tp2_run)
        assert res.returncode == 0, res.stderr[-3000:]
        again = {r["step"]: r["loss"] for r in metrics(resumed_dir)}
        assert sorted(again) == list(range(7, 13))
        for step in again:
            assert abs(again[step] - ref[step]) <= tol * abs(ref[step]), (tp2_run, step, again[step], ref[step])


@needs_cuda
def test_triton_dropout_keep_mask_statistics_and_determinism():
    """The keep-mask kernel: drop rate p (within 6σ), a pure function of (seed, salt), independent
    streams for the four Philox words of a call and for different salts, ragged tails filled."""
    from megatron_bert.model import dropout_kernels

    assert dropout_kernels.available()
    n = (1 << 24) + 4097  # not a multiple of a program's 4096 bytes
    seed = torch.tensor([20261201], dtype=torch.int64, device="cuda")
    for p in (0.1, 0.5):
        m = dropout_kernels.keep_mask(seed, n, p, 0)
        assert m.dtype == torch.bool and m.shape == (n,)
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(m.float().mean().item() - (1 - p)) < 6 * sigma, (p, m.float().mean().item())
        tail = m[-4097:].float().mean().item()
        assert abs(tail - (1 - p)) < 0.05, tail
    m = dropout_kernels.keep_mask(seed, n, 0.1, 0)
    assert torch.equal(m, dropout_kernels.keep_mask(seed, n, 0.1, 0))
    other = dropout_kernels.keep_mask(seed, n, 0.1, 1)
    assert abs((m != other).float().mean().item() - 2 * 0.1 * 0.9) < 2e-3  # independent: 2p(1-p) differ
    words = m[: (n // 4096) * 4096].view(-1, 4, 1024).float()  # the 4 words of each call, side by side
    both = (words[:, 0] * words[:, 1]).mean().item()
    assert abs(both - 0.9 * 0.9) < 2e-3, both
    fresh = dropout_kernels.keep_mask(dropout_kernels.draw_seed(torch.device("cuda")), n, 0.1, 0)
    assert abs((m != fresh).float().mean().item() - 0.18) < 2e-3


@needs_cuda
def test_compiled_layer_dropout_uses_the_mask_kernel_and_scales_like_torch():
    """A compiled bf16 layer's residual epilogue (the Triton bias + dropout + residual kernels): out =
    residual + keep·y/(1-p) exactly (values 0 or 1/(1-p) for y = 1), drop rate p, the backward applies
    the same mask, passes the residual's grad through and sums the bias grad."""
    from megatron_bert.config import ModelConfig, ModelRuntime
    from megatron_bert.model.dropout import DropoutContext
    from megatron_bert.model.transformer import TransformerLayer
    from parallel import ParallelState
    from parallel.init import normal_init

    ps = ParallelState.single(torch.device("cuda", 0))
    cfg = ModelConfig(num_layers=1, hidden_size=256, num_attention_heads=4, vocab_size=1000, hidden_dropout=0.25)
    rt = ModelRuntime(dropout_impl="native", fuse_elementwise=True)
    layer = TransformerLayer(cfg, rt, ps, 0, normal_init(0.02), normal_init(0.02))
    assert layer.bda_kernel is not None
    dctx = DropoutContext(training=True, impl="native", seed=0, sample_ids=None, seq_len=512, seq_offset=0)
    y = torch.ones(512, 32, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    bias = torch.zeros(256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    residual = torch.zeros_like(y, requires_grad=True)
    out = torch.compile(lambda a, b, r: layer._residual(a, b, r, dctx, 0), fullgraph=True)(y, bias, residual)
    values = set(out.float().unique().tolist())
    assert values == {0.0, torch.tensor(1.0 / 0.75, dtype=torch.bfloat16).item()}, values
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.75) < 3e-3, kept
    out.float().sum().backward()
    torch.testing.assert_close(y.grad.float(), out.float())  # d out / d y = keep / (1 - p)
    assert torch.equal(residual.grad, torch.ones_like(y))
    # the bias grad is the column sum of the (bf16) grad of y, rounded once to bf16
    torch.testing.assert_close(bias.grad.float(), y.grad.float().sum((0, 1)), rtol=4e-3, atol=0)


@needs_cuda
def test_residual_layer_norm_kernels_and_the_encoder_path_built_on_them():
    """The fused residual epilogue + LayerNorm (residual_norm_kernels) at the 345M activation shape and
    a ragged one against float64, both ways; a compiled bf16 encoder on it against its plain path
    (separate epilogue and LayerNorm kernels), dropout off: output and grads agree to bf16 precision."""
    import kernel_checks
    from megatron_bert.config import ModelConfig, ModelRuntime
    from megatron_bert.model.dropout import DropoutContext
    from megatron_bert.model.transformer import TransformerEncoder
    from parallel import ParallelState
    from parallel.init import normal_init

    kernel_checks.check_residual_norm((512, 32, 1024), 0.1, 0, 1, True, "cuda")
    kernel_checks.check_residual_norm((45, 3, 1000), 0.25, 2, 2, False, "cuda")
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=3, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                      hidden_dropout=0.0, attention_dropout=0.0)
    enc = TransformerEncoder(cfg, ModelRuntime(dropout_impl="native", fuse_elementwise=True),
                             ParallelState.single(torch.device("cuda", 0)), normal_init(0.02), normal_init(0.02))
    enc = enc.to(torch.bfloat16)
    assert all(layer.residual_norm for layer in enc.layers)
    for layer in enc.layers:
        layer.compile_halves()
    dctx = DropoutContext(training=True, impl="native", seed=0, sample_ids=None, seq_len=128, seq_offset=0)
    x = torch.randn(128, 8, 256, device="cuda", dtype=torch.bfloat16)
    names, plain, fused_path = kernel_checks.encoder_both_paths(enc, x, None, dctx, torch.randn_like(x))
    for name, a, ref in zip(names, fused_path, plain):
        assert ((a - ref).norm() / ref.norm()).item() < 2e-2, name
    # the last layer at 20 rows per sample ([CLS] and 19 others), compiled, against the full plain path
    g = torch.Generator().manual_seed(1)
    rows = torch.stack([torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(127, generator=g)[:19]])
                        for _ in range(8)]).cuda()
    dout = torch.randn(20, 8, 256, device="cuda", dtype=torch.bfloat16)
    names, plain, fused_path = kernel_checks.encoder_both_paths(enc, x, None, dctx, dout, rows)
    for name, a, ref in zip(names, fused_path, plain):
        assert ((a - ref).norm() / ref.norm()).item() < 2e-2, f"pruned: {name}"


@needs_cuda
def test_pruned_last_layer_steps_match_full_steps():
    """train.prune_last_layer (the default) against the full last layer: compiled, graphed training
    steps (SDPA for the pruned layer's queries, our kernels elsewhere) give the same losses, dropout off."""
    from gpu_steps import step_losses

    full, _ = step_losses(cuda_graph=True, dropout=0.0, compile=True, prune=False)
    pruned, trainer = step_losses(cuda_graph=True, dropout=0.0, compile=True, prune=True)
    assert trainer.step_graphs.replays == len(pruned) - 2
    for step, (a, b) in enumerate(zip(full, pruned), 1):
        assert abs(a - b) <= 2e-3 * abs(a), f"step {step}: pruned loss {b} vs full {a}"
    assert pruned[-1] < pruned[0]


@needs_cuda
def test_compiled_graphed_steps_match_compiled_eager_steps(monkeypatch):
    """train.compile (the Triton epilogue + LayerNorm path) with one micro-batch per step (the bf16
    grads read in place by the flat AdamW) and the step captured as a CUDA graph computes the losses of
    the same model run eagerly, and of the run that copies its grads to fp32 first; dropout off."""
    from gpu_steps import step_losses

    eager, _ = step_losses(cuda_graph=False, dropout=0.0, compile=True, micro_batches=1)
    graphed, trainer = step_losses(cuda_graph=True, dropout=0.0, compile=True, micro_batches=1)
    assert all(layer.residual_norm for layer in trainer.model.bert.encoder.layers)
    assert trainer.optimizer.deferred is not None  # the captured step read the bf16 grads in place
    monkeypatch.setenv("MEGATRON_BERT_DEFER_GRAD_COPY", "0")
    copied, t2 = step_losses(cuda_graph=True, dropout=0.0, compile=True, micro_batches=1)
    assert t2.optimizer.deferred is None
    for step, (a, b, c) in enumerate(zip(eager, graphed, copied), 1):
        assert abs(a - b) <= 2e-3 * abs(a), f"step {step}: graphed loss {b} vs eager {a}"
        assert abs(c - b) <= 1e-4 * abs(c), f"step {step}: in-place grads loss {b} vs copied {c}"
    assert graphed[-1] < graphed[0]


@needs_cuda
def test_a_compiled_run_starts_again_on_a_warm_inductor_cache(tmp_path):
    """The same compiled, graphed 345M-shaped run twice on one Inductor cache: the second start must
    not fail (torch 2.11 could not reload a cached graph holding multi-kernel reductions, which the
    trainer turns on; it now leaves Inductor's FX graph cache off when it does)."""
    e = _bench_env(TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    cmd = [sys.executable, "bench/bench_pretrain.py", "--model", "345m", "--seq", "512", "--batch", "8",
           "--compile", "--cuda-graph", "--warmup", "3", "--iters", "2"]
    for attempt in (1, 2):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e, cwd=REPO)
        assert res.returncode == 0, f"run {attempt}: {res.stderr[-2000:]}"
        assert '"seq_per_s"' in res.stdout


@needs_cuda
@pytest.mark.parametrize("sp", [False, True])
def test_a_tp_rank_step_with_native_dropout_captures_as_a_cuda_graph(sp):
    """One rank of a TP=2 job (bench_pretrain.py --fake-tp: torch's fake process group, collectives
    return at once) with native dropout captures and replays its step. Without SP the pruned last
    layer's attention takes the explicit path, whose mask swapped in the model-parallel generator
    before session 17: the capture failed there ("set_current_seed ... during stream capture")."""
    e = _bench_env()
    cmd = [sys.executable, "bench/bench_pretrain.py", "--model", "base", "--seq", "128", "--batch", "8", "--tp", "2",
           "--fake-tp", "--cuda-graph", "--warmup", "3", "--iters", "2"] + (["--sp"] if sp else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=e, cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    r = _last_result(res.stdout)
    assert r["fake_tp"] and r["tp"] == 2 and r["sp"] == sp and r["dropout"] == "native"
    assert r["graphs_captured"] >= 1


@needs_cuda
def test_triton_attention_is_as_accurate_as_cudnn_and_its_mask_is_bernoulli():
    """Our attention kernels (bf16, the 345M head shape, seq 512) against float64 with the same
    dropout mask: the packed qkv grad and context, and through the projection the grads of x, W and
    the folded bias, no further from float64 than torch's SDPA (cuDNN) is on the same inputs without
    dropout (x 1.25; x 1.5 with dropout, which SDPA's mask cannot be made to match), padded keys too; the mask drawn on the GPU passes the interpreter's statistics
    at 2^20 rows; the bias grad as right over a partial-sum buffer of NaNs with 128-key dk/dv blocks
    (the kernels write every partial row); inside a compiled layer, dropout off, the kernels give the
    cuDNN path's output and grads to bf16 precision."""
    import kernel_checks
    from megatron_bert.config import ModelConfig, ModelRuntime
    from megatron_bert.model import attention_kernels
    from megatron_bert.model.dropout import DropoutContext
    from megatron_bert.model.transformer import TransformerLayer
    from parallel import ParallelState
    from parallel.init import normal_init

    assert attention_kernels.available()
    s, b, heads, hd = 512, 4, 16, 64
    for masked in (False, True):
        bar = kernel_checks.sdpa_errors(s, b, heads, hd, masked, 3, "cuda", torch.bfloat16)
        for p, factor in ((0.0, 1.25), (0.1, 1.5)):  # with dropout: kept terms scaled by 1/(1-p), the rest gone
            ours = kernel_checks.attention_errors(s, b, heads, hd, p, masked, 3, "cuda", torch.bfloat16)
            print("ATTENTION ERRORS", masked, p, {k: f"{ours[k]:.3g} (sdpa {bar[k]:.3g})" for k in bar})
            assert all(ours[k] <= factor * bar[k] + 2e-4 for k in bar), (p, masked, ours, bar)
    wrong = kernel_checks.mask_statistics(1 << 20, 512, 0.1, 5, "cuda")
    assert not wrong, wrong
    # the bias grad over a partial-sum buffer of NaNs, the dk/dv kernel on 128-key blocks
    dirty = kernel_checks.errors_over_dirty_partials(s, b, heads, hd, 0.1, False, 3, "cuda", torch.bfloat16)
    bar = kernel_checks.sdpa_errors(s, b, heads, hd, False, 3, "cuda", torch.bfloat16)
    assert dirty["dbias"] <= 1.5 * bar["dbias"] + 2e-4, (dirty, bar)
    rel = lambda a, r: ((a.double() - r).norm() / r.norm()).item()  # noqa: E731

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=256, num_attention_heads=4, vocab_size=1000,
                      hidden_dropout=0.0, attention_dropout=0.0)
    rt = ModelRuntime(dropout_impl="native", fuse_elementwise=True)
    layer = TransformerLayer(cfg, rt, ParallelState.single(torch.device("cuda", 0)), 0, normal_init(0.02),
                             normal_init(0.02)).to(torch.bfloat16)
    assert layer.attention.flash
    dctx = DropoutContext(training=True, impl="native", seed=0, sample_ids=None, seq_len=128, seq_offset=0)
    x = torch.randn(128, 8, 256, device="cuda", dtype=torch.bfloat16)
    mask = torch.ones(8, 1, 1, 128, dtype=torch.bool, device="cuda")
    mask[1, ..., 100:] = False
    dy = torch.randn_like(x)
    results = []
    for flash in (True, False):
        layer.attention.flash = flash
        layer.zero_grad()
        xt = x.clone().requires_grad_()
        y = torch.compile(lambda a: layer.attention_block(a, mask, dctx))(xt)
        y.backward(dy)
        results.append([y, xt.grad] + [prm.grad for prm in layer.attention.parameters()])
    for i, (a, c) in enumerate(zip(*results)):
        assert rel(a, c.double()) < 2e-2, (i, rel(a, c.double()))


@needs_cuda
def test_triton_embedding_grad_is_the_exact_sum_rounded_and_the_model_uses_it():
    """The word embeddings' backward (embedding_kernels.segment_sums) at the 345M shape on BERT-like ids
    (a [MASK] run of ~2000 tokens across ~30 chunks) in bf16, and ragged shapes in fp16 / fp32: within
    an ulp of the float64 sums (and at 345M of torch's own backward), absent rows zero, the same bits
    twice; the model's word embeddings take it."""
    sys.path.insert(0, str(REPO / "bench"))
    from bench_kernels import bert_like_ids
    from embedding_checks import embedding_grad_errors

    from megatron_bert.model import embedding_kernels

    assert embedding_kernels.available()
    ids = bert_like_ids(512 * 32, 30592).cuda()
    wrong = embedding_grad_errors(ids, 30592, 1024, torch.bfloat16, 0)
    assert not wrong, wrong
    # torch's own backward on the same grads is within an ulp too (in fp16 it is not: 2e-2 off at 1000 tokens)
    grad = torch.randn(ids.numel(), 1024, generator=torch.Generator().manual_seed(0)).bfloat16().cuda()
    w = torch.zeros(30592, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    torch.nn.functional.embedding(ids, w).backward(grad)
    ours = embedding_kernels.segment_sums(ids, grad, 30592).float()
    assert ((ours - w.grad.float()).abs() <= w.grad.float().abs() * 2 ** -7 + 1e-3).all()
    for n, h, dtype in ((1000, 200, torch.float16), (77, 96, torch.float32)):
        ids = torch.randint(0, 50, (n,), device="cuda")
        wrong = embedding_grad_errors(ids, 61, h, dtype, 1)
        assert not wrong, (n, h, dtype, wrong)
    w = torch.randn(50, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, 50, (40, 3), device="cuda")
    grad = torch.randn(40, 3, 64, device="cuda", dtype=torch.bfloat16)
    embedding_kernels.embedding(ids, w).backward(grad)
    ref = torch.zeros(50, 64, dtype=torch.float64).index_add_(0, ids.flatten().cpu(),
                                                              grad.reshape(-1, 64).double().cpu())
    assert ((w.grad.double().cpu() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()
    from megatron_bert.config import ModelConfig
    from megatron_bert.model.bert import MegatronBertModel
    from parallel import ParallelState

    model = MegatronBertModel(ModelConfig(num_layers=1, hidden_size=64, num_attention_heads=2, vocab_size=100),
                              ParallelState.single(torch.device("cuda", 0)))
    assert model.embeddings.word_embeddings.lookup is embedding_kernels.embedding


@needs_cuda
def test_a_profiled_cuda_graph_run_traces_its_kernels_and_keeps_its_losses(tmp_path):
    """train.profile_steps=[1,3] over a train.cuda_graph run (bf16): the window spans the warm-up and
    the capture, the trace holds each step's range and GPU kernels, and the losses are those of the
    same run unprofiled."""
    from train_fixtures import base_overrides, build_dataset, metrics, train

    data = build_dataset(tmp_path / "data")
    common = {"train.device": "cuda", "train.precision": "bf16", "train.cuda_graph": "true", "train.max_steps": 5,
              "model.hidden_size": 128, "train.micro_batch_size": 8, "train.global_batch_size": 16}
    runs = {}
    for name, extra in (("plain", {}), ("profiled", {"train.profile_steps": "[1,3]"})):
        res = train(base_overrides(data, tmp_path / name, **common, **extra))
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = [r["loss"] for r in metrics(tmp_path / name)]
    for a, b in zip(runs["profiled"], runs["plain"]):
        assert abs(a - b) <= 1e-3 * abs(b), runs
    events = json.loads((tmp_path / "profiled" / "profile" / "rank_0.json").read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert {"train_step_1", "train_step_2", "train_step_3"} <= names and "train_step_4" not in names
    assert sum(e.get("cat") == "kernel" for e in events) > 50, {e.get("cat") for e in events}
