"""Task heads with the outputs and loss semantics of Hugging Face's MegatronBert classes.

LM logits stay vocab-parallel (``[..., V/tp]``); :func:`gather_lm_logits` gives the full vocab.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel import ParallelState, column_parallel_linear, vocab_parallel_cross_entropy
from parallel.init import set_tp_metadata, shard_of
from parallel.mappings import gather_from_tp

from ..config import ModelConfig, ModelRuntime
from .bert import Initializers, MegatronBertModel, replicated_linear
from .dropout import SITE_HEAD
from .norm import make_layernorm
from .transformer import _ACTIVATIONS


@dataclass
class ModelOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # classification / token classification / multiple choice / causal LM
    prediction_logits: torch.Tensor | None = None  # MLM, vocab-parallel
    seq_relationship_logits: torch.Tensor | None = None
    start_logits: torch.Tensor | None = None
    end_logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    binary_loss: torch.Tensor | None = None
    lm_loss_sum: torch.Tensor | None = None  # for exact normalisation across micro-batches / DP
    lm_tokens: torch.Tensor | None = None
    lm_labels: torch.Tensor | None = None  # the targets of prediction_logits' rows (-100 = none)


def gather_lm_logits(logits: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    return gather_from_tp(logits, ps.tp_group)


class LMHead(nn.Module):
    """dense → activation → LayerNorm → logits against the (tied) vocab-parallel word embeddings + bias."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, inits: Initializers):
        super().__init__()
        self.ps, self.act = ps, _ACTIVATIONS[cfg.activation]
        self.dense = replicated_linear(cfg.hidden_size, cfg.hidden_size, inits.init, ps.device)
        self.layernorm = make_layernorm(cfg.hidden_size, cfg.layernorm_epsilon, ps.device)
        bias = shard_of(torch.zeros(cfg.padded_vocab_size), 0, ps.tp_rank, ps.tp_size)
        self.bias = nn.Parameter(bias.to(ps.device))
        set_tp_metadata(self.bias, 0)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        x = self.layernorm(self.act(self.dense(hidden)))
        # x is replicated over TP: the backward all-reduce inside sums each rank's vocab share.
        return column_parallel_linear(x, word_embeddings, self.bias, self.ps.tp_group)


def target_positions_of(labels: torch.Tensor, slots: int) -> torch.Tensor:
    """``labels [b, s]`` → each sample's labelled positions in order, then -1 up to ``slots`` (at least
    the most targets of a sample, at most s): the ``target_positions`` of the pretraining heads."""
    s = labels.shape[1]
    labelled = labels != -100
    order = torch.where(labelled, 0, s) + torch.arange(s, device=labels.device)  # targets first
    picked = order.argsort(dim=1)[:, :slots]
    return picked.masked_fill(torch.arange(slots, device=labels.device) >= labelled.sum(1, keepdim=True), -1)


def target_rows(target_positions: torch.Tensor) -> torch.Tensor:
    """MLM target positions ``[b, k]`` (-1 = unused slot) → the rows the encoder must compute for
    pretraining, ``[b, 1 + k]``: [CLS] (position 0, the binary head's input) first, then the targets
    (unused slots point at [CLS] again; their label is -100)."""
    cls = torch.zeros_like(target_positions[:, :1])
    return torch.cat([cls, target_positions.clamp(min=0)], dim=1)


def _mlm(lm_head: LMHead, bert: MegatronBertModel, hidden_sbh, labels, only_masked: bool, lm_positions=None,
         target_positions=None):
    """Logits (all positions, or only labelled ones), the mean / summed MLM loss, the token count and
    the labels the logits rows stand for.

    ``lm_positions``: flat indices (into ``[b * s]``) of the labelled tokens, computed on the host by
    the data loader so selecting them needs no device→host sync. It may also name unlabelled
    positions (padding to a fixed count): their target is -100, which the loss ignores.
    ``target_positions [b, k]``: the encoder ran pruned (``hidden_sbh`` is ``[1 + k, b, h]`` at
    target_rows), and the logits are those of the k target slots of every sample.
    """
    word = bert.embeddings.word_embeddings.weight
    if target_positions is not None:
        if labels is None:
            raise ValueError("target_positions needs labels")
        picked = hidden_sbh[1:].transpose(0, 1).reshape(-1, hidden_sbh.shape[-1])  # [b · k, h]
        labels = labels.gather(1, target_positions.clamp(min=0)).masked_fill(target_positions < 0, -100).reshape(-1)
        logits = lm_head(picked, word)  # [b · k, V/tp]
    else:
        hidden = hidden_sbh.transpose(0, 1)  # [b, s, h]
        if labels is None:
            return lm_head(hidden, word), None, None, None, None
        if only_masked:
            if lm_positions is None:
                lm_positions = (labels.reshape(-1) != -100).nonzero().squeeze(1)
            picked = hidden.reshape(-1, hidden.shape[-1]).index_select(0, lm_positions)  # [n, h]
            logits = lm_head(picked, word)  # [n, V/tp]
            labels = labels.reshape(-1).index_select(0, lm_positions)  # [n]
        else:
            logits = lm_head(hidden, word)  # [b, s, V/tp]
    token_loss = vocab_parallel_cross_entropy(logits, labels, bert.ps.tp_group, compiled=bert.rt.fuse_elementwise)
    tokens = (labels != -100).sum()
    loss_sum = token_loss.sum()
    return logits, loss_sum / tokens.clamp(min=1), loss_sum, tokens, labels


