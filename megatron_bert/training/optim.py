"""AdamW (or LAMB: lamb.py) with weight-decay groups, the LR schedule, and fp16 dynamic loss scaling."""
from __future__ import annotations

import math
import os

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, substitute: dict | None = None) -> list[dict]:
    """No decay on biases and LayerNorm weights (every 1-D parameter), decay on the rest.

    ``substitute`` maps model params to the tensors the optimizer should own (fp32 masters)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(substitute[p] if substitute else p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _apex_fused_adam():
    try:
        from apex.optimizers import FusedAdam  # NVIDIA apex, optional (built from source)
    except Exception:
        return None
    return FusedAdam


def build_optimizer(model, lr: float, weight_decay: float, betas, eps: float, device: torch.device,
                    substitute: dict | None = None, capturable: bool = False, name: str = "adamw", ps=None):
    """AdamW: apex's FusedAdam on GPU when importable, else torch's fused kernel; a plain loop on CPU.
    ``name="lamb"``: :class:`~.lamb.Lamb` (needs ``ps``, the parallel state its norms reduce over), with
    the trust ratio on the weight-decayed group only.

    ``capturable`` (CUDA graphs) always takes torch's fused AdamW with the LR as a device tensor: the
    captured kernel reads the LR from memory, so the schedule changes it in place between replays."""
    groups = param_groups(model, weight_decay, substitute)
    if name == "lamb":
        from .lamb import Lamb

        groups[0]["trust_ratio"], groups[1]["trust_ratio"] = True, False
        if capturable:  # the LR a device tensor (filled in place by the schedule), no host decisions
            return Lamb(groups, ps, lr=torch.tensor(lr, device=device), betas=betas, eps=eps, capturable=True)
        return Lamb(groups, ps, lr=lr, betas=betas, eps=eps)
    if device.type == "cuda":
        fused = None if capturable else _apex_fused_adam()
        if fused is not None:
            return fused(groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True)
        if capturable:
            return torch.optim.AdamW(groups, lr=torch.tensor(lr, device=device), betas=betas, eps=eps,
                                     fused=True, capturable=True)
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False)


FLAT_ADAMW_ENV = "MEGATRON_BERT_FLAT_ADAMW"


def use_flat_adamw(device: torch.device, capturable: bool = False) -> bool:
    """Whether the mixed-precision masters take the one-pass flat AdamW (flat_adamw.py): on CUDA with
    Triton, where build_optimizer would take torch's fused AdamW (not apex's FusedAdam), unless
    ``MEGATRON_BERT_FLAT_ADAMW=0`` (for A/B runs). CPU keeps the per-tensor path."""
    if device.type != "cuda" or os.environ.get(FLAT_ADAMW_ENV, "1") == "0":
        return False
    if not capturable and _apex_fused_adam() is not None:
        return False
    from .flat_adamw import available

    return available()


def _skips_on_device(optimizer) -> bool:
    """torch's fused AdamW divides the grads by ``grad_scale`` and skips the update where ``found_inf``
    is 1 inside its own kernel: clipping and the non-finite skip then cost no pass and no host sync.
    A capturable LAMB (lamb.py) does the same in its multi-tensor passes."""
    if getattr(optimizer, "skips_on_device", False):
        return True
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def step_if_finite(optimizer, params, coef: torch.Tensor, finite: torch.Tensor) -> None:
    """AdamW step on the grads times ``coef`` (the clip coefficient), skipped where ``finite`` is False.

    ``optimizer`` is an optimizer or a :class:`MasterWeightsOptimizer`; ``params`` what it updates."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if _skips_on_device(inner):
        inner.grad_scale = coef.reciprocal()
        inner.found_inf = (~finite).float()
        optimizer.step()
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef)
    if bool(finite):  # a host decision: one sync (free on CPU)
        optimizer.step()


def _decay(shape: str, progress: float) -> float:
    """The share of (lr - min_lr) left at ``progress`` in [0, 1] of a decay of this shape."""
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress  # linear


