"""export-hf / import-hf against transformers' MegatronBert classes (fp32, eval mode, logits to 1e-4)."""
from __future__ import annotations

import json
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from convert_checks import (EXPORT_HEADS, TOL, VOCAB, build, head_outputs, load_single, make_batch,  # noqa: E402
                            tiny_config, tp_round)
from dist_harness import run_distributed  # noqa: E402
from megatron_bert.checkpoint import read_model_state  # noqa: E402
from megatron_bert.config import ModelConfig  # noqa: E402
from megatron_bert.convert.__main__ import main  # noqa: E402
from megatron_bert.convert.common import expected_names, to_prefixed  # noqa: E402
from megatron_bert.model import HEADS  # noqa: E402
from parallel import ParallelState  # noqa: E402

HF_CLASS = {
    "pretraining": "MegatronBertForPreTraining",
    "sequence_classification": "MegatronBertForSequenceClassification",
    "token_classification": "MegatronBertForTokenClassification",
    "question_answering": "MegatronBertForQuestionAnswering",
    "multiple_choice": "MegatronBertForMultipleChoice",
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _hf_outputs(model, head: str, batch: dict) -> dict:
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    if head == "pretraining":
        return {"prediction_logits": out.prediction_logits, "seq_relationship_logits": out.seq_relationship_logits}
    if head == "question_answering":
        return {"start_logits": out.start_logits, "end_logits": out.end_logits}
    return {"logits": out.logits}


def _max_diff(a: dict, b: dict, cols: int | None = None) -> float:
    assert set(a) == set(b)
    worst = 0.0
    for k in a:
        x, y = a[k], b[k]
        if cols is not None and k == "prediction_logits":
            x, y = x[..., :cols], y[..., :cols]
        assert x.shape == y.shape, f"{k}: {tuple(x.shape)} vs {tuple(y.shape)}"
        worst = max(worst, (x - y).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("convert_hf")
    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"tok{i}" for i in range(VOCAB - 5)]) + "\n")
    # A random HF model whose vocabulary (300) is not a multiple of 128, saved the standard way.
    hf_cfg = transformers.MegatronBertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                             intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    hf = transformers.MegatronBertForPreTraining(hf_cfg)
    _randomize(hf, 1)
    hf_dir = tmp / "hf_in"
    hf.save_pretrained(hf_dir)
    (hf_dir / "vocab.txt").write_text(vocab.read_text())
    assert main(["import-hf", str(hf_dir), str(tmp / "imported")]) == 0
    _, imeta = read_model_state(tmp / "imported")
    icfg = ModelConfig.from_dict(imeta["model"])
    ibatch = make_batch(icfg, seed=3)
    cfg = tiny_config()
    ranks = run_distributed(2, 2, tp_round, str(tmp / "tp2"), cfg.to_dict(), str(vocab), str(tmp / "imported"),
                            icfg.to_dict(), ibatch)
    assert [r["tp"] for r in ranks] == [2, 2]
    return types.SimpleNamespace(tmp=tmp, cfg=cfg, vocab=vocab, hf=hf, hf_dir=hf_dir, icfg=icfg, imeta=imeta,
                                 ibatch=ibatch, tp2_import=ranks[0]["outputs"])


def _export_and_load(world, head: str):
    out = world.tmp / f"hf_{head}"
    assert main(["export-hf", str(world.tmp / "tp2" / head), str(out)]) == 0
    cls = getattr(transformers, HF_CLASS[head])
    hf, info = cls.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return out, hf


def test_export_pretraining_from_tp2(world):
    _, meta = read_model_state(world.tmp / "tp2" / "pretraining")
    assert meta["saved_tp"] == 2
    out, hf = _export_and_load(world, "pretraining")
    conf = json.loads((out / "config.json").read_text())
    assert conf["layer_norm_eps"] == 1e-5 and hf.config.layer_norm_eps == 1e-5
    assert conf["model_type"] == "megatron-bert" and conf["architectures"] == ["MegatronBertForPreTraining"]
    assert conf["vocab_size"] == 1024 and conf["hidden_act"] == "gelu" and conf["intermediate_size"] == 256
    batch = make_batch(world.cfg)
    ours = head_outputs(load_single(str(world.tmp / "tp2" / "pretraining"), "pretraining", world.cfg), "pretraining", batch)
    theirs = _hf_outputs(hf, "pretraining", batch)
    diff = _max_diff(ours, theirs)
    print(f"export pretraining (TP=2 checkpoint) max |logit diff| = {diff:.3g}")
    assert diff <= TOL
    # the tokenizer named in meta came along, readable by transformers
    assert (out / "vocab.txt").read_text() == world.vocab.read_text()
    tok = transformers.BertTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("tok7") == 12


@pytest.mark.parametrize("head", ["sequence_classification", "token_classification", "question_answering",
                                  "multiple_choice"])
def test_export_finetuned_heads(world, head):
    out, hf = _export_and_load(world, head)
    conf = json.loads((out / "config.json").read_text())
    if head == "sequence_classification":
        assert conf["num_labels"] == 3 and conf["id2label"]["2"] == "pos"
        assert conf["problem_type"] == "single_label_classification"
    if head == "token_classification":
        assert hf.config.num_labels == EXPORT_HEADS[head][0]["num_labels"]
    batch = make_batch(world.cfg, choices=3 if head == "multiple_choice" else None, seed=1)
    ours = head_outputs(load_single(str(world.tmp / "tp2" / head), head, world.cfg), head, batch)
    diff = _max_diff(ours, _hf_outputs(hf, head, batch))
    print(f"export {head} max |logit diff| = {diff:.3g}")
    assert diff <= TOL


