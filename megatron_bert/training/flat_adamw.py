"""One-pass AdamW over flat buffers for the bf16/fp16 mixed-precision path (GPU: one Triton launch per group).

Why: with ~390 tensors, the mixed-precision step used to be torch's fused AdamW (multi-tensor launches
reading master, grad, exp_avg, exp_avg_sq) and then a second pass copying every fp32 master into its
16-bit model weight: 5.2 ms of an 81 ms 345M step on an H200 (the pass here: 2.5 ms, BENCHMARKS.md).
Here the fp32 masters, their grads and both moments are views into one contiguous fp32 buffer each,
and the 16-bit model weights are views into one 16-bit buffer, all laid out group by group
(:class:`FlatBuffers`). A param group is then one contiguous slice, and one kernel reads grad, master,
exp_avg, exp_avg_sq and writes master, exp_avg, exp_avg_sq and the 16-bit weight.

Semantics are those of ``torch.optim.AdamW(fused=True)`` (amsgrad and maximize off), and :class:`FlatAdamW`
*is* such an optimizer (param_groups, state, hyper-parameters, the LR schedule, ``grad_scale`` /
``found_inf`` set by ``optim.step_if_finite`` and checkpoints work unchanged):

    g = grad / grad_scale                        (a true division, as torch's kernel does, not g * 1/scale)
    skip everything, and do not advance step, where found_inf != 0
    p -= (lr * wd) * p                           (only where wd != 0)
    m = b1 * m + (1 - b1) * g ;  v = b2 * v + ((1 - b2) * g) * g
    bc1 = 1 - b1**step, bc2 = 1 - b2**step       (step after its increment; fp64, then rounded to fp32)
    p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)

lr, grad_scale, found_inf and step are read from device memory: no host sync, so the step can be captured
in a CUDA graph (a float LR is copied into a device scalar per step, so a captured step would keep the LR
of its capture: graphed runs use a tensor LR, see optim.build_optimizer). Unlike torch's kernel, the
grads are left as they are (torch writes the unscaled grads back; nothing reads them after the step).
The math is fp32 with IEEE-rounded division and square root (``tl.div_rn``, ``tl.sqrt_rn``: torch's
CUDA kernel uses IEEE ``/`` and ``sqrtf``; Triton's plain ``/`` and ``tl.sqrt`` are approximate) and no
FMA contraction, so the Triton kernel and :func:`flat_update_torch` (the same update in torch ops: the
CPU path, and the reference the kernel is tested against) agree bit for bit (checked on H200). Against
torch's fused AdamW they agree to a few ulps, except that torch's CUDA kernel forms ``1 - beta`` in
fp32 from an fp32 beta (1 - 0.999f is 1.3e-5 off 0.001) where this one, like torch's CPU AdamW, uses
``1 - beta`` computed in fp64: exp_avg_sq differs from torch's CUDA result by that factor.

With one micro-batch per step and no DP all-reduce between backward and step (a sequence-parallel sum
of a few grads works on the 16-bit grads in place), the copy of the 16-bit grads
into the flat fp32 grad buffer (0.63 ms at 345M on H200) is skipped: ``FlatBuffers.grads16`` holds them
where autograd left them, and a second kernel (``_adamw_table_kernel``, the same update and rounding)
reads each through a table of their addresses, uploaded per step without a host sync (see
:meth:`FlatBuffers.pointer_table` for what CUDA-graph capture needs of it). optim.MasterWeightsOptimizer
decides when (``enable_deferred_copy``).

One launch per group is exact only while every step counter is equal, i.e. every master had a grad in
every step (torch skips params whose grad is None and does not advance their step). The first step in
which some master has no grad switches to torch's own fused AdamW over the same views for good (then a
copy into the 16-bit weights); :meth:`FlatAdamW.after_load` (run by the checkpoint loader) re-checks
the counters.
"""
from __future__ import annotations

import warnings

import torch

from ..triton_support import usable
from .flat_adamw_kernels import (BLOCK, NUM_WARPS, TABLE_SUBBLOCKS, _adamw_kernel, _adamw_table_kernel,  # noqa: F401
                                 _log2, flat_update_triton, kernel_constexprs, table_update_triton)

