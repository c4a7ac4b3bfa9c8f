"""Megatron BERT: TP/SP equivalence with dropout, recompute, every head, and input errors."""
import pytest
import torch

import model_checks
from dist_harness import run_distributed
from megatron_bert.config import ModelConfig, ModelConfigError, ModelRuntime, named_config
from megatron_bert.model import (
    MegatronBertForCausalLM,
    MegatronBertForMaskedLM,
    MegatronBertForMultipleChoice,
    MegatronBertForNextSentencePrediction,
    MegatronBertForPreTraining,
    MegatronBertForQuestionAnswering,
    MegatronBertForSequenceClassification,
    MegatronBertForTokenClassification,
    MegatronBertModel,
)
from parallel import ParallelState

single = ParallelState.single


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_tp1_with_dropout_sp_and_recompute(tp):
    results = run_distributed(tp, tp, model_checks.run_all)
    for report, native, pruned in results:
        assert set(report) == {f"sp={sp},recompute={rc}" for sp in (False, True) for rc in ("none", "full")}
        assert native == "native recompute ok"
        assert len(pruned) == 6


@pytest.mark.parametrize("tp", [2, 4])
def test_rows_of_sequence_shards_are_the_rows_of_the_sequence(tp):
    assert run_distributed(tp, tp, model_checks.check_rows_of_shards) == ["rows of shards ok"] * tp


def test_pruned_last_layer_matches_the_full_model_in_one_process():
    """TP=1: the last layer at [CLS] and the MLM targets only gives the full model's losses, target
    logits and grads (keyed dropout on, padded batch, ± recompute; tests/model_checks.py)."""
    assert len(model_checks.check_pruned_last_layer(single())) == 6


def test_compiled_layers_at_tp2_trace_their_collectives_and_match_tp1():
    """train.compile at TP>1 compiles each layer's halves with the TP collectives inside (Dynamo and
    AOTAutograd here; Inductor generates the kernels on GPU): no graph break, ± sequence parallel, ±
    the fused-epilogue layout, ± the last layer pruned."""
    for report in run_distributed(2, 2, model_checks.check_compiled_tp):
        assert set(report) == {"sp=False,fuse=False", "sp=True,fuse=False", "sp=True,fuse=True",
                               "sp=False,fuse=True,pruned", "sp=True,fuse=True,pruned"}


@pytest.mark.parametrize("env,compiled", [({}, True), ({"MEGATRON_BERT_COMPILE_TP": "0"}, False),
                                         ({"MEGATRON_BERT_ASYNC_TP": "1"}, True)], ids=["default", "tp-off", "async-no-sp"])
def test_train_compile_takes_the_layer_halves_at_tp2_unless_switched_off(monkeypatch, env, compiled):
    from megatron_bert.training.compile_setup import compile_model
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_MULTI_KERNEL", "0")  # leave this process's Inductor settings alone
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ps = ParallelState(tp_size=2, tp_rank=0, world_size=2)  # no process group: nothing runs
    model = MegatronBertForPreTraining(model_checks.tiny_config(num_layers=2), ps, ModelRuntime())
    logs = []
    compile_model(model, "default", ps, False, logs.append)
    for layer in model.bert.encoder.layers:
        for half in ("attention_block", "mlp_block", "attention_block_fused", "mlp_block_fused"):
            assert hasattr(getattr(layer, half), "_torchdynamo_orig_callable") == compiled, half
    assert not inductor_config._micro_pipeline_tp  # async TP needs sequence parallel
    assert len(logs) == (0 if env == {} else 1) and all("\n" not in line for line in logs), logs


def test_recompute_is_exact_in_one_process():
    cfg = model_checks.tiny_config()
    batch = model_checks.make_batch()
    runs = {}
    for recompute in ("none", "selective", "full"):
        model = MegatronBertForPreTraining(cfg, single(), ModelRuntime(seed=5, recompute=recompute))
        out = model(**batch)
        out.loss.backward()
        runs[recompute] = (out.loss.detach(), [p.grad.clone() for p in model.parameters()])
    for mode in ("selective", "full"):
        assert torch.equal(runs[mode][0], runs["none"][0])
        assert all(torch.equal(a, b) for a, b in zip(runs[mode][1], runs["none"][1]))


def test_dropout_is_active_and_deterministic():
    cfg = model_checks.tiny_config()
    batch = model_checks.make_batch()
    model = MegatronBertForPreTraining(cfg, single(), ModelRuntime(seed=5))
    a, b = model(**batch).loss, model(**batch).loss
    assert torch.equal(a, b), "same sample ids must give the same masks"
    other = dict(batch, sample_ids=batch["sample_ids"] + 1)
    assert not torch.equal(a, model(**other).loss), "different samples must get different masks"
    model.eval()
    e1 = model(**batch).loss
    assert not torch.equal(a, e1) and torch.equal(e1, model(**other).loss), "eval mode has no dropout"


def _inputs(b=2, s=12, vocab=1000):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, -3:] = 0
    return ids, mask, torch.zeros_like(ids)