class LRSchedule:
    """Linear warmup to ``lr``, then, to ``min_lr`` at ``total_steps``:

    * ``linear`` / ``cosine``: decay over every step after the warmup;
    * ``constant``: no decay;
    * ``wsd`` (warmup-stable-decay): constant, then a ``decay_style`` decay (linear, cosine, 1-sqrt) over
      the last ``decay_steps`` steps;
    * ``inverse_sqrt``: ``lr * sqrt(warmup / (step + 1))`` (Megatron-LM's and fairseq's), not below ``min_lr``.
    """

    def __init__(self, lr: float, total_steps: int, warmup_steps: int, style: str = "linear", min_lr: float = 0.0,
                 decay_steps: int = 0, decay_style: str = "linear"):
        self.lr, self.total, self.warmup, self.style, self.min_lr = lr, max(total_steps, 1), warmup_steps, style, min_lr
        self.decay_steps, self.decay_style = decay_steps, decay_style

    def __call__(self, step: int) -> float:
        """LR used for optimizer step number ``step`` (0-based)."""
        if self.warmup > 0 and step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.style == "constant":
            return self.lr
        if self.style == "inverse_sqrt":
            return max(self.min_lr, self.lr * math.sqrt(max(self.warmup, 1) / (step + 1)))
        if self.style == "wsd":
            start = max(self.warmup, self.total - self.decay_steps)
            if step < start:
                return self.lr
            progress = min(1.0, (step - start) / max(1, self.total - start))
            return self.min_lr + (self.lr - self.min_lr) * _decay(self.decay_style, progress)
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.min_lr + (self.lr - self.min_lr) * _decay(self.style, progress)

    def apply(self, optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            if isinstance(g["lr"], torch.Tensor):  # a capturable optimizer reads it from device memory
                g["lr"].fill_(lr)
            else:
                g["lr"] = lr
        return lr


class LossScaler:
    """fp16 dynamic loss scaling: halve on overflow (step skipped), double after ``growth_interval``
    clean steps. Overflow is judged from the global grad norm, which is the same on every rank."""

    def __init__(self, enabled: bool, init_scale: float = 2.0**16, growth_interval: int = 1000,
                 min_scale: float = 1.0, max_scale: float = 2.0**24):
        self.enabled = enabled
        self.scale = init_scale if enabled else 1.0
        self.growth_interval, self.min_scale, self.max_scale = growth_interval, min_scale, max_scale
        self.good_steps = 0

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale = max(self.min_scale, self.scale / 2)
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps % self.growth_interval == 0:
                self.scale = min(self.max_scale, self.scale * 2)

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, d: dict) -> None:
        self.scale, self.good_steps = float(d["scale"]), int(d["good_steps"])


_PARAM_ATTRS = ("tensor_parallel", "partition_dim", "partition_stride", "sequence_parallel")


def copy_param_attrs(src: torch.Tensor, dst: torch.Tensor) -> None:
    """A master (copy or slice) carries its param's TP / SP metadata: norms and checkpoints read it there."""
    for attr in _PARAM_ATTRS:
        if hasattr(src, attr):
            setattr(dst, attr, getattr(src, attr))


def fold_grads(params: list[torch.nn.Parameter], current, attach) -> None:
    """Each param's (16-bit) grad into its fp32 accumulator, then freed: ``current(i)`` is param i's
    accumulator or None before this step's first micro-batch; then ``attach(i)`` makes (and records) a
    new one and the grad is copied into it, else added. Two multi-tensor launches for ~300 tensors."""
    fresh, acc = ([], []), ([], [])
    for i, p in enumerate(params):
        if p.grad is None:
            continue
        target = current(i)
        if target is None:
            fresh[0].append(attach(i)), fresh[1].append(p.grad)
        else:
            acc[0].append(target), acc[1].append(p.grad)
        p.grad = None
    if fresh[0]:
        torch._foreach_copy_(*fresh)
    if acc[0]:
        torch._foreach_add_(*acc)


class WrapsOptimizer:
    """What the trainer, the LR schedule and the checkpoint read of an optimizer wrapper (its ``optimizer``)."""

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state