def test_import_hf_pretraining_tp1_and_tp2(world):
    assert world.icfg.vocab_size == 300 and world.icfg.padded_vocab_size == 384
    assert world.icfg.layernorm_epsilon == 1e-12 and world.imeta["head"] == "pretraining"
    state, _ = read_model_state(world.tmp / "imported")
    assert state["bert.embeddings.word_embeddings.weight"].shape[0] == 384
    assert torch.count_nonzero(state["bert.embeddings.word_embeddings.weight"][300:]) == 0
    theirs = _hf_outputs(world.hf, "pretraining", world.ibatch)
    ours = head_outputs(load_single(str(world.tmp / "imported"), "pretraining", world.icfg), "pretraining", world.ibatch)
    d1 = _max_diff(ours, theirs, cols=300)
    d2 = _max_diff(world.tp2_import, theirs, cols=300)
    print(f"import-hf max |logit diff|: TP=1 {d1:.3g}, TP=2 {d2:.3g}")
    assert d1 <= TOL and d2 <= TOL
    assert world.imeta["tokenizer"].endswith("vocab.txt")


def test_import_hf_classifier_from_pytorch_bin(tmp_path):
    hf_cfg = transformers.MegatronBertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=16, hidden_act="gelu_new",
                                             num_labels=3, id2label={0: "a", 1: "b", 2: "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(1)
    hf = transformers.MegatronBertForSequenceClassification(hf_cfg)
    _randomize(hf, 2)
    d = tmp_path / "hf"
    d.mkdir()
    hf.config.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    assert main(["import-hf", str(d), str(tmp_path / "ours")]) == 0
    _, meta = read_model_state(tmp_path / "ours")
    cfg = ModelConfig.from_dict(meta["model"])
    assert meta["head"] == "sequence_classification" and meta["head_kwargs"]["num_labels"] == 3
    assert meta["label_names"] == ["a", "b", "c"] and cfg.activation == "gelu_tanh"
    batch = make_batch(cfg, seed=4)
    ours = head_outputs(load_single(str(tmp_path / "ours"), "sequence_classification", cfg), "sequence_classification", batch)
    diff = _max_diff(ours, _hf_outputs(hf, "sequence_classification", batch))
    print(f"import-hf classifier (gelu_new, pytorch_model.bin) max |logit diff| = {diff:.3g}")
    assert diff <= TOL


def test_round_trip_is_exact(world):
    """export-hf then import-hf restores every tensor bit-for-bit and the true vocabulary size."""
    src = world.tmp / "tp2" / "token_classification"
    assert main(["export-hf", str(src), str(world.tmp / "rt_hf")]) == 0
    assert main(["import-hf", str(world.tmp / "rt_hf"), str(world.tmp / "rt_back")]) == 0
    a, ma = read_model_state(src)
    b, mb = read_model_state(world.tmp / "rt_back")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert mb["model"] == ma["model"] and mb["head"] == ma["head"] and mb["head_kwargs"]["num_labels"] == 5


def test_expected_names_match_the_models():
    cfg = tiny_config(num_layers=1, hidden_size=32, num_attention_heads=2)
    for head, cls in HEADS.items():
        model = cls(cfg, ParallelState.single()) if head == "model" else build(head, cfg, ParallelState.single())
        names = to_prefixed({n: None for n, _ in model.named_parameters()}, head)
        assert sorted(names) == sorted(expected_names(head, 1)), head


@pytest.mark.parametrize("head,hf_class", [("masked_lm", "MegatronBertForMaskedLM"), ("causal_lm", "MegatronBertForCausalLM"),
                                           ("next_sentence", "MegatronBertForNextSentencePrediction"),
                                           ("model", "MegatronBertModel")])
def test_export_other_heads(tmp_path, head, hf_class):
    """Heads written by write_model_checkpoint (TP=1) load into their HF class with the same outputs."""
    from convert_checks import meta_for, perturb
    from megatron_bert.checkpoint import write_model_checkpoint

    cfg = tiny_config(activation="gelu_tanh")
    ps = ParallelState.single()
    model = HEADS[head](cfg, ps) if head == "model" else build(head, cfg, ps)
    perturb(model, ps, seed=3)
    write_model_checkpoint(tmp_path / "ck", {k: v.detach() for k, v in model.named_parameters()}, meta_for(head, cfg))
    assert main(["export-hf", str(tmp_path / "ck"), str(tmp_path / "hf")]) == 0
    hf, info = getattr(transformers, hf_class).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.hidden_act == "gelu_pytorch_tanh" and hf.config.is_decoder == (head == "causal_lm")
    batch = make_batch(cfg, seed=2)
    model.eval()
    hf.eval()
    with torch.no_grad():
        ours, theirs = model(**batch), hf(**batch)
    if head == "model":
        pairs = [(ours.last_hidden_state, theirs.last_hidden_state), (ours.pooler_output, theirs.pooler_output)]
    elif head == "masked_lm":
        pairs = [(ours.prediction_logits, theirs.logits)]
    else:
        pairs = [(ours.logits, theirs.logits)]
    diff = max((a - b).abs().max().item() for a, b in pairs)
    print(f"export {head} max |diff| = {diff:.3g}")
    assert diff <= TOL