def test_every_head_shapes_and_losses():
    cfg = model_checks.tiny_config(hidden_dropout=0.0, attention_dropout=0.0)
    ids, mask, types = _inputs()
    b, s, V = ids.shape[0], ids.shape[1], cfg.padded_vocab_size

    out = MegatronBertModel(cfg, single())(ids, mask, types)
    assert out.last_hidden_state.shape == (b, s, 64) and out.pooler_output.shape == (b, 64)

    labels = torch.full((b, s), -100)
    labels[:, 2] = 7
    out = MegatronBertForPreTraining(cfg, single())(ids, mask, types, labels=labels, next_sentence_label=torch.tensor([0, 1]))
    assert out.prediction_logits.shape == (b, s, V) and out.seq_relationship_logits.shape == (b, 2)
    ref_lm = torch.nn.functional.cross_entropy(out.prediction_logits[:, 2], labels[:, 2])
    ref_bin = torch.nn.functional.cross_entropy(out.seq_relationship_logits, torch.tensor([0, 1]))
    assert torch.allclose(out.loss, ref_lm + ref_bin, atol=1e-6)

    out = MegatronBertForMaskedLM(cfg, single())(ids, mask, types, labels=labels)
    assert out.prediction_logits.shape == (b, s, V)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.prediction_logits[:, 2], labels[:, 2]), atol=1e-6)

    out = MegatronBertForCausalLM(cfg, single())(ids, mask, types, labels=ids)
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    assert out.logits.shape == (b, s, V) and torch.allclose(out.loss, ref, atol=1e-5)
    # causal: changing a later token does not change earlier logits
    ids2 = ids.clone()
    ids2[:, -1] = (ids2[:, -1] + 1) % 1000
    clm = MegatronBertForCausalLM(cfg, single())
    assert torch.allclose(clm(ids, None, types).logits[:, :-1], clm(ids2, None, types).logits[:, :-1], atol=1e-6)

    out = MegatronBertForNextSentencePrediction(cfg, single())(ids, mask, types, labels=torch.tensor([1, 0]))
    assert out.logits.shape == (b, 2) and out.loss.ndim == 0

    for num_labels, labels_, kind in ((3, torch.tensor([2, 0]), "ce"), (1, torch.tensor([0.5, -1.0]), "mse"),
                                      (3, torch.tensor([[1.0, 0, 1], [0, 1, 0]]), "bce")):
        out = MegatronBertForSequenceClassification(cfg, single(), num_labels=num_labels)(ids, mask, types, labels=labels_)
        assert out.logits.shape == (b, num_labels)
        ref = {"ce": lambda: torch.nn.functional.cross_entropy(out.logits, labels_),
               "mse": lambda: torch.nn.functional.mse_loss(out.logits.squeeze(-1), labels_),
               "bce": lambda: torch.nn.functional.binary_cross_entropy_with_logits(out.logits, labels_)}[kind]()
        assert torch.allclose(out.loss, ref, atol=1e-6), kind

    mc_ids = torch.stack([ids, ids.flip(1), ids], dim=1)  # [b, 3 choices, s]
    out = MegatronBertForMultipleChoice(cfg, single())(mc_ids, labels=torch.tensor([1, 2]))
    assert out.logits.shape == (b, 3) and torch.allclose(out.logits[:, 0], out.logits[:, 2])

    tags = torch.randint(0, 5, (b, s))
    tags[1, -3:] = -100
    out = MegatronBertForTokenClassification(cfg, single(), num_labels=5)(ids, mask, types, labels=tags)
    assert out.logits.shape == (b, s, 5)
    assert torch.allclose(out.loss, torch.nn.functional.cross_entropy(out.logits.reshape(-1, 5), tags.view(-1)), atol=1e-6)

    qa = MegatronBertForQuestionAnswering(cfg, single())
    out = qa(ids, mask, types, start_positions=torch.tensor([1, 50]), end_positions=torch.tensor([3, 60]))
    assert out.start_logits.shape == (b, s) and out.end_logits.shape == (b, s)
    # the out-of-window example is ignored, as in HF
    ref = (torch.nn.functional.cross_entropy(out.start_logits[:1], torch.tensor([1]))
           + torch.nn.functional.cross_entropy(out.end_logits[:1], torch.tensor([3]))) / 2
    assert torch.allclose(out.loss, ref, atol=1e-6)


def test_named_sizes():
    assert (named_config("345m").num_layers, named_config("345m").hidden_size) == (24, 1024)
    assert named_config("1.3b").num_attention_heads == 32
    c = named_config("3.9b")
    assert (c.num_layers, c.hidden_size, c.num_attention_heads) == (48, 2560, 40)
    assert named_config("base").padded_vocab_size == 30592  # 30522 padded to a multiple of 128
    with pytest.raises(ModelConfigError, match="unknown model size 'huge'"):
        named_config("huge")


def _one_line(exc_info):
    assert "\n" not in str(exc_info.value)


