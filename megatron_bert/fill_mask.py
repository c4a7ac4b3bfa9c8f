"""Fill in [MASK] tokens with a checkpoint's masked-LM head: a quick look at what a pretraining run learnt.

    python -m megatron_bert.fill_mask CKPT "The capital of France is [MASK]." [--top-k 5] [--tokenizer T] [--json]

CKPT: a checkpoint of any TP/DP layout (a ``checkpoints/`` folder, ``step_<N>/``, ``latest`` / ``best``, or a
converted one) with the pretraining or masked-LM head. The model is built at TP=1 in one process on the
CPU (or ``--device cuda``) from the full tensors; the tokenizer is the one the checkpoint records unless
``--tokenizer`` names one. Each [MASK] gets its ``--top-k`` most likely tokens with their probabilities
(the other masks stay masked: one forward pass). Errors print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

def load_masked_lm(path, device: str = "cpu", tokenizer=None):
    """(model in eval mode, tokenizer, checkpoint dir) for a checkpoint with an MLM head, at TP=1."""
    from parallel import ParallelState

    from .checkpoint import CheckpointError
    from .checkpoint.manager import read_model_state, resolve_checkpoint
    from .config import ModelConfig
    from .data import load_tokenizer
    from .model import MASKED_LM_HEADS, SENTENCE_HEAD_PARTS, MegatronBertForPreTraining

    ckpt = resolve_checkpoint(path)
    state, meta = read_model_state(ckpt)
    head = meta.get("head", "pretraining")
    if head not in MASKED_LM_HEADS:
        raise CheckpointError(f"checkpoint {ckpt} has a {head!r} head, not a masked-LM one: fill-mask needs a "
                              "pretraining checkpoint (or one converted from MegatronBertFor{PreTraining,MaskedLM})")
    tok_path = tokenizer or meta.get("tokenizer")
    if not tok_path:
        raise CheckpointError(f"checkpoint {ckpt} records no tokenizer: give --tokenizer vocab.txt or a .model file")
    tok = load_tokenizer(tok_path)
    cfg = ModelConfig.from_dict(meta["model"])
    if tok.vocab_size != cfg.vocab_size:
        raise CheckpointError(f"tokenizer {tok_path} has {tok.vocab_size} tokens but the model was trained with "
                              f"{cfg.vocab_size}: give --tokenizer <the one it was pretrained with>")
    model = MegatronBertForPreTraining(cfg, ParallelState.single(device))
    wanted = {k for k in model.state_dict() if not k.startswith(SENTENCE_HEAD_PARTS)}
    missing = sorted(wanted - set(state))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt} lacks {len(missing)} tensors of the masked-LM model "
                              f"(first: {missing[0]})")
    model.load_state_dict({k: v for k, v in state.items() if k in model.state_dict()}, strict=False)
    return model.eval(), tok, ckpt


@torch.no_grad()
def fill_mask(model, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each [MASK] of ``text``, in order: its ``top_k`` (token, probability) pairs."""
    ids = [tokenizer.cls_id, *tokenizer.encode(text), tokenizer.sep_id]
    max_len = model.bert.embeddings.position_embeddings.weight.shape[0]
    if len(ids) > max_len:
        raise ValueError(f"the text is {len(ids)} tokens with [CLS]/[SEP], over the model's {max_len}: shorten it")
    where = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not where:
        raise ValueError("the text has no [MASK] token: write [MASK] where a word should be predicted")
    dev = next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    out = model(x, attention_mask=torch.ones_like(x), token_type_ids=torch.zeros_like(x))
    logits = out.prediction_logits[0, where, :tokenizer.vocab_size].float()  # [masks, V] (no padding rows)
    probs, top = logits.softmax(-1).topk(min(top_k, tokenizer.vocab_size), dim=-1)
    return [list(zip(tokenizer.convert_ids_to_tokens(t.tolist()), p.tolist())) for p, t in zip(probs, top)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m megatron_bert.fill_mask", description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("text", nargs="+", help="one or more texts, each with at least one [MASK]")
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--tokenizer", default=None, help="vocab.txt or SentencePiece .model (default: the checkpoint's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")
    args = ap.parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        if args.top_k < 1:
            raise ValueError(f"--top-k {args.top_k} must be >= 1")
        model, tok, ckpt = load_masked_lm(args.checkpoint, args.device, args.tokenizer)
        for text in args.text:
            masks = fill_mask(model, tok, text, args.top_k)
            if args.json:
                print(json.dumps({"text": text, "masks": [[{"token": t, "prob": p} for t, p in m] for m in masks]}))
                continue
            print(text)
            for k, m in enumerate(masks):
                print(f"  [MASK] {k + 1}: " + "  ".join(f"{t} {p:.3f}" for t, p in m))
    except (ValueError, OSError, CheckpointError) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