class _HeadModel(nn.Module):
    add_pooler = True

    def __init__(self, cfg: ModelConfig, ps: ParallelState, rt: ModelRuntime | None = None, **kw):
        super().__init__()
        rt = rt or ModelRuntime()
        self.cfg, self.ps = cfg, ps
        self.inits = Initializers.for_model(cfg, rt.seed, ps.device)
        self.bert = MegatronBertModel(cfg, ps, rt, add_pooler=self.add_pooler, inits=self.inits, **kw)
        self.rt = self.bert.rt

    def _dropout(self, x, dctx, site=0):
        return dctx.batch_first(x, self.cfg.hidden_dropout, SITE_HEAD + site)


class MegatronBertForPreTraining(_HeadModel):
    """MLM + binary (sentence-order / next-sentence) head; loss = MLM + binary, as HF."""

    def __init__(self, cfg, ps, rt=None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.lm_head = LMHead(cfg, ps, self.inits)
        self.binary_head = replicated_linear(cfg.hidden_size, cfg.num_binary_labels, self.inits.init, ps.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                next_sentence_label=None, sample_ids=None, only_masked_logits: bool = False, lm_positions=None,
                target_positions=None):
        """``target_positions [b, k]`` (distinct MLM target positions per sample, -1 = unused slot): the
        last layer computes only [CLS] and those rows (heads.target_rows), the logits are theirs."""
        rows = None if target_positions is None else target_rows(target_positions)
        hidden, _ = self.bert.encode(input_ids, attention_mask, token_type_ids, sample_ids, rows=rows)
        logits, lm_loss, lm_sum, lm_tokens, lm_labels = _mlm(self.lm_head, self.bert, hidden, labels,
                                                             only_masked_logits, lm_positions, target_positions)
        binary_logits = self.binary_head(self.bert.pooler(hidden.transpose(0, 1)))  # row 0: [CLS]
        binary_loss = None if next_sentence_label is None else F.cross_entropy(binary_logits, next_sentence_label.view(-1))
        parts = [x for x in (lm_loss, binary_loss) if x is not None]
        return ModelOutput(loss=sum(parts) if parts else None, prediction_logits=logits,
                           seq_relationship_logits=binary_logits, lm_loss=lm_loss, binary_loss=binary_loss,
                           lm_loss_sum=lm_sum, lm_tokens=lm_tokens, lm_labels=lm_labels)


class MegatronBertForMaskedLM(_HeadModel):
    add_pooler = False

    def __init__(self, cfg, ps, rt=None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.lm_head = LMHead(cfg, ps, self.inits)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sample_ids=None,
                only_masked_logits: bool = False, target_positions=None):
        rows = None if target_positions is None else target_rows(target_positions)
        hidden, _ = self.bert.encode(input_ids, attention_mask, token_type_ids, sample_ids, rows=rows)
        logits, loss, lm_sum, tokens, lm_labels = _mlm(self.lm_head, self.bert, hidden, labels, only_masked_logits,
                                                       target_positions=target_positions)
        return ModelOutput(loss=loss, prediction_logits=logits, lm_loss=loss, lm_loss_sum=lm_sum, lm_tokens=tokens,
                           lm_labels=lm_labels)


class MegatronBertForCausalLM(_HeadModel):
    """Left-to-right LM (causal attention); the loss predicts token t+1 from positions <= t."""

    add_pooler = False

    def __init__(self, cfg, ps, rt=None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.lm_head = LMHead(cfg, ps, self.inits)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sample_ids=None):
        hidden, _ = self.bert.encode(input_ids, attention_mask, token_type_ids, sample_ids, causal=True)
        logits = self.lm_head(hidden.transpose(0, 1), self.bert.embeddings.word_embeddings.weight)
        loss = None
        if labels is not None:
            shifted = labels[:, 1:].contiguous()
            token_loss = vocab_parallel_cross_entropy(logits[:, :-1].contiguous(), shifted, self.ps.tp_group)
            loss = token_loss.sum() / (shifted != -100).sum().clamp(min=1)
        return ModelOutput(loss=loss, logits=logits)


class MegatronBertForNextSentencePrediction(_HeadModel):
    def __init__(self, cfg, ps, rt=None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.binary_head = replicated_linear(cfg.hidden_size, cfg.num_binary_labels, self.inits.init, ps.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sample_ids=None):
        pooled = self.bert(input_ids, attention_mask, token_type_ids, sample_ids).pooler_output
        logits = self.binary_head(pooled)
        loss = None if labels is None else F.cross_entropy(logits, labels.view(-1))
        return ModelOutput(loss=loss, logits=logits, seq_relationship_logits=logits)


def classification_loss(logits, labels, num_labels: int, problem_type: str | None):
    """HF's rule: 1 label → regression; integer labels → single-label CE; else multi-label BCE."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float().view(-1)) if num_labels == 1 else F.mse_loss(logits, labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.float())
    raise ValueError(f"unknown problem_type {problem_type!r}")


class MegatronBertForSequenceClassification(_HeadModel):
    def __init__(self, cfg, ps, rt=None, *, num_labels: int = 2, problem_type: str | None = None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.num_labels, self.problem_type = num_labels, problem_type
        self.classifier = replicated_linear(cfg.hidden_size, num_labels, self.inits.init, ps.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sample_ids=None):
        hidden, dctx = self.bert.encode(input_ids, attention_mask, token_type_ids, sample_ids)
        pooled = self.bert.pooler(hidden.transpose(0, 1))
        logits = self.classifier(self._dropout(pooled, dctx))
        loss = None if labels is None else classification_loss(logits, labels, self.num_labels, self.problem_type)
        return ModelOutput(loss=loss, logits=logits)


class MegatronBertForMultipleChoice(_HeadModel):
    def __init__(self, cfg, ps, rt=None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.classifier = replicated_linear(cfg.hidden_size, 1, self.inits.init, ps.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sample_ids=None):
        b, c, s = input_ids.shape  # [batch, choices, seq]
        flat = lambda t: None if t is None else t.reshape(b * c, s)  # noqa: E731
        ids = None if sample_ids is None else (sample_ids.view(-1, 1) * c + torch.arange(c, device=input_ids.device)).view(-1)
        hidden, dctx = self.bert.encode(flat(input_ids), flat(attention_mask), flat(token_type_ids), ids)
        pooled = self.bert.pooler(hidden.transpose(0, 1))
        logits = self.classifier(self._dropout(pooled, dctx)).view(b, c)
        loss = None if labels is None else F.cross_entropy(logits, labels.view(-1))
        return ModelOutput(loss=loss, logits=logits)


class MegatronBertForTokenClassification(_HeadModel):
    add_pooler = False

    def __init__(self, cfg, ps, rt=None, *, num_labels: int = 2, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.num_labels = num_labels
        self.classifier = replicated_linear(cfg.hidden_size, num_labels, self.inits.init, ps.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None, sample_ids=None):
        hidden, dctx = self.bert.encode(input_ids, attention_mask, token_type_ids, sample_ids)
        logits = self.classifier(self._dropout(hidden.transpose(0, 1), dctx))  # [b, s, labels]
        loss = None if labels is None else F.cross_entropy(logits.reshape(-1, self.num_labels), labels.reshape(-1))
        return ModelOutput(loss=loss, logits=logits)


class MegatronBertForQuestionAnswering(_HeadModel):
    add_pooler = False

    def __init__(self, cfg, ps, rt=None, **kw):
        super().__init__(cfg, ps, rt, **kw)
        self.qa_outputs = replicated_linear(cfg.hidden_size, 2, self.inits.init, ps.device)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_positions=None,
                end_positions=None, sample_ids=None):
        hidden, _ = self.bert.encode(input_ids, attention_mask, token_type_ids, sample_ids)
        start, end = self.qa_outputs(hidden.transpose(0, 1)).unbind(-1)  # [b, s] each
        loss = None
        if start_positions is not None and end_positions is not None:
            s = start.shape[1]  # positions outside the window are ignored, as HF does
            sp, ep = start_positions.view(-1).clamp(0, s), end_positions.view(-1).clamp(0, s)
            loss = (F.cross_entropy(start, sp, ignore_index=s) + F.cross_entropy(end, ep, ignore_index=s)) / 2
        return ModelOutput(loss=loss, start_logits=start, end_logits=end)


# Heads whose checkpoints carry the masked-LM head (what fill-mask and pretraining evaluation need), and
# the parameters of MegatronBertForPreTraining beyond it (the SOP/NSP head and the pooler feeding it).
MASKED_LM_HEADS = ("pretraining", "masked_lm")
SENTENCE_HEAD_PARTS = ("binary_head.", "bert.pooler.")

HEADS = {
    "model": MegatronBertModel,
    "pretraining": MegatronBertForPreTraining,
    "masked_lm": MegatronBertForMaskedLM,
    "causal_lm": MegatronBertForCausalLM,
    "next_sentence": MegatronBertForNextSentencePrediction,
    "sequence_classification": MegatronBertForSequenceClassification,
    "multiple_choice": MegatronBertForMultipleChoice,
    "token_classification": MegatronBertForTokenClassification,
    "question_answering": MegatronBertForQuestionAnswering,
}
