"""``optim.distributed_optimizer=true``: fp32 masters and AdamW moments sharded over data parallel.

Megatron-LM's distributed optimizer (ZeRO stage 1). Each DP rank keeps fp32 master copies of only its
slice of every parameter (parallel/dp_shard.py says which) and the optimizer, built by the trainer's
``make_optimizer`` over those slices, keeps moments for them alone. Per step:

    backward → fp32 whole grads (16-bit grads added in, as MasterWeightsOptimizer does; fp32 runs use
    p.grad) → [SP sum over TP] → reduce-scatter over DP into the slices' grads (:meth:`reduce_grads`)
    → norm / clip / AdamW on the slices → all-gather of the new slices into every replica's params.

It is the same arithmetic as the replicated optimizer (AdamW is elementwise; the sum of each grad
element is the same sum), so runs agree with unsharded DP runs to the last bits of the grad norm. The
slices are the checkpoint's tensors: ``model.<name>`` and ``optim.<name>.*`` are written as DTensors
with a DP placement (checkpoint/sharded.py), and load into any TP/DP size, sharded or not.
"""
from __future__ import annotations

import torch

from parallel import ParallelState, allreduce_sequence_parallel_grads
from parallel.dp_shard import DPShardPlan

from .optim import WrapsOptimizer, copy_param_attrs, fold_grads, param_groups


class DistributedOptimizer(WrapsOptimizer):
    """Drop-in for the trainer's optimizer (torch AdamW or :class:`~.optim.MasterWeightsOptimizer`)
    when ``optim.distributed_optimizer`` is on and DP > 1. ``mixed``: the model is in bf16/fp16 and its
    grads are accumulated into fp32 whole-grad buffers here; otherwise ``p.grad`` (fp32) is used as is.
    ``reduce_16bit`` (``optim.grad_reduce_dtype=param``, mixed only): no fp32 whole grads at all; autograd
    accumulates the micro-batches into the 16-bit ``p.grad`` and the reduce-scatter sums in 16 bits (half
    the traffic; the sums are rounded to 16 bits), the slices then go to fp32 for the step. In memory that
    is the fp32 whole grads gone but the 16-bit ones kept across micro-batches: 2 bytes per parameter less
    while a second micro-batch runs (BENCHMARKS.md, session 20).

    ``masters`` (the optimizer's params, one per model param) carry the TP metadata of their param;
    ``dp_shard_dims`` (param → the dim its slices are cut along, None: whole) tells the checkpoint,
    ``dp_sharded`` (per master: a slice or not) the grad norm, both read off ``plan``."""

    deferred = None  # the trainer's deferred 16-bit grad path does not apply (DP > 1)

    def __init__(self, model: torch.nn.Module, make_optimizer, ps: ParallelState, mixed: bool,
                 reduce_16bit: bool = False):
        self.ps, self.mixed, self.reduce_16bit = ps, mixed, reduce_16bit and mixed
        # the order of param_groups(): decay then no-decay, the same on every rank
        self.model_params = [p for g in param_groups(model, 0.0) for p in g["params"]]
        dtypes = {p.dtype for p in self.model_params}
        if len(dtypes) != 1:
            raise ValueError(f"the distributed optimizer needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.plan = DPShardPlan(self.model_params, ps)
        with torch.no_grad():
            self.masters = [torch.nn.Parameter(self.plan.slice_of(p.detach(), i).float().clone())
                            for i, p in enumerate(self.model_params)]
        for p, m, dim in zip(self.model_params, self.masters, self.plan.dims):
            copy_param_attrs(p, m)
            m.dp_sliced = dim is not None  # a per-tensor norm (LAMB's) sums this master over DP
        self.master_of = dict(zip(self.model_params, self.masters))
        self.dp_shard_dims = dict(zip(self.model_params, self.plan.dims))
        self.dp_sharded = [d is not None for d in self.plan.dims]
        self.optimizer = make_optimizer(model, self.master_of)
        self._whole: list[torch.Tensor | None] = [None] * len(self.model_params)  # mixed: fp32 whole grads

    def state_bytes(self) -> tuple[int, int]:
        """(bytes of fp32 masters + AdamW moments on this rank, bytes they would take unsharded)."""
        mine = sum(m.numel() for m in self.masters) * 4 * 3
        whole = sum(p.numel() for p in self.model_params) * 4 * 3
        return mine, whole

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        for m in self.masters:
            m.grad = None
        self._whole = [None] * len(self.model_params)

    def accumulate_grads(self) -> None:
        """Mixed precision, after each micro-batch's backward: 16-bit grads → fp32 whole grads (with
        ``reduce_16bit`` they stay where they are: the next backward adds into them)."""
        if self.reduce_16bit:
            return
        whole, params = self._whole, self.model_params

        def attach(i):
            whole[i] = torch.empty(params[i].shape, dtype=torch.float32, device=params[i].device)
            return whole[i]

        with torch.no_grad():
            fold_grads(params, whole.__getitem__, attach)

    def reduce_grads(self) -> None:
        """The whole grads' SP sum over TP, then their DP sum, each rank keeping its slices' (as the
        masters' ``.grad``). A param no micro-batch reached counts as a zero grad, so every rank
        enters the same collectives."""
        with torch.no_grad():
            in_place = not self.mixed or self.reduce_16bit  # autograd's own p.grad (fp32, or 16-bit)
            whole = [p.grad for p in self.model_params] if in_place else self._whole
            dtype = self.model_params[0].dtype if in_place else torch.float32
            whole = [g if g is not None else torch.zeros(p.shape, dtype=dtype, device=p.device)
                     for g, p in zip(whole, self.model_params)]
            allreduce_sequence_parallel_grads(self.model_params, self.ps, grads=whole)  # (summed in fp32)
            for m, g in zip(self.masters, self.plan.reduce_scatter(whole)):
                # a view of its bucket's reduce-scatter output (or the summed whole grad); fp32 for AdamW
                m.grad = g if g.dtype == torch.float32 else g.float()
        self._whole = [None] * len(self.model_params)
        for p in self.model_params:
            p.grad = None  # the whole grads are no longer needed: free them before the step

    def step(self) -> None:
        self.optimizer.step()
        self.gather_params()

    def gather_params(self) -> None:
        """Every rank's master slices → every replica's (16-bit or fp32) model parameters."""
        self.plan.all_gather(self.masters, self.model_params)

    def after_load(self) -> None:
        """Called by the checkpoint loader once the slices are in: the model follows its masters."""
        hook = getattr(self.optimizer, "after_load", None)
        if hook is not None:
            hook()
        self.gather_params()
