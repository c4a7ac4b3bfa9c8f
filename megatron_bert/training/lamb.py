"""``optim=lamb``: LAMB (You et al., "Large Batch Optimization for Deep Learning", 2020), the optimizer of
large-batch BERT pretraining, exact under tensor and data parallelism.

Per parameter, with bias-corrected Adam moments::

    m = β1 m + (1 − β1) g          v = β2 v + (1 − β2) g²
    u = (m / (1 − β1ᵗ)) / (sqrt(v / (1 − β2ᵗ)) + ε) + λ w
    w ← w − lr · r · u,    r = ‖w‖ / ‖u‖  (1 when either norm is 0)

The trust ratio ``r`` compares norms of *whole* tensors. A TP shard (or a ZeRO slice) is only a part of
its tensor, and its own norm would give every rank another ratio: the layouts would train different
models. Here both norms of every tensor come from parallel.whole_tensor_norms (squares summed over
the TP group for sharded params and over DP for distributed-optimizer slices, counted once where
replicated), so TP=1, TP=2 and TP=2 × DP=2 with sharded moments take the same steps (tests/test_lamb.py).
apex's FusedLAMB takes each rank's local norms, so it is not used even where apex is importable.

As NVIDIA's BERT recipe (apex FusedLAMB without ``use_nvlamb``): the trust ratio applies to the weight-
decayed group (matrices and embeddings); biases and LayerNorm weights take plain Adam steps. The
state is AdamW's (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter): checkpoints move between the two.

Two modes. Eager (default): step counts on the host, the ratios copied to the host once per step so that
each group's scaling is one multi-tensor kernel. ``capturable=True`` (``train.cuda_graph``): everything on
the device — step counts, bias corrections, the LR (a tensor the schedule fills), the ratios — and, like
torch's fused AdamW, ``grad_scale`` / ``found_inf`` set by the trainer: grads divided by the one, the whole
step (moments, counts, weights) left as it was where the other is 1, with no host decision.
"""
from __future__ import annotations

import torch

from parallel import ParallelState, is_tp_sharded, whole_tensor_norms


