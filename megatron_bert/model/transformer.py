"""Pre-LN transformer layers on the tensor-parallel core.

    x = x + Dropout(Attn(LN(x)))
    x = x + Dropout(MLP(LN(x)))

Activations are ``[s, b, h]``; under sequence parallelism ``[s/tp, b, h]`` outside the TP blocks.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from parallel import ColumnParallelLinear, ParallelState, RowParallelLinear
from parallel.init import InitMethod
from parallel.mappings import copy_to_tp, gather_from_sp
from parallel.random import checkpoint

from ..config import ModelConfig, ModelRuntime
from .dropout import DropoutContext, layer_site
from . import attention_kernels, dropout_kernels, layernorm_kernels, qkv_kernels, residual_norm_kernels
from .fused import bias_dropout_add, compiled, fused_bias_activation
from .rows import row_index, rows_of_shards, take_rows
from .norm import make_layernorm

_ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def _sdpa_backends():
    """Optional pin of SDPA kernels for benchmarking, e.g. MEGATRON_BERT_SDPA=flash (default: torch picks)."""
    name = os.environ.get("MEGATRON_BERT_SDPA", "").lower()
    if not name:
        return None
    from torch.nn.attention import SDPBackend

    table = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    return [table[n] for n in name.split(",")]


_SDPA_BACKENDS = _sdpa_backends()


def _sdpa(q, k, v, mask, p=0.0):
    if _SDPA_BACKENDS is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel(_SDPA_BACKENDS):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


def attention_core(q, k, v, mask, dctx: DropoutContext, p: float, site: int, head_offset: int, num_heads: int):
    """softmax(q kᵀ / √d) v over ``[b, heads, s, head_dim]`` with a boolean mask (True = attend).

    Uses SDPA (flash / memory-efficient kernels on GPU) except where dropout must act on the
    probabilities themselves, where the scores are formed explicitly: keyed dropout, and native dropout
    on a TP rank's heads where the model-parallel generator cannot be swapped in for SDPA's mask.
    """
    if dctx.active(p) and (dctx.impl == "keyed" or (dctx.tracker is not None and _no_generator_swaps(q, dctx))):
        scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(v.dtype)
        probs = dctx.attention_probs(probs, p, site, head_offset, num_heads)  # native: salted by the heads
        return torch.matmul(probs, v)
    if dctx.active(p):  # native: dropout inside the fused kernel, at TP > 1 on this rank's own stream
        with dctx.tracker.fork() if dctx.tracker is not None else contextlib.nullcontext():
            return _sdpa(q, k, v, mask, p)
    return _sdpa(q, k, v, mask)


def _no_generator_swaps(q: torch.Tensor, dctx: DropoutContext) -> bool:
    """Whether a TP rank's native attention dropout must do without the tracker's generator swap:
    torch.compile breaks a graph at one and a CUDA-graph capture refuses it (a new seed mid-capture;
    session 17). The pruned last layer's ``[b, heads, n, s]`` always goes explicit (small, and so the
    same whether or not the step is captured); an eager full layer keeps SDPA's fused dropout."""
    return (dctx.rows is not None or torch.compiler.is_compiling()
            or (q.is_cuda and torch.cuda.is_current_stream_capturing()))


def _site(dctx: DropoutContext, layer: int, which: int) -> int:
    """Keyed dropout needs the layer's site id; native dropout does not, and not reading the layer
    index there lets one torch.compile'd graph serve every layer (no per-layer guard)."""
    return layer_site(layer, which) if dctx.impl == "keyed" else 0