ALIGN = 64  # elements: every tensor starts 256-byte (fp32) / 128-byte (16-bit) aligned, for vector loads


def available() -> bool:
    return usable()


class FlatBuffers:
    """fp32 masters, master grads, exp_avg and exp_avg_sq, one flat buffer each, plus one flat buffer of
    16-bit model weights; tensor ``i`` occupies ``[offsets[i], offsets[i] + numel)`` in every one of them.

    ``groups``: the 16-bit model parameters, group by group. The masters are created here (fp32 copies,
    as ``Parameter`` views of :attr:`master`), and the model parameters are re-pointed at views of
    :attr:`weight` (``p.data = view``: same Parameter objects, so modules, hooks and the autograd graph
    of later forwards see them; do it before anything compiles or captures the model). Padding between
    tensors is zero in every buffer and stays zero under the update (g = m = v = p = 0)."""

    def __init__(self, groups: list[list[torch.nn.Parameter]]):
        params = [p for g in groups for p in g]
        if not params:
            raise ValueError("no parameters to lay out")
        self.device, dtype = params[0].device, params[0].dtype
        if any(p.dtype != dtype or p.device != self.device for p in params):
            raise ValueError("flat buffers need every parameter on one device in one dtype")
        self.offsets, self.group_ranges, pos = [], [], 0
        for g in groups:
            start = pos
            for p in g:
                self.offsets.append(pos)
                pos += -(-p.numel() // ALIGN) * ALIGN
            self.group_ranges.append((start, pos))
        self.group_sizes = [len(g) for g in groups]
        self.shapes = [p.shape for p in params]

        def zeros(dt):
            return torch.zeros(pos, dtype=dt, device=self.device)

        self.numel = pos
        self.master, self.exp_avg, self.exp_avg_sq = (zeros(torch.float32) for _ in range(3))
        self.weight = zeros(dtype)
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        # The master grads live only from the first micro-batch's accumulation to the next zero_grad
        # (attach_grads / release_grads), as per-tensor master grads did: held for the whole run they
        # would add 4 bytes per parameter to the peak (+1.25 GiB at 345M, measured on H200).
        self.grad: torch.Tensor | None = None
        self.grads: list[torch.Tensor] | None = None
        # Or, with one micro-batch and no DP all-reduce (MasterWeightsOptimizer.enable_deferred_copy),
        # the step's 16-bit grads as autograd left them, read by the optimizer through a pointer table.
        self.grads16: list[torch.Tensor] | None = None
        self._tables = None  # per group: the table kernel's block rows (block_tables)
        self._pointer_tables: dict[tuple, tuple] = {}  # grad addresses → (host copy, device table, captured)
        self._spare_host: torch.Tensor | None = None  # pinned, for an upload during capture
        # the alignment gap after each tensor (< ALIGN elements each), zeroed in every fresh grad buffer
        gaps = [torch.arange(o + s.numel(), o + -(-s.numel() // ALIGN) * ALIGN)
                for o, s in zip(self.offsets, self.shapes)]
        self._padding = torch.cat(gaps).to(self.device)
        self.weights = self.views(self.weight)
        with torch.no_grad():
            masters = self.views(self.master)
            for p, m, w in zip(params, masters, self.weights):
                m.copy_(p.detach())
                w.copy_(p.detach())
                p.data = w
        self.masters = [torch.nn.Parameter(m) for m in masters]  # Parameter(t) shares t's memory

    def views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        return [buf[o:o + s.numel()].view(s) for o, s in zip(self.offsets, self.shapes)]

    def attach_grads(self) -> list[torch.Tensor]:
        """The master-grad views of this step, allocating the flat grad buffer (padding zeroed) if it
        is not there yet. The caller fills every view before the step (copy of the first micro-batch)."""
        if self.grad is None:
            self.grad = torch.empty(self.numel, dtype=torch.float32, device=self.device)
            if self._padding.numel():
                self.grad.index_fill_(0, self._padding, 0.0)
            self.grads = self.views(self.grad)
        return self.grads

    def release_grads(self) -> None:
        self.grad = self.grads = self.grads16 = None

    def block_tables(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per group, one row per program of the table kernel (TABLE_SUBBLOCKS · BLOCK elements each):
        which tensor it works on, where in it it starts, where that is in the flat buffers (int64) and
        how many elements it has (int32 otherwise). Fixed by the layout."""
        if self._tables is None:
            self._tables, first = [], 0
            span = BLOCK * TABLE_SUBBLOCKS
            for size in self.group_sizes:
                rows = []
                for i in range(first, first + size):
                    numel = self.shapes[i].numel()
                    rows += [(i, s, self.offsets[i] + s, min(span, numel - s)) for s in range(0, numel, span)]
                t, s, f, c = zip(*rows) if rows else ((), (), (), ())
                self._tables.append(tuple(torch.tensor(v, dtype=dt, device=self.device) for v, dt in
                                          ((t, torch.int32), (s, torch.int32), (f, torch.int64), (c, torch.int32))))
                first += size
        return self._tables

    def pointer_table(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The addresses of ``grads`` as an int64 device tensor, uploaded from pinned memory without a host
        sync. During CUDA-graph capture the upload becomes a graph node that reads its host buffer at
        every replay, so host buffer and device table are kept for as long as this object lives: one
        entry per distinct set of addresses (a graphed run has the capture's; eager steps usually repeat
        theirs, and past 16 sets the eager ones are dropped). torch copies only pinned host memory in a
        capture, and pinning there would query CUDA events: each eager call leaves a pinned buffer ready
        for the capture that may follow."""
        key = tuple(g.data_ptr() for g in grads)
        cuda = self.device.type == "cuda"
        capturing = cuda and torch.cuda.is_current_stream_capturing()
        entry = self._pointer_tables.get(key)
        if entry is None:
            if len(self._pointer_tables) >= 16 and not capturing:
                self._pointer_tables = {k: v for k, v in self._pointer_tables.items() if v[2]}  # keep captured
            spare = self._spare_host if self._spare_host is not None and self._spare_host.numel() == len(key) else None
            host = spare if capturing and spare is not None else torch.empty(len(key), dtype=torch.int64,
                                                                              pin_memory=cuda)
            if host is spare:
                self._spare_host = None
            host.copy_(torch.tensor(key, dtype=torch.int64))
            entry = (host, host.to(self.device, non_blocking=True), capturing)
            self._pointer_tables[key] = entry
        if cuda and not capturing and self._spare_host is None:
            self._spare_host = torch.empty(len(key), dtype=torch.int64, pin_memory=True)
        return entry[1]


# --------------------------------------------------------------------------- the update (torch ops)
def flat_update_torch(master, grad, exp_avg, exp_avg_sq, weight, step, lr, grad_scale, found_inf, *,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The kernel's update in torch ops, rounding for rounding (fp32 tensors, every scalar rounded to fp32
    like a Triton float argument, every division by a tensor: torch turns ``x / python_float`` into a
    multiplication by the reciprocal on CUDA). ``step`` (0-dim) is the count *before* this step; it is
    not advanced here. No host sync: the skip is a ``torch.where``."""
    skip = found_inf != 0
    s = step.double() + 1
    bc1 = (1 - torch.exp2(s * _log2(beta1))).float()
    bc2_sqrt = torch.sqrt(1 - torch.exp2(s * _log2(beta2))).float()
    step_size = lr / bc1
    g = grad / grad_scale
    p = master
    if weight_decay != 0:
        p = p - (lr * weight_decay) * p
    m = exp_avg * beta1 + g * (1.0 - beta1)
    v = exp_avg_sq * beta2 + (g * (1.0 - beta2)) * g
    # fp32 sqrt via fp64: correctly rounded like CUDA's sqrtf and tl.sqrt_rn (torch's vectorised CPU sqrt
    # is not: ~15% of results are an ulp off); rounding the fp64 root to fp32 loses nothing.
    denom = torch.sqrt(v.double()).float() / bc2_sqrt + eps
    p = p - (m * step_size) / denom
    for dst, new in ((master, p), (exp_avg, m), (exp_avg_sq, v)):
        dst.copy_(torch.where(skip, dst, new))
    if weight is not None:
        weight.copy_(torch.where(skip, weight, p.to(weight.dtype)))


# --------------------------------------------------------------------------- the optimizer
class FlatAdamW(torch.optim.AdamW):
    """torch's fused AdamW over the fp32 masters of a :class:`FlatBuffers`, stepping each param group in
    one pass that also writes the 16-bit model weights.

    ``groups`` must hold ``flat.masters`` in order, group ``k`` being the ``k``-th group of the layout.
    It is constructed ``fused=True`` so that ``optim.step_if_finite`` hands it ``grad_scale`` /
    ``found_inf`` (device tensors) instead of scaling grads and deciding on the host. Its state is
    created up front, in torch's own keys and dtypes, as views of the flat buffers: checkpoints save it
    and load into it in place. ``impl``: "triton" (default on CUDA when Triton is there) or "torch"."""

    def __init__(self, groups: list[dict], flat: FlatBuffers, *, lr, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, capturable: bool = False, impl: str | None = None):
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True,
                         capturable=capturable)
        self.flat = flat
        if impl is None:
            impl = "triton" if flat.device.type == "cuda" and available() else "torch"
        if impl == "triton" and not available():
            raise RuntimeError("FlatAdamW(impl='triton') needs Triton and a CUDA device")
        self.impl = impl
        i = 0
        for g, size in zip(self.param_groups, flat.group_sizes):
            if len(g["params"]) != size or any(p is not m for p, m in zip(g["params"], flat.masters[i:i + size])):
                raise ValueError("FlatAdamW: the param groups must be the flat masters, in layout order")
            if g["amsgrad"] or g["maximize"]:
                raise ValueError("FlatAdamW implements AdamW without amsgrad / maximize")
            i += size
        if len(self.param_groups) != len(flat.group_sizes):
            raise ValueError("FlatAdamW: one param group per layout group")
        self._first = [sum(flat.group_sizes[:k]) for k in range(len(flat.group_sizes))]
        self._state_views = [{"step": flat.steps[k], "exp_avg": m, "exp_avg_sq": v}
                             for k, (m, v) in enumerate(zip(flat.views(flat.exp_avg), flat.views(flat.exp_avg_sq)))]
        for m, views in zip(flat.masters, self._state_views):
            self.state[m] = dict(views)
        dev = flat.device
        self._one, self._zero = torch.ones((), device=dev), torch.zeros((), device=dev)
        self._lr = torch.zeros(len(self.param_groups), device=dev)  # float LRs, filled per step
        self.exact = True  # every step counter equal: one launch per group is exact
        self.fallback_reason: str | None = None

    @classmethod
    def like(cls, optimizer: torch.optim.Optimizer, flat: FlatBuffers, impl: str | None = None) -> "FlatAdamW":
        """The same param groups and hyper-parameters as a (fresh) torch AdamW over ``flat.masters``."""
        if not isinstance(optimizer, torch.optim.AdamW):
            raise TypeError(f"flat AdamW replaces a torch.optim.AdamW, not {type(optimizer).__name__}")
        keys = ("params", "lr", "betas", "eps", "weight_decay")
        groups = [{k: g[k] for k in keys} for g in optimizer.param_groups]
        d = optimizer.defaults
        return cls(groups, flat, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"],
                   capturable=bool(d.get("capturable")), impl=impl)

    def _device_scalar(self, t, default: torch.Tensor, name: str) -> torch.Tensor:
        if t is None:
            return default
        if t.device != self.flat.device or t.dtype != torch.float32 or t.numel() != 1:
            raise ValueError(f"FlatAdamW.{name} must be a one-element float32 tensor on {self.flat.device}")
        return t

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("FlatAdamW.step takes no closure")
        if self.exact and self.flat.grads16 is None:
            missing = next((k for k, m in enumerate(self.flat.masters) if m.grad is None), None)
            if missing is not None:
                self.exact = False
                self.fallback_reason = f"master {missing} (shape {tuple(self.flat.shapes[missing])}) had no grad"
                warnings.warn(f"FlatAdamW: {self.fallback_reason}; stepping with torch's fused AdamW from now on",
                              stacklevel=2)
        flat = self.flat
        table, grad = None, flat.grad
        if flat.grads16 is not None:  # the 16-bit grads where autograd left them (MasterWeightsOptimizer)
            if not self.reads_grads16:
                raise RuntimeError("FlatAdamW: 16-bit grads handed over, but this optimizer cannot read them")
            if self.impl == "triton":
                table = flat.pointer_table(flat.grads16)
            else:  # the torch update takes a flat fp32 copy (the CPU path, where tests check the bookkeeping)
                grad = torch.zeros(flat.numel, dtype=torch.float32, device=flat.device)
                torch._foreach_copy_(flat.views(grad), flat.grads16)
        elif not self.exact or flat.grad is None:  # no flat grads this step (set from outside): per tensor
            return self._generic_step()
        scale = self._device_scalar(getattr(self, "grad_scale", None), self._one, "grad_scale")
        found = self._device_scalar(getattr(self, "found_inf", None), self._zero, "found_inf")
        update = flat_update_triton if self.impl == "triton" else flat_update_torch
        for k, g in enumerate(self.param_groups):
            a, b = flat.group_ranges[k]
            if a == b:
                continue
            lr = g["lr"]
            if not (isinstance(lr, torch.Tensor) and lr.device == flat.device and lr.dtype == torch.float32):
                lr = self._lr[k].copy_(lr) if isinstance(lr, torch.Tensor) else self._lr[k].fill_(lr)
            b1, b2 = g["betas"]
            hyper = dict(beta1=float(b1), beta2=float(b2), eps=float(g["eps"]), weight_decay=float(g["weight_decay"]))
            step = flat.steps[self._first[k]]
            if table is not None:
                table_update_triton(flat, k, table, step, lr.reshape(()), scale.reshape(()), found.reshape(()), **hyper)
                continue
            update(flat.master[a:b], grad[a:b], flat.exp_avg[a:b], flat.exp_avg_sq[a:b], flat.weight[a:b],
                   step, lr.reshape(()), scale.reshape(()), found.reshape(()), **hyper)
        flat.steps.add_(found == 0)  # after the launches: they read the count before this step

    @property
    def reads_grads16(self) -> bool:
        """Whether :meth:`step` can read this step's 16-bit grads where autograd left them
        (``flat.grads16``): while every step counter is equal (the Triton path through a pointer table,
        the torch path from a flat fp32 copy it makes itself)."""
        return self.exact

    def _generic_step(self):
        """torch's fused AdamW (per-param step counters, params without grad untouched), then the
        16-bit weights of the updated masters."""
        super().step()
        pairs = [(w, m) for m, w in zip(self.flat.masters, self.flat.weights) if m.grad is not None]
        if pairs:
            torch._foreach_copy_(*map(list, zip(*pairs)))

    def after_load(self) -> None:
        """After a checkpoint load: keep the state in the flat buffers (copying back anything a loader
        replaced rather than filled in place), then re-decide the fast path (one host sync)."""
        flat = self.flat
        for k, (m, views) in enumerate(zip(flat.masters, self._state_views)):
            if m.data_ptr() != flat.master.data_ptr() + flat.offsets[k] * 4:
                raise RuntimeError(f"FlatAdamW: master {k} was re-allocated outside the flat buffer")
            st = self.state[m]
            for key, view in views.items():
                t = st.get(key)
                if t is None or t.data_ptr() != view.data_ptr():
                    if t is not None:
                        view.copy_(t)
                    st[key] = view
        self.exact = bool((flat.steps == flat.steps[0]).all())
        self.fallback_reason = None if self.exact else "the step counters differ (some param skipped a step)"

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's loader replaces the state tensors: copy them back into the flat buffers."""
        super().load_state_dict(state_dict)
        self.after_load()