class Lamb(torch.optim.Optimizer):
    """Param groups as AdamW's (``lr``, ``betas``, ``eps``, ``weight_decay``) plus ``trust_ratio``
    (bool, default True). A param may carry ``dp_sliced = True``: it is this rank's ZeRO slice."""

    def __init__(self, params, ps: ParallelState, lr=1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.01, trust_ratio: bool = True, capturable: bool = False):
        if not float(lr) > 0 or not eps >= 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"LAMB: lr={lr}, eps={eps}, betas={betas}: need lr > 0, eps >= 0, 0 <= beta < 1")
        # ("capturable" in the groups also tells checkpoint/sharded.py to make step counts device tensors)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      trust_ratio=trust_ratio, capturable=capturable))
        self.ps, self.capturable = ps, capturable
        self.skips_on_device = capturable  # optim.step_if_finite then hands over grad_scale / found_inf
        self.grad_scale: torch.Tensor | None = None
        self.found_inf: torch.Tensor | None = None
        self._layout: dict = {}  # param ids -> (tp_sharded, dp_sliced) masks on the device, weights then updates

    def _masks(self, params: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        key = tuple(id(p) for p in params)
        if key not in self._layout:  # the params that have grads are the same step after step
            dev = params[0].device
            tp = torch.tensor([is_tp_sharded(p) for p in params], device=dev)
            dp = torch.tensor([bool(getattr(p, "dp_sliced", False)) for p in params], device=dev)
            # for the weights and the updates together; made before any capture (host→device copies)
            self._layout[key] = (torch.cat([tp, tp]), torch.cat([dp, dp]))
        return self._layout[key]

    def _kept(self, device) -> torch.Tensor:
        """Capturable mode: a device scalar, 1 where this step counts, 0 where the trainer found
        non-finite grads."""
        if self.found_inf is None:
            return torch.ones((), dtype=torch.float32, device=device)
        return 1.0 - self.found_inf.to(device=device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        todo = []  # (group, params, updates) of every group, for one norm call over them all
        kept = None  # capturable: the device scalar of _kept, the same for every group
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if self.capturable:
                kept = self._kept(params[0].device) if kept is None else kept
                todo.append((group, params, self._direction_on_device(group, params, kept)))
            else:
                todo.append((group, params, self._direction(group, params)))
        if not todo:
            return loss
        adapted = [(p, u) for g, ps_, us in todo if g["trust_ratio"] for p, u in zip(ps_, us)]
        ratios = iter(())
        if adapted:
            weights, updates = [p for p, _ in adapted], [u for _, u in adapted]
            tp, dp = self._masks(weights)
            norms = whole_tensor_norms(weights + updates, self.ps, tp, dp)
            w_norm, u_norm = norms[:len(weights)], norms[len(weights):]
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            if self.capturable:  # per-tensor device factors (one kernel per tensor: cheap inside a graph)
                ratios = iter(ratio.unbind(0))
            else:  # to the host: a scalar list keeps each group's multiply one multi-tensor kernel
                ratios = iter(ratio.double().tolist())
        for group, params, updates in todo:
            factor = -group["lr"] if kept is None else -group["lr"] * kept  # (capturable: 0 on a skipped step)
            if group["trust_ratio"]:
                factors = [factor * next(ratios) for _ in params]
            else:  # (capturable: a list, see _direction_on_device)
                factors = factor if kept is None else [factor] * len(params)
            torch._foreach_mul_(updates, factors)
            torch._foreach_add_(params, updates)
        return loss

    def _states(self, params: list[torch.Tensor], step_device) -> tuple[list, list, list]:
        """(step counts, exp_avg, exp_avg_sq) of ``params``, made (zeros) on their first step; the counts
        live on ``step_device`` (the host, or the params' device when capturable)."""
        states = []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32, device=step_device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(st)
        return ([st["step"] for st in states], [st["exp_avg"] for st in states],
                [st["exp_avg_sq"] for st in states])

    @staticmethod
    def _update_into_grads(group, params, grads, exp_avg, exp_avg_sq, eps_terms, scales) -> list[torch.Tensor]:
        """u = scale · m / (sqrt(v) + eps_term) + λ w, per tensor, written into the grad buffers (which
        the step consumes: no extra memory). ``eps_terms`` / ``scales``: one float or device scalar per
        tensor (the bias corrections folded in, see :meth:`_direction`)."""
        u = grads
        torch._foreach_copy_(u, exp_avg_sq)
        torch._foreach_sqrt_(u)
        torch._foreach_add_(u, eps_terms)
        torch._foreach_reciprocal_(u)
        torch._foreach_mul_(u, exp_avg)
        torch._foreach_mul_(u, scales)
        if group["weight_decay"]:
            torch._foreach_add_(u, params, alpha=group["weight_decay"])
        return u

    def _direction(self, group: dict, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Eager mode: moments updated; the Adam direction plus weight decay, in the grad buffers."""
        beta1, beta2 = group["betas"]
        steps, exp_avg, exp_avg_sq = self._states(params, "cpu")  # (host counts, AdamW's layout)
        torch._foreach_add_(steps, 1.0)
        ts = torch.stack(steps).double().tolist()
        # m̂ / (sqrt(v̂) + eps) = (c1 / c2) · m / (sqrt(v) + eps / c2),  c1 = 1 / (1 - β1ᵗ), c2 = 1 / sqrt(1 - β2ᵗ)
        c2 = [(1.0 - beta2 ** t) ** -0.5 for t in ts]
        scale = [(1.0 - beta1 ** t) ** -1 / c for t, c in zip(ts, c2)]
        grads = [p.grad for p in params]
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        return self._update_into_grads(group, params, grads, exp_avg, exp_avg_sq,
                                       [group["eps"] / c for c in c2], scale)

    def _direction_on_device(self, group: dict, params: list[torch.Tensor], kept: torch.Tensor) -> list[torch.Tensor]:
        """:meth:`_direction` with no host value: a skipped step (``kept`` = 0) zeroes the grads (NaN and
        inf included) and leaves moments and counts as they were. Device scalars enter the multi-tensor
        ops only as lists (one per tensor), never as the single-tensor overloads, which may read them on
        the host (not allowed while a CUDA graph is being captured)."""
        beta1, beta2 = group["betas"]
        dev, n = params[0].device, len(params)
        steps, exp_avg, exp_avg_sq = self._states(params, dev)
        grads = [p.grad for p in params]
        if self.grad_scale is not None:
            torch._foreach_mul_(grads, [self.grad_scale.to(dev, torch.float32).reciprocal()] * n)
        if self.found_inf is not None:
            for g in grads:
                torch.nan_to_num_(g, nan=0.0, posinf=0.0, neginf=0.0)
            torch._foreach_mul_(grads, [kept] * n)
        counted = torch.stack(steps) + kept
        torch._foreach_copy_(steps, list(counted.unbind(0)))
        ts = counted.clamp(min=1.0)  # (a first step that was skipped: no division by 0)
        c2 = (1.0 - torch.pow(beta2, ts)).rsqrt()
        scale = (1.0 - torch.pow(beta1, ts)).reciprocal() / c2
        torch._foreach_mul_(exp_avg, [1.0 - (1.0 - beta1) * kept] * n)  # (β1 on a kept step, 1 on a skipped one)
        torch._foreach_add_(exp_avg, grads, alpha=1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, [1.0 - (1.0 - beta2) * kept] * n)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        return self._update_into_grads(group, params, grads, exp_avg, exp_avg_sq,
                                       list((group["eps"] / c2).unbind(0)), list(scale.unbind(0)))
