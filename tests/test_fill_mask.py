"""python -m megatron_bert.fill_mask: the top-k tokens and probabilities at every [MASK] equal those of the
exported Hugging Face model on the same weights; checkpoints it cannot use give one error line."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megatron_bert.checkpoint.manager import write_model_checkpoint  # noqa: E402
from megatron_bert.config import ModelConfig  # noqa: E402
from megatron_bert.convert.hf import export_hf  # noqa: E402
from megatron_bert.data import load_tokenizer  # noqa: E402
from megatron_bert.fill_mask import main  # noqa: E402
from megatron_bert.model import MegatronBertForPreTraining  # noqa: E402
from parallel import ParallelState  # noqa: E402
from train_fixtures import build_dataset  # noqa: E402

TEXTS = ["The model reads a [MASK] and predicts [MASK] words.", "[MASK] tensors"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill_mask")
    tok_path = build_dataset(root / "data")["tokenizer"]
    tok = load_tokenizer(tok_path)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=2, num_attention_heads=4,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = MegatronBertForPreTraining(cfg, ParallelState.single())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from the init, so that the predictions are not near-uniform
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.2)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    meta = {"model": cfg.to_dict(), "head": "pretraining", "tokenizer": tok_path}
    ckpt = write_model_checkpoint(root / "ckpt", state, meta, step=7)
    return {"root": root, "ckpt": ckpt, "tok": tok, "state": state, "cfg": cfg, "tok_path": tok_path}


def test_predictions_match_the_exported_hugging_face_model(checkpoint, capsys):
    assert main([str(checkpoint["root"] / "ckpt"), *TEXTS, "--top-k", "4", "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    hf_dir = checkpoint["root"] / "hf"
    export_hf(checkpoint["ckpt"], hf_dir)
    hf = transformers.MegatronBertForPreTraining.from_pretrained(hf_dir).eval()
    tok = checkpoint["tok"]
    assert [r["text"] for r in rows] == TEXTS
    for row, text in zip(rows, TEXTS):
        ids = [tok.cls_id, *tok.encode(text), tok.sep_id]
        where = [i for i, t in enumerate(ids) if t == tok.mask_id]
        assert len(row["masks"]) == len(where) == text.count("[MASK]")
        with torch.no_grad():
            logits = hf(input_ids=torch.tensor([ids])).prediction_logits[0, :, :tok.vocab_size]
        for got, pos in zip(row["masks"], where):
            probs, top = logits[pos].softmax(-1).topk(4)
            assert [m["token"] for m in got] == tok.convert_ids_to_tokens(top.tolist())
            assert [m["prob"] for m in got] == pytest.approx(probs.tolist(), abs=1e-5)
    # the table form prints the same tokens
    assert main([str(checkpoint["ckpt"]), TEXTS[1], "--top-k", "4"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == TEXTS[1] and table[1].startswith("  [MASK] 1: " + rows[1]["masks"][0][0]["token"] + " ")


def test_what_it_cannot_use_gives_one_line(checkpoint, capsys):
    ft = write_model_checkpoint(checkpoint["root"] / "ft", checkpoint["state"],
                                {"model": checkpoint["cfg"].to_dict(), "head": "sequence_classification",
                                 "tokenizer": checkpoint["tok_path"]})
    no_tok = write_model_checkpoint(checkpoint["root"] / "no_tok", checkpoint["state"],
                                    {"model": checkpoint["cfg"].to_dict(), "head": "pretraining"})
    lm_less = {k: v for k, v in checkpoint["state"].items() if not k.startswith("lm_head.")}
    no_lm = write_model_checkpoint(checkpoint["root"] / "no_lm", lm_less,
                                   {"model": checkpoint["cfg"].to_dict(), "head": "pretraining",
                                    "tokenizer": checkpoint["tok_path"]})
    cases = [([str(ft), "a [MASK]"], "has a 'sequence_classification' head, not a masked-LM one"),
             ([str(no_tok), "a [MASK]"], "records no tokenizer: give --tokenizer"),
             ([str(no_lm), "a [MASK]"], "lacks"),
             ([str(checkpoint["ckpt"]), "no mask here"], "the text has no [MASK] token"),
             ([str(checkpoint["ckpt"]), "a [MASK]", "--top-k", "0"], "--top-k 0 must be >= 1"),
             ([str(checkpoint["root"] / "missing"), "a [MASK]"], "")]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (argv, err)