def test_clear_errors():
    fake_tp4 = ParallelState(tp_size=4, tp_rank=0, world_size=4)
    with pytest.raises(ModelConfigError, match="num_attention_heads \\(6\\) is not divisible by parallel.tensor \\(4\\)") as e:
        MegatronBertModel(ModelConfig(vocab_size=100, hidden_size=48, num_layers=1, num_attention_heads=6), fake_tp4)
    _one_line(e)
    with pytest.raises(ModelConfigError, match="hidden_size \\(50\\) is not divisible by model.num_attention_heads") as e:
        ModelConfig(vocab_size=100, hidden_size=50, num_layers=1, num_attention_heads=4)
    _one_line(e)
    cfg = model_checks.tiny_config()
    model = MegatronBertModel(cfg, single())
    ids, mask, types = _inputs(s=40)
    with pytest.raises(ModelConfigError, match="sequence length 40 exceeds model.max_position_embeddings=32") as e:
        model(ids, mask, types)
    _one_line(e)
    ids, mask, types = _inputs()
    bad = ids.clone()
    bad[0, 0] = 1000
    with pytest.raises(ModelConfigError, match="token id 1000 is outside the vocabulary") as e:
        model(bad, mask, types)
    _one_line(e)
    with pytest.raises(ModelConfigError, match="token type id 2 is outside"):
        model(ids, mask, types + 2)


def test_embeddings_slice_positions_and_take_token_type_grads_from_a_gemm():
    """The position rows are a slice of their table, the token-type grads a one-hot GEMM: the sum is
    bitwise the three lookups' (bf16), the grads of the tables those of the lookups (fp32, to rounding:
    other summation orders), and a token type outside the table still fails."""
    import torch.nn.functional as F

    from megatron_bert.model.bert import Embeddings
    from megatron_bert.model.dropout import DropoutContext

    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, vocab_size=100, max_position_embeddings=16)
    dctx = DropoutContext(training=False, impl="native", seed=0, sample_ids=None, seq_len=12, seq_offset=0)
    ids = torch.randint(0, 100, (3, 12))
    types = (torch.rand(3, 12) < 0.4).long()
    for dtype in (torch.bfloat16, torch.float32):
        emb = Embeddings(cfg, ModelRuntime(), single(), lambda w: torch.nn.init.normal_(w, std=1.0)).to(dtype)
        tables = [emb.word_embeddings.weight, emb.position_embeddings.weight, emb.token_type_embeddings.weight]
        lookups = (F.embedding(ids.t(), tables[0]) + F.embedding(torch.arange(12), tables[1]).unsqueeze(1)
                   + F.embedding(types.t(), tables[2]))
        out = emb(ids, types, dctx)
        assert torch.equal(out, lookups)
        if dtype == torch.float32:
            dout = torch.randn_like(out)
            ref = torch.autograd.grad(lookups, tables, dout)
            got = torch.autograd.grad(out, tables, dout)
            for r, g in zip(ref, got):
                torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
            assert got[2].abs().sum() > 0 and got[1][12:].abs().sum() == 0  # rows past the sequence get none
    with pytest.raises(IndexError):
        emb(ids, types + 1, dctx)


def test_native_attention_dropout_at_tp_salts_by_head_offset_and_never_swaps_generators(monkeypatch):
    """At TP > 1 the explicit attention path (compiled regions, CUDA-graph captures, the pruned last
    layer) drops with one seed from the default generator (the same on every rank) salted by the rank's
    head offset: no generator swap (torch.compile breaks a graph there, a capture refuses it), masks
    that differ between ranks, the same mask again from the same generator state (recompute), drop
    rate p, survivors scaled by 1 / (1 - p)."""
    from megatron_bert.model.dropout import DropoutContext
    from parallel.random import MODEL_PARALLEL_STREAM, RNGTracker

    tracker = RNGTracker("cpu")
    tracker.add(MODEL_PARALLEL_STREAM, 5)
    before = tracker.get_states()

    def no_swap(*_):
        raise AssertionError("a generator state was swapped")

    monkeypatch.setattr(RNGTracker, "_set", no_swap)
    monkeypatch.setattr(torch, "set_rng_state", no_swap)
    dctx = DropoutContext(True, "native", 0, None, 64, 0, tracker=tracker)
    probs = torch.full((4, 2, 64, 64), 1 / 64)
    p = 0.25

    def drop(head_offset):
        torch.manual_seed(11)
        return dctx.attention_probs(probs, p, 1, head_offset, 8)

    rank0, rank1, again = drop(0), drop(2), drop(0)
    assert torch.equal(rank0, again)
    dropped0, dropped1 = rank0 == 0, rank1 == 0
    assert not torch.equal(dropped0, dropped1)
    n = probs.numel()
    tol = 6 * (p * (1 - p) / n) ** 0.5
    for d in (dropped0, dropped1):
        assert abs(d.float().mean().item() - p) < tol
    assert abs((dropped0 & dropped1).float().mean().item() - p * p) < 6 * (p * p * (1 - p * p) / n) ** 0.5
    assert torch.allclose(rank0[~dropped0], torch.tensor(1 / 64 / (1 - p)))
    for name, state in tracker.get_states().items():
        assert torch.equal(state, before[name])