class MasterWeightsOptimizer(WrapsOptimizer):
    """Low-precision (bf16/fp16) model parameters, fp32 master copies that the optimizer updates.

    After each micro-batch's backward, :meth:`accumulate_grads` adds the low-precision grads into
    fp32 master grads (so accumulation over many micro-batches does not lose bits) and frees them.
    Gradient sync, clipping and the step then work on the masters; :meth:`step` copies the updated
    masters back into the model. This is Megatron's mixed-precision scheme without autocast's
    per-step weight casts.

    ``flat=True`` (see :func:`use_flat_adamw`): masters, master grads, moments and the model's 16-bit
    weights live in flat buffers, group by group (flat_adamw.FlatBuffers; the model parameters are
    re-pointed into theirs here), and the torch AdamW that ``make_optimizer`` builds is replaced by a
    :class:`~.flat_adamw.FlatAdamW` with its groups and hyper-parameters, whose step also writes the
    16-bit weights. Master grads are then views of one flat buffer that lives, like the per-tensor
    master grads, from the first micro-batch's accumulation to the next ``zero_grad`` (which also sets
    ``.grad = None``: "no grad yet this step").
    """

    def __init__(self, model: torch.nn.Module, make_optimizer, flat: bool = False):
        self.model_params: list[torch.nn.Parameter] = []
        self.masters: list[torch.nn.Parameter] = []
        self.master_of: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        self.flat = None
        self._defer = False  # enable_deferred_copy
        if flat:
            from .flat_adamw import FlatBuffers

            # the order of param_groups(): each group is then one contiguous slice of every buffer
            groups = [g["params"] for g in param_groups(model, 0.0)]
            self.model_params = [p for g in groups for p in g]
            self.flat = FlatBuffers(groups)
            self.masters = list(self.flat.masters)
        else:
            for p in model.parameters():
                if p.requires_grad:
                    self.model_params.append(p)
                    self.masters.append(torch.nn.Parameter(p.detach().float().clone()))
        for p, m in zip(self.model_params, self.masters):
            copy_param_attrs(p, m)
            self.master_of[p] = m
        self.optimizer = make_optimizer(model, self.master_of)
        if flat:
            from .flat_adamw import FlatAdamW

            self.optimizer = FlatAdamW.like(self.optimizer, self.flat)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.model_params:
            p.grad = None
        for m in self.masters:
            m.grad = None
        if self.flat is not None:
            self.flat.release_grads()

    def enable_deferred_copy(self) -> bool:
        """Let a step of one micro-batch skip the 16-bit → fp32 grad copy: :meth:`accumulate_grads` then
        keeps the first micro-batch's grads where autograd left them (:attr:`deferred`, for the grad norm)
        and the flat AdamW reads them through a pointer table (−0.6 ms copy and −0.2 ms of norm traffic
        at 345M on H200). Only for callers that do nothing else with master grads between backward and
        step (no DP all-reduce, no fp16 unscaling; a sequence-parallel sum must go to :attr:`deferred`):
        the trainer decides. A second
        micro-batch, an unaligned grad or an optimizer that cannot read them copies as before. Returns
        whether it is on (the flat AdamW; its torch path, used on CPU by tests, copies inside its step)."""
        self._defer = self.flat is not None  # whether a step can read them: _can_defer asks the optimizer
        return self._defer

    @property
    def deferred(self) -> list[torch.Tensor] | None:
        """This step's 16-bit grads, one per master in order, while their copy is deferred (else None)."""
        return self.flat.grads16 if self.flat is not None else None

    def materialize_grads(self) -> None:
        """Copy deferred 16-bit grads into the fp32 master grads (what accumulate_grads does otherwise)."""
        pending = self.deferred
        if pending is None:
            return
        self.flat.grads16 = None
        with torch.no_grad():
            views = self.flat.attach_grads()
            for m, v in zip(self.masters, views):
                m.grad = v
            torch._foreach_copy_(views, pending)

    def accumulate_grads(self) -> None:
        """Low-precision grads → fp32 master grads (copy on the first micro-batch, add after), in
        multi-tensor kernels: one launch for ~300 tensors instead of one each. With
        :meth:`enable_deferred_copy`, the first micro-batch's grads stay as they are until a second
        one comes (then both go to fp32) or the step reads them."""
        if self.deferred is not None:
            self.materialize_grads()
        self._accumulate(defer=self._defer)

    def _can_defer(self) -> bool:
        if not self.optimizer.reads_grads16 or any(m.grad is not None for m in self.masters):
            return False  # (the flat AdamW fell back to torch's: it reads fp32 grads)
        for p in self.model_params:
            g = p.grad
            if g is None or g.dtype != p.dtype or g.shape != p.shape or not g.is_contiguous() or g.data_ptr() % 16:
                return False
        return True

    def _accumulate(self, defer: bool) -> None:
        with torch.no_grad():
            if defer and self._can_defer():
                self.flat.grads16 = [p.grad for p in self.model_params]
                for p in self.model_params:
                    p.grad = None
                return
            flat_grads = self.flat.attach_grads() if self.flat is not None else None
            masters = self.masters

            def attach(i):
                m = masters[i]
                m.grad = torch.empty_like(m) if flat_grads is None else flat_grads[i]
                return m.grad

            fold_grads(self.model_params, lambda i: masters[i].grad, attach)

    def step(self) -> None:
        self.optimizer.step()  # deferred grads only where it reads them (_can_defer; else it raises)
        if self.flat is None:  # the flat optimizer writes the 16-bit weights itself
            with torch.no_grad():
                torch._foreach_copy_(self.model_params, self.masters)

    def after_load(self) -> None:
        """Called by the checkpoint loader once tensors are in (flat mode re-checks its fast path)."""
        hook = getattr(self.optimizer, "after_load", None)
        if hook is not None:
            hook()
