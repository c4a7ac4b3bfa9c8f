"""The Megatron BERT encoder: embeddings (no embedding LayerNorm) → pre-LN layers → final LN.

Tensor layout inside is ``[s, b, h]``. The bare model's public output is batch-first like
Hugging Face's: ``last_hidden_state [b, s, h]`` and ``pooler_output [b, h]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from parallel import ParallelState, VocabParallelEmbedding
from parallel.init import InitMethod, normal_init
from parallel.mappings import gather_from_sp, reduce_from_tp, reduce_scatter_to_sp
from parallel.random import RNGTracker, seed_everything

from ..config import ModelConfig, ModelConfigError, ModelRuntime
from .dropout import SITE_EMBEDDINGS, DropoutContext
from .embedding_kernels import embedding
from .transformer import TransformerEncoder


@dataclass
class Initializers:
    """One generator for the whole model, consumed in construction order: every TP rank draws
    the same numbers, so the global weights do not depend on the TP size."""

    generator: torch.Generator
    init: InitMethod  # N(0, std)
    out_init: InitMethod  # N(0, std / sqrt(2 L)) for the projections that feed the residual

    @classmethod
    def for_model(cls, cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> "Initializers":
        # The generator lives on the model's device: same numbers on every rank of that device type.
        gen = torch.Generator(device=device).manual_seed(seed)
        return cls(gen, normal_init(cfg.init_std, gen), normal_init(cfg.init_std / math.sqrt(2.0 * cfg.num_layers), gen))


def replicated_linear(in_f: int, out_f: int, init: InitMethod, device: torch.device) -> nn.Linear:
    layer = nn.Linear(in_f, out_f)
    with torch.no_grad():
        init(layer.weight)
        layer.bias.zero_()
    return layer.to(device)


def replicated_embedding(num: int, dim: int, init: InitMethod, device: torch.device, sp: bool) -> nn.Embedding:
    emb = nn.Embedding(num, dim)
    with torch.no_grad():
        init(emb.weight)
    emb.weight.sequence_parallel = sp  # looked up for this rank's sequence shard only under SP
    return emb.to(device)


class Embeddings(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: ModelRuntime, ps: ParallelState, init: InitMethod):
        super().__init__()
        self.cfg, self.rt, self.ps = cfg, rt, ps
        # (the lookup's backward: sorted segment sums in Triton on GPU, embedding_kernels.py)
        self.word_embeddings = VocabParallelEmbedding(cfg.padded_vocab_size, cfg.hidden_size, ps, init_method=init,
                                                      reduce_output=False, lookup=embedding)
        sp = rt.sequence_parallel and ps.tp_size > 1
        self.position_embeddings = replicated_embedding(cfg.max_position_embeddings, cfg.hidden_size, init, ps.device, sp)
        self.token_type_embeddings = replicated_embedding(cfg.type_vocab_size, cfg.hidden_size, init, ps.device, sp)

    def forward(self, input_ids, token_type_ids, dctx: DropoutContext) -> torch.Tensor:
        # input_ids, token_type_ids: [b, s] → [s, b, h]  (or [s/tp, b, h] under sequence parallel)
        # Looking up the transposed ids makes the stream contiguous in [s, b, h] from the start, the
        # layout every GEMM output in the layers has (a [b, s, h] buffer viewed as [s, b, h] made
        # Inductor split the first LayerNorm of each layer in two and read rows out of order).
        word = self.word_embeddings(input_ids.t())  # partial sums over TP ranks
        if self.rt.sequence_parallel:
            word = reduce_scatter_to_sp(word, self.ps.tp_group)
        else:
            word = reduce_from_tp(word, self.ps.tp_group)
        s_local, off = word.shape[0], dctx.seq_offset
        # The positions are a slice of their table (values as the lookup's; the backward a sum over
        # the batch, not a sort of the b·s ids and segment sums)
        positions = self.position_embeddings.weight[off:off + s_local].unsqueeze(1)  # [s, 1, h]
        x = word + positions + self._token_types(token_type_ids.t()[off:off + s_local])
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            # Keep the residual stream in the low-precision dtype (as Megatron does): half the
            # activation memory of an fp32 stream; master weights stay fp32.
            x = x.to(torch.get_autocast_dtype(dev))
        return dctx.hidden(x, self.cfg.hidden_dropout, SITE_EMBEDDINGS)

    def _token_types(self, types: torch.Tensor) -> torch.Tensor:
        """``[s, b]`` ids → ``[s, b, h]`` rows of the token-type table (a lookup, bounds-checked as
        usual; its backward the deterministic one-hot GEMM of _SmallTableLookup)."""
        return _SmallTableLookup.apply(types, self.token_type_embeddings.weight)


class _SmallTableLookup(torch.autograd.Function):
    """``table[ids]`` for a table of a few rows (token types): the backward is ``onehot(ids)ᵀ · grad``,
    one GEMM with a fixed summation order, where torch's embedding backward takes, for such a table,
    an atomic-add path (float atomics in whatever order they land: grads that differ run to run)."""

    @staticmethod
    def forward(ctx, ids, table):
        ctx.save_for_backward(ids)
        ctx.rows = table.shape[0]
        return F.embedding(ids, table)

    @staticmethod
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [n, h]
        onehot = ids.reshape(-1, 1) == torch.arange(ctx.rows, device=ids.device)  # [n, rows], no host sync
        return None, onehot.to(g.dtype).t() @ g  # [rows, h]


class Pooler(nn.Module):
    """tanh(W h[CLS] + b)."""

    def __init__(self, hidden: int, init: InitMethod, device: torch.device):
        super().__init__()
        self.dense = replicated_linear(hidden, hidden, init, device)

    def forward(self, hidden_bsh: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(hidden_bsh[:, 0]))


def extended_mask(attention_mask: torch.Tensor | None, seq_len: int, causal: bool, device) -> torch.Tensor | None:
    """[b, s] (1 = real token) → boolean ``[b, 1, 1|s, s]`` (True = may attend)."""
    mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
    if causal:
        tri = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()[None, None]
        mask = tri if mask is None else mask & tri
    return mask


class MegatronBertModel(nn.Module):
    """The bare encoder (+ optional pooler)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, rt: ModelRuntime | None = None, *,
                 add_pooler: bool = True, inits: Initializers | None = None, tracker: RNGTracker | None = None):
        super().__init__()
        rt = rt or ModelRuntime()
        cfg.validate(ps.tp_size)
        if rt.sequence_parallel and ps.tp_size == 1:
            rt = ModelRuntime(**{**rt.__dict__, "sequence_parallel": False})
        self.cfg, self.rt, self.ps = cfg, rt, ps
        inits = inits or Initializers.for_model(cfg, rt.seed, ps.device)
        if tracker is None and rt.dropout_impl == "native":
            tracker = seed_everything(rt.seed, ps.tp_rank, ps.device)
        self.tracker = tracker
        self.embeddings = Embeddings(cfg, rt, ps, inits.init)
        self.encoder = TransformerEncoder(cfg, rt, ps, inits.init, inits.out_init)
        self.pooler = Pooler(cfg.hidden_size, inits.init, ps.device) if add_pooler else None
        self._calls = 0

    # ------------------------------------------------------------------ input checks
    def check_inputs(self, input_ids, token_type_ids) -> None:
        s = input_ids.shape[-1]
        if s > self.cfg.max_position_embeddings:
            raise ModelConfigError(
                f"sequence length {s} exceeds model.max_position_embeddings={self.cfg.max_position_embeddings}: "
                "shorten data.seq_length or use a model with more positions")
        if self.rt.sequence_parallel and s % self.ps.tp_size:
            raise ModelConfigError(
                f"sequence length {s} is not divisible by parallel.tensor={self.ps.tp_size}, which sequence "
                "parallelism needs: pad the sequence or turn parallel.sequence_parallel off")
        if not self.rt.validate_inputs:
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ModelConfigError(
                f"token id {hi if hi >= self.cfg.vocab_size else lo} is outside the vocabulary [0, {self.cfg.vocab_size}): "
                "the tokenizer does not match model.vocab_size")
        tmax = int(token_type_ids.max())
        if int(token_type_ids.min()) < 0 or tmax >= self.cfg.type_vocab_size:
            raise ModelConfigError(
                f"token type id {tmax} is outside [0, {self.cfg.type_vocab_size}) (model.type_vocab_size)")

    def dropout_context(self, batch: int, seq_len: int, device, sample_ids=None) -> DropoutContext:
        if sample_ids is None and self.training and self.rt.dropout_impl == "keyed":
            # Outside the trainer: fresh ids per call (unique per DP rank), still TP-invariant.
            start = (self._calls * self.ps.dp_size + self.ps.dp_rank) * batch
            sample_ids = torch.arange(start, start + batch, device=device)
            self._calls += 1
        offset = self.ps.tp_rank * (seq_len // self.ps.tp_size) if self.rt.sequence_parallel else 0
        # With one TP rank there is no model-parallel region: native dropout can use the default
        # stream directly (which also keeps RNG-state swaps out of compiled / captured code).
        tracker = self.tracker if self.ps.tp_size > 1 else None
        return DropoutContext(self.training, self.rt.dropout_impl, self.rt.seed,
                              None if sample_ids is None else sample_ids.to(device), seq_len, offset, tracker)

    # ------------------------------------------------------------------ forward
    def encode(self, input_ids, attention_mask=None, token_type_ids=None, sample_ids=None,
               causal: bool = False, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, DropoutContext]:
        """→ final hidden states ``[s, b, h]`` on every rank (full sequence) and the dropout context.

        ``rows [b, n]``: only these positions of each sample are wanted, → ``[n, b, h]``; the last
        layer then computes just those rows (the same values: every layer before it, and its keys and
        values, still see the whole sequence). Under sequence parallelism each rank computes n/tp of
        them (n padded to a multiple of tp with copies of the first).
        """
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        self.check_inputs(input_ids, token_type_ids)
        b, s = input_ids.shape
        dctx = self.dropout_context(b, s, input_ids.device, sample_ids)
        mask = extended_mask(attention_mask, s, causal, input_ids.device)
        if rows is not None and causal:
            raise ValueError("rows (a pruned last layer) cannot be combined with causal attention")
        n = None if rows is None else rows.shape[1]
        if rows is not None and self.rt.sequence_parallel and n % self.ps.tp_size:
            rows = torch.cat([rows, rows[:, :1].expand(b, self.ps.tp_size - n % self.ps.tp_size)], dim=1)
        x = self.embeddings(input_ids, token_type_ids, dctx)
        x = self.encoder(x, mask, dctx, rows)
        if self.rt.sequence_parallel:
            # Everything after this point is replicated work, so each rank's gradient of the gathered
            # tensor is already complete: backward just keeps this rank's chunk.
            x = gather_from_sp(x, self.ps.tp_group, grad_is_partial=False)
        return (x if n is None else x[:n]), dctx

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, sample_ids=None):
        from .heads import ModelOutput

        hidden, _ = self.encode(input_ids, attention_mask, token_type_ids, sample_ids)
        hidden = hidden.transpose(0, 1)  # [b, s, h]
        pooled = self.pooler(hidden) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=hidden, pooler_output=pooled)