class SelfAttention(nn.Module):
    """Fused QKV (column-parallel, per-head layout ``[heads, 3, head_dim]`` so every rank owns whole
    heads) → attention core → output projection (row-parallel)."""

    def __init__(self, cfg: ModelConfig, rt: ModelRuntime, ps: ParallelState, layer: int,
                 init: InitMethod, out_init: InitMethod):
        super().__init__()
        self.cfg, self.rt, self.ps, self.layer = cfg, rt, ps, layer
        self.heads_local = cfg.num_attention_heads // ps.tp_size
        self.query_key_value = ColumnParallelLinear(
            cfg.hidden_size, 3 * cfg.hidden_size, ps, init_method=init, sequence_parallel=rt.sequence_parallel)
        self.dense = RowParallelLinear(
            cfg.hidden_size, cfg.hidden_size, ps, init_method=out_init, sequence_parallel=rt.sequence_parallel,
            skip_bias_add=rt.fuse_elementwise)  # the bias joins the fused dropout + residual epilogue
        # One TP rank on GPU: the projection's backward packs dq, dk, dv in one pass (qkv_kernels.py;
        # its tiles need a power-of-two head size).
        hd = cfg.head_dim
        self.fused_qkv = (rt.fuse_elementwise and ps.tp_size == 1 and hd >= 16 and hd & (hd - 1) == 0
                          and qkv_kernels.available())
        # GPU with Triton, native dropout: our attention kernels on the packed projection output
        # (attention_kernels.py: exact dropout at a fraction of cuDNN's cost, no permuting copies).
        self.flash = rt.fuse_elementwise and rt.dropout_impl == "native" and attention_kernels.available()

    def _flash_ok(self, x: torch.Tensor, mask: torch.Tensor | None) -> bool:
        """Our kernels take bf16 activations outside autocast, power-of-two head sizes, and no mask or
        a key-padding one ``[b, 1, 1, s]`` (a causal mask goes to SDPA). They keep no ``[s, s]`` tensor,
        so ``recompute=selective`` has nothing to recompute on this path."""
        if not self.flash or torch.is_autocast_enabled(x.device.type):
            return False
        s = x.shape[0] * (self.ps.tp_size if self.rt.sequence_parallel else 1)  # the full sequence
        qkv_numel = s * x.shape[1] * 3 * self.heads_local * self.cfg.head_dim
        return (attention_kernels.supports(self.cfg.head_dim, x.dtype, qkv_numel)
                and (mask is None or (mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1)))

    def _flash_forward(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext) -> torch.Tensor:
        key_valid = None if mask is None else mask[:, 0, 0, :].contiguous()  # [b, s]
        p = self.cfg.attention_dropout if dctx.active(self.cfg.attention_dropout) else 0.0
        # Every TP rank draws the same seed (the default generator is kept equal across them) and
        # salts its heads' masks with its rank: masks differ per rank as with the model-parallel
        # generator, without swapping generator states (which torch.compile breaks a graph at).
        seed = dctx.kernel_seed(0, x.device, p)
        qkv = self.query_key_value  # column-parallel; its bias grad folded into the attention backward
        ctx = attention_kernels.projected_attention(x, qkv.weight, qkv.bias, key_valid, seed, self.heads_local,
                                                    self.cfg.head_dim, p, self.ps.tp_group, self.rt.sequence_parallel)
        return self.dense(ctx)  # ctx: [s, b, h/tp] (full sequence under SP)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext) -> torch.Tensor:
        if self._flash_ok(x, mask):
            return self._flash_forward(x, mask, dctx)
        if self.fused_qkv and not torch.is_autocast_enabled(x.device.type):
            qkv = self.query_key_value
            q, k, v = qkv_kernels.project_qkv(x, qkv.weight, qkv.bias, self.heads_local, self.cfg.head_dim)
        else:
            mixed = self.query_key_value(x)  # [s, b, heads_local * 3 * hd] (full sequence under SP)
            s, b, _ = mixed.shape
            q, k, v = mixed.view(s, b, self.heads_local, 3, self.cfg.head_dim).permute(3, 1, 2, 0, 4).unbind(0)
        return self._attend_and_project(q, k, v, mask, dctx)  # q, k, v: [b, heads_local, s, hd]

    def _attend_and_project(self, q, k, v, mask, dctx: DropoutContext) -> torch.Tensor:
        """attention_core (recomputed under ``recompute=selective``) on ``q [b, heads_local, n, hd]``
        against ``k, v [b, heads_local, s, hd]``, then the output projection: → ``[n, b, h]``."""
        args = (q, k, v, mask, dctx, self.cfg.attention_dropout, _site(dctx, self.layer, 0),
                self.ps.tp_rank * self.heads_local, self.cfg.num_attention_heads)
        if self.rt.recompute == "selective":
            ctx = checkpoint(attention_core, dctx.tracker, *args)
        else:
            ctx = attention_core(*args)
        b, nh, n, hd = ctx.shape
        return self.dense(ctx.permute(2, 0, 1, 3).reshape(n, b, nh * hd))  # ctx as [n, b, h/tp]

    def forward_rows(self, x: torch.Tensor, index: torch.Tensor, mask: torch.Tensor | None,
                     dctx: DropoutContext) -> torch.Tensor:
        """The output at the query rows ``index`` only (row_index of ``dctx.rows``), keys and values
        from every row: x ``[s, b, h]`` → ``[n, b, h]``. Sequence parallel: x ``[s/tp, b, h]`` →
        ``[n/tp, b, h]``, this rank's chunk of the rows (the output projection's reduce-scatter)."""
        if mask is not None and mask.shape[2] != 1:
            raise ValueError("a pruned attention layer takes a key-padding mask [b, 1, 1, s], not a per-query one")
        nh, hd, proj = self.heads_local, self.cfg.head_dim, self.query_key_value
        w, bias = proj.weight.view(nh, 3, hd, -1), proj.bias.view(nh, 3, hd)  # per head: q, k, v
        # backward: one all-reduce (SP: reduce-scatter) for both projections' input grads
        x = gather_from_sp(x, self.ps.tp_group) if self.rt.sequence_parallel else copy_to_tp(x, self.ps.tp_group)
        s, b, _ = x.shape
        kv = F.linear(x, w[:, 1:].reshape(nh * 2 * hd, -1), bias[:, 1:].reshape(-1))  # [s, b, nh · 2 · hd]
        q = F.linear(take_rows(x, index), w[:, 0].reshape(nh * hd, -1), bias[:, 0].reshape(-1))  # [n, b, nh · hd]
        n = q.shape[0]
        k, v = kv.view(s, b, nh, 2, hd).permute(3, 1, 2, 0, 4).unbind(0)  # [b, nh, s, hd]
        q = q.view(n, b, nh, hd).permute(1, 2, 0, 3)  # [b, nh, n, hd]
        return self._attend_and_project(q, k, v, mask, dctx)  # [n, b, h]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: ModelRuntime, ps: ParallelState, init: InitMethod, out_init: InitMethod):
        super().__init__()
        fuse = rt.fuse_elementwise
        self.dense_h_to_4h = ColumnParallelLinear(
            cfg.hidden_size, cfg.ffn_hidden_size, ps, init_method=init, sequence_parallel=rt.sequence_parallel,
            skip_bias_add=fuse)
        self.dense_4h_to_h = RowParallelLinear(
            cfg.ffn_hidden_size, cfg.hidden_size, ps, init_method=out_init, sequence_parallel=rt.sequence_parallel,
            skip_bias_add=fuse)
        self.act = _ACTIVATIONS[cfg.activation]
        self.bias_act = fused_bias_activation(cfg.activation) if fuse else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [s, b, h] → [s, b, h] (bias of dense_4h_to_h left to the caller when fused)
        if self.bias_act is not None:
            return self.dense_4h_to_h(self.bias_act(self.dense_h_to_4h(x), self.dense_h_to_4h.bias))
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: ModelRuntime, ps: ParallelState, layer: int,
                 init: InitMethod, out_init: InitMethod):
        super().__init__()
        self.cfg, self.layer, self.ps = cfg, layer, ps
        self.sp = sp = rt.sequence_parallel
        self.input_layernorm = make_layernorm(cfg.hidden_size, cfg.layernorm_epsilon, ps.device, sp)
        self.attention = SelfAttention(cfg, rt, ps, layer, init, out_init)
        self.post_attention_layernorm = make_layernorm(cfg.hidden_size, cfg.layernorm_epsilon, ps.device, sp)
        self.mlp = MLP(cfg, rt, ps, init, out_init)
        self.fused_bda = compiled(bias_dropout_add) if rt.fuse_elementwise else None
        # GPU with Triton: the epilogue's forward, mask draw included, is one Triton kernel
        # (dropout_kernels.bias_dropout_add); its backward is plain torch, fused by Inductor. Compiled
        # on its own too: at TP>1 the layer runs eagerly and that backward still wants fusing.
        self.bda_kernel = None
        if rt.fuse_elementwise and rt.dropout_impl == "native" and dropout_kernels.available():
            self.bda_kernel = compiled(dropout_kernels.fused_bias_dropout_add)
        # GPU with Triton: the two LayerNorm forwards are one kernel each (layernorm_kernels.py).
        self.norm_kernel = rt.fuse_elementwise and layernorm_kernels.available()
        # GPU with Triton: each residual epilogue and the LayerNorm after it are one kernel each way
        # (residual_norm_kernels.py); the encoder then runs forward_fused, which hands LN(x) on.
        self.residual_norm = (rt.fuse_elementwise and rt.dropout_impl == "native" and rt.recompute != "full"
                              and residual_norm_kernels.available())
        # Sequence-parallel shards hold different tokens: salt their masks apart (TP rank); without
        # SP the region is replicated and every TP rank must draw the same mask.
        self.mask_salt = ps.tp_rank if sp else 0

    def _residual(self, y, bias, residual, dctx: DropoutContext, site: int):
        """residual + dropout(y [+ bias]); one fused kernel on the native-dropout GPU path."""
        p = self.cfg.hidden_dropout
        if self.fused_bda is not None:
            if dctx.impl == "native" and self.bda_kernel is not None and dctx.active(p):
                return self.bda_kernel(y, bias, residual, p, self.mask_salt)
            if dctx.impl == "native":
                return self.fused_bda(y, bias, residual, p, dctx.active(p))
            y = y + bias
        return residual + dctx.hidden(y, p, site)

    def _norm(self, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layernorm_kernels.layer_norm(x, norm) if self.norm_kernel else norm(x)

    def attention_block(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext) -> torch.Tensor:
        y = self.attention(self._norm(self.input_layernorm, x), mask, dctx)
        return self._residual(y, self.attention.dense.bias, x, dctx, _site(dctx, self.layer, 1))

    def mlp_block(self, x: torch.Tensor, dctx: DropoutContext) -> torch.Tensor:
        y = self.mlp(self._norm(self.post_attention_layernorm, x))
        return self._residual(y, self.mlp.dense_4h_to_h.bias, x, dctx, _site(dctx, self.layer, 2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext) -> torch.Tensor:
        # Two halves, so that a compiler can take them one at a time (compile_halves).
        return self.mlp_block(self.attention_block(x, mask, dctx), dctx)

    # ---- the fused path: every half takes its LayerNorm'd input and returns (h, next LayerNorm of h)
    def _residual_norm(self, y, bias, residual, dctx: DropoutContext, norm_weight, norm_bias, eps: float,
                       which: int):
        # which: the dropout site, 1 after the attention, 2 after the MLP (DropoutContext.kernel_seed)
        p = self.cfg.hidden_dropout if dctx.active(self.cfg.hidden_dropout) else 0.0
        return residual_norm_kernels.residual_norm(y, bias, residual, dctx.kernel_seed(which, y.device, p), p,
                                                   self.mask_salt, norm_weight, norm_bias, eps)

    def attention_block_fused(self, x, x_normed, mask, dctx: DropoutContext):
        y = self.attention(x_normed, mask, dctx)
        n = self.post_attention_layernorm
        return self._residual_norm(y, self.attention.dense.bias, x, dctx, n.weight, n.bias, n.eps, 1)

    def mlp_block_fused(self, x, x_normed, dctx: DropoutContext, norm_weight, norm_bias, eps: float):
        # the next LayerNorm's tensors come as arguments (not the module): one graph serves every layer
        y = self.mlp(x_normed)
        return self._residual_norm(y, self.mlp.dense_4h_to_h.bias, x, dctx, norm_weight, norm_bias, eps, 2)

    def forward_fused(self, x: torch.Tensor, x_normed: torch.Tensor, mask: torch.Tensor | None,
                      dctx: DropoutContext, next_norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer on ``(x, input_layernorm(x))`` → ``(out, next_norm(out))``, ``next_norm`` being the
        next layer's input LayerNorm or the final one (``self.residual_norm`` must be True)."""
        h, h_normed = self.attention_block_fused(x, x_normed, mask, dctx)
        return self.mlp_block_fused(h, h_normed, dctx, next_norm.weight, next_norm.bias, next_norm.eps)

    # ---- the last layer pruned to the rows the losses read: dctx.rows [b, n] names their positions.
    # Keys and values still come from every row; the queries, the output projection, the MLP and the
    # LayerNorms run on n rows (at seq 512 the MLM targets and [CLS] are 78 of 512 rows per sample).
    # Under sequence parallel the rows are sharded like the sequence: after the output projection's
    # reduce-scatter each rank holds n/tp of them, and the MLP runs on them as on a sequence shard.
    # The MLP halves repeat mlp_block's two lines as their own functions, so that a compiler caches
    # their graph (n rows) apart from every other layer's (s rows), not as one dynamic-shape graph.
    def _rows_of(self, x: torch.Tensor, dctx: DropoutContext) -> torch.Tensor:
        """The residual stream ``x`` at ``dctx.rows``: ``[n, b, h]`` (SP: this rank's ``[n/tp, b, h]``)."""
        return rows_of_shards(x, dctx.rows, self.ps) if self.sp else take_rows(x, row_index(dctx.rows, x.shape[1]))

    def rows_chunk(self, dctx: DropoutContext) -> DropoutContext:
        """``dctx`` for the residual stream after the row-pruned attention (SP: this rank's chunk of the
        rows, so that keyed dropout indexes its masks by their positions)."""
        if not self.sp:
            return dctx
        n = dctx.rows.shape[1] // self.ps.tp_size
        return dctx.at_rows(dctx.rows[:, self.ps.tp_rank * n:(self.ps.tp_rank + 1) * n])

    def attention_rows_block(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext) -> torch.Tensor:
        y = self.attention.forward_rows(self._norm(self.input_layernorm, x), row_index(dctx.rows, x.shape[1]), mask,
                                        dctx)
        return self._residual(y, self.attention.dense.bias, self._rows_of(x, dctx), self.rows_chunk(dctx),
                              _site(dctx, self.layer, 1))

    def mlp_rows_block(self, x: torch.Tensor, dctx: DropoutContext) -> torch.Tensor:
        y = self.mlp(self._norm(self.post_attention_layernorm, x))
        return self._residual(y, self.mlp.dense_4h_to_h.bias, x, dctx, _site(dctx, self.layer, 2))

    def forward_rows(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext) -> torch.Tensor:
        """``[s, b, h]`` → the layer's output ``[n, b, h]`` at the positions ``dctx.rows`` (SP:
        ``[s/tp, b, h]`` → this rank's ``[n/tp, b, h]``)."""
        return self.mlp_rows_block(self.attention_rows_block(x, mask, dctx), self.rows_chunk(dctx))

    def attention_rows_fused(self, x, x_normed, mask, dctx: DropoutContext):
        y = self.attention.forward_rows(x_normed, row_index(dctx.rows, x.shape[1]), mask, dctx)
        n = self.post_attention_layernorm
        return self._residual_norm(y, self.attention.dense.bias, self._rows_of(x, dctx), dctx, n.weight, n.bias,
                                   n.eps, 1)

    def mlp_rows_fused(self, x, x_normed, dctx: DropoutContext, norm_weight, norm_bias, eps: float):
        y = self.mlp(x_normed)
        return self._residual_norm(y, self.mlp.dense_4h_to_h.bias, x, dctx, norm_weight, norm_bias, eps, 2)

    def forward_rows_fused(self, x, x_normed, mask, dctx: DropoutContext, next_norm: nn.Module):
        """forward_fused at the positions ``dctx.rows``: → ``(out, next_norm(out))``, each ``[n, b, h]``."""
        h, h_normed = self.attention_rows_fused(x, x_normed, mask, dctx)
        return self.mlp_rows_fused(h, h_normed, dctx, next_norm.weight, next_norm.bias, next_norm.eps)

    def compile_halves(self, mode: str | None = "default", backend: str = "inductor") -> None:
        """torch.compile the attention half and the MLP half as two graphs.

        The residual stream between them is then a graph boundary: it is written once in bf16 and
        saved for the MLP half's LayerNorm backward. Compiled as one graph, Inductor recomputes it
        in the backward from the attention output, the dropout mask and the layer input, and hands
        the fp32 result to the LayerNorm-backward kernel through a 64 MB buffer (bench/NOTES.md).
        """
        for name in ("attention_block", "mlp_block", "attention_block_fused", "mlp_block_fused",
                     "attention_rows_block", "mlp_rows_block", "attention_rows_fused", "mlp_rows_fused"):
            setattr(self, name, torch.compile(getattr(self, name), mode=mode, backend=backend))


class TransformerEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig, rt: ModelRuntime, ps: ParallelState, init: InitMethod, out_init: InitMethod):
        super().__init__()
        self.rt = rt
        self.layers = nn.ModuleList(TransformerLayer(cfg, rt, ps, i, init, out_init) for i in range(cfg.num_layers))
        self.final_layernorm = make_layernorm(cfg.hidden_size, cfg.layernorm_epsilon, ps.device, rt.sequence_parallel)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """``[s, b, h]`` → ``[s, b, h]``; with ``rows [b, n]`` (positions) the last layer computes only
        those rows: → ``[n, b, h]``. Sequence parallel: this rank's shard of either (``n`` a multiple
        of tp)."""
        if rows is not None and not self.layers:
            raise ValueError("pruning the last layer needs at least one layer")
        if self.layers and self.layers[0].residual_norm and not torch.is_autocast_enabled(x.device.type):
            return self._forward_fused(x, mask, dctx, rows)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            fn, layer_dctx = (layer.forward_rows, dctx.at_rows(rows)) if rows is not None and i == last else (layer, dctx)
            if self.rt.recompute == "full" and torch.is_grad_enabled():
                x = checkpoint(fn, dctx.tracker, x, mask, layer_dctx)
            else:
                x = fn(x, mask, layer_dctx)
        return self.final_layernorm(x)

    def _forward_fused(self, x: torch.Tensor, mask: torch.Tensor | None, dctx: DropoutContext,
                       rows: torch.Tensor | None) -> torch.Tensor:
        """The same function, each residual epilogue fused with the LayerNorm that reads its result."""
        nexts = [layer.input_layernorm for layer in self.layers[1:]] + [self.final_layernorm]
        normed = self.layers[0]._norm(self.layers[0].input_layernorm, x)
        last = len(self.layers) - 1
        # Every layer's three mask seeds in one draw ([layers, 3]; each layer gets its row, a view).
        # Drawn inside the compiled halves they cost a generator launch per half (48 at 24 layers).
        seeds = dropout_kernels.draw_seed(x.device, len(self.layers), 3) if dctx.training else None
        for i, (layer, next_norm) in enumerate(zip(self.layers, nexts)):
            if seeds is not None:
                dctx = dctx.with_seeds(seeds[i])
            if rows is not None and i == last:
                x, normed = layer.forward_rows_fused(x, normed, mask, dctx.at_rows(rows), next_norm)
            else:
                x, normed = layer.forward_fused(x, normed, mask, dctx, next_norm)
        return normed
