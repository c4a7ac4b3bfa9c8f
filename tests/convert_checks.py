"""Shared helpers for the converter tests, including the functions spawned TP ranks run."""
from __future__ import annotations

import torch

from megatron_bert.checkpoint import load_checkpoint, save_checkpoint
from megatron_bert.config import ModelConfig, ModelRuntime
from megatron_bert.model import HEADS, gather_lm_logits
from parallel import ParallelState
from parallel.init import is_tp_sharded, shard_of

TOL = 1e-4
VOCAB = 1000  # pads to 1024


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, max_position_embeddings=32,
                layernorm_epsilon=1e-5)
    return ModelConfig(**{**base, **kw})


# head name → (constructor kwargs, label names written to meta or None)
EXPORT_HEADS = {
    "pretraining": ({}, None),
    "sequence_classification": ({"num_labels": 3, "problem_type": "single_label_classification"},
                                ["neg", "neutral", "pos"]),
    "token_classification": ({"num_labels": 5}, None),
    "question_answering": ({}, None),
    "multiple_choice": ({}, None),
}


def perturb(model: torch.nn.Module, ps: ParallelState, seed: int, scale: float = 0.05) -> None:
    """Add TP-invariant noise to every parameter (fresh models have zero biases and unit LayerNorms,
    which would hide a swapped weight / bias): the full tensor is drawn, each rank keeps its shard."""
    with torch.no_grad():
        for i, (_, p) in enumerate(model.named_parameters()):
            shape = list(p.shape)
            if is_tp_sharded(p):
                shape[p.partition_dim] *= ps.tp_size
            full = torch.randn(shape, generator=torch.Generator().manual_seed(seed * 1000 + i)) * scale
            if is_tp_sharded(p):
                full = shard_of(full, p.partition_dim, ps.tp_rank, ps.tp_size, p.partition_stride)
            p.add_(full.to(p.device))


def make_batch(cfg: ModelConfig, b: int = 3, s: int = 12, choices: int | None = None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shape = (b, choices, s) if choices else (b, s)
    ids = torch.randint(0, cfg.vocab_size, shape, generator=g)
    types = torch.zeros(shape, dtype=torch.long)
    types[..., s // 2:] = 1
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, ..., s - 4:] = 0  # padding in the first example
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def build(head: str, cfg: ModelConfig, ps: ParallelState, seed: int = 11):
    kwargs = EXPORT_HEADS.get(head, ({}, None))[0]
    return HEADS[head](cfg, ps, ModelRuntime(seed=seed), **kwargs)


def head_outputs(model, head: str, batch: dict) -> dict[str, torch.Tensor]:
    """The logits a head produces (LM logits gathered to the full padded vocab), eval mode."""
    model.eval()
    with torch.no_grad():
        out = model(**batch)
    if head == "pretraining":
        return {"prediction_logits": gather_lm_logits(out.prediction_logits, model.ps),
                "seq_relationship_logits": out.seq_relationship_logits}
    if head == "question_answering":
        return {"start_logits": out.start_logits, "end_logits": out.end_logits}
    return {"logits": out.logits}


def meta_for(head: str, cfg: ModelConfig, tokenizer: str | None = None) -> dict:
    kwargs, labels = EXPORT_HEADS.get(head, ({}, None))
    meta = {"model": cfg.to_dict(), "head": head, "head_kwargs": kwargs}
    if labels:
        meta["label_names"] = labels
    if tokenizer:
        meta["tokenizer"] = tokenizer
    return meta


# --------------------------------------------------------------------------- rank functions
def save_heads_tp(ps: ParallelState, root: str, cfg_dict: dict, tokenizer: str) -> None:
    """Every head in EXPORT_HEADS, built and perturbed at this TP size, saved to <root>/<head>."""
    cfg = ModelConfig.from_dict(cfg_dict)
    for n, head in enumerate(EXPORT_HEADS):
        model = build(head, cfg, ps, seed=11 + n)
        perturb(model, ps, seed=5 + n)
        save_checkpoint(f"{root}/{head}", 3, model, None, ps, meta_for(head, cfg, tokenizer))


def logits_from_checkpoint(ps: ParallelState, ckpt: str, head: str, cfg_dict: dict, batch: dict):
    """Load ``ckpt`` at this rank's TP size and return the head's outputs (full vocab)."""
    cfg = ModelConfig.from_dict(cfg_dict)
    model = build(head, cfg, ps, seed=99)  # a different init: everything must come from the checkpoint
    load_checkpoint(ckpt, model, None, ps)
    return head_outputs(model, head, batch)


def tp_round(ps: ParallelState, save_root: str, cfg_dict: dict, tokenizer: str, imported: str,
             imported_cfg: dict, batch: dict):
    """One spawn does both TP=2 jobs: write the export fixtures and evaluate an imported checkpoint."""
    save_heads_tp(ps, save_root, cfg_dict, tokenizer)
    out = logits_from_checkpoint(ps, imported, "pretraining", imported_cfg, batch)
    return {"tp": ps.tp_size, "outputs": out if ps.rank == 0 else None}


def load_single(ckpt: str, head: str, cfg: ModelConfig):
    ps = ParallelState.single()
    model = build(head, cfg, ps, seed=98)
    load_checkpoint(ckpt, model, None, ps)
    return model
