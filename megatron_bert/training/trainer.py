"""The training loop, shared by pretraining and fine-tuning (the task supplies data, model and loss).

One step:  zero grads → task.forward_backward over the micro-batches → SP/DP grad all-reduce (DP:
reduce-scatter into this rank's slices with optim.distributed_optimizer, dist_optim.py) →
(fp16: unscale) → TP-aware clip → finite? AdamW step : skip → LR schedule, logging, eval, checkpoint.
The step's decisions (clip coefficient, skip) stay on the device, so with ``train.cuda_graph`` the
whole step is captured once and replayed (cuda_graph.py); the host reads the step's statistics once.

Faults (RELIABILITY.md): ``self.phase`` labels what the loop is doing, for the one-line report of a
collective timeout and for the heartbeat (faults.py); the finite check is the same on every rank (the
grad norm is all-reduced over TP after the DP all-reduce, the loss is DP-reduced), so every rank skips
or stops together; saves never write non-finite weights, wait for a finite step, and follow
``checkpoint.on_error`` when the disk fails (the save and the resume: checkpointing.py, a mixin).
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel import ParallelState, allreduce_data_parallel_grads, allreduce_sequence_parallel_grads, grad_norm
from parallel.grads import clip_coefficient
from parallel.random import seed_everything

from ..checkpoint import CheckpointError, best_checkpoint, latest_checkpoint
from ..config import ModelRuntime
from . import faults
from .checkpointing import CheckpointingMixin
from .compile_setup import compile_model
from .config import model_config, parse_time, to_yaml
from .faults import TrainingStopped  # noqa: F401 (train.py names it from this module)
from .metrics import MetricsWriter, Throughput, flops_per_sequence, peak_flops
from .optim import LossScaler, LRSchedule, MasterWeightsOptimizer, build_optimizer, step_if_finite, use_flat_adamw
from .profiling import StepProfiler


def _to_host(values: dict) -> dict:
    """Device scalars → Python floats with one synchronisation; other values pass through."""
    keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    host = dict(values)
    if keys:
        floats = torch.stack([values[k].detach().double().reshape(()) for k in keys]).tolist()
        host.update(zip(keys, floats))
    return host


class Trainer(CheckpointingMixin):
    def __init__(self, cfg, ps: ParallelState, task, overrides: list[str] | None = None):
        self.cfg, self.ps, self.task = cfg, ps, task
        self.overrides = overrides or []
        self.writer = MetricsWriter(cfg.run_dir, ps.is_main)
        self.log = self.writer.console
        self.step = 0
        self.consumed_samples = 0
        self.stop_reason: str | None = None
        self._signal = None
        self.phase, self.phase_step = "setup", 0
        self.last_step_time = time.monotonic()
        self.faults = faults.ACTIVE
        self._nan = False
        self._async_saver, self._async_step = None, 0
        self.step_graphs = None  # cuda_graph.StepGraphs when train.cuda_graph is on (set up in setup())
        self.best = None  # {"metric", "mode", "value", "step"} of the best evaluation (checkpoint.best_metric)
        self.stale_evals = 0  # evaluations since the best one (train.early_stop_patience)
        # From the start, so that a SIGTERM (torchrun stopping the group, a pre-emption) during setup
        # neither kills a rank before it has printed its error line nor is lost: it stops after step 1.
        self._install_signal_handlers()

    def _enter(self, phase: str, step: int) -> None:
        """Label what the loop does now (for error lines and the heartbeat); fires test-only fault hooks."""
        self.phase, self.phase_step = phase, step
        if self.faults is not None:
            self.faults.at_phase(phase, step)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg, ps = self.cfg, self.ps
        self.tracker = seed_everything(cfg.train.seed, ps.tp_rank, ps.device)
        vocab = self.task.setup()
        self.model_cfg = model_config(cfg, vocab)
        on_gpu = ps.device.type == "cuda"
        impl = cfg.parallel.dropout_impl
        if impl == "auto":
            impl = "native" if on_gpu else "keyed"
        rt = ModelRuntime(sequence_parallel=cfg.parallel.sequence_parallel and ps.tp_size > 1,
                          recompute=cfg.parallel.recompute, dropout_impl=impl, seed=cfg.train.seed,
                          validate_inputs=not on_gpu, fuse_elementwise=bool(cfg.train.compile) and on_gpu)
        self.model = self.task.build_model(self.model_cfg, rt, self.tracker)
        o = cfg.optim

        graphed = self._use_cuda_graph()

        def make_optimizer(model, substitute=None):
            return build_optimizer(model, cfg.train.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, ps.device, substitute,
                                   capturable=graphed, name=o.name, ps=ps)

        self.mixed = cfg.train.precision in ("bf16", "fp16")
        if self.mixed:
            # Low-precision parameters and activations; fp32 master weights live in the optimizer.
            self.model.to(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16)
        self.sharded_optimizer = bool(o.distributed_optimizer) and ps.dp_size > 1
        if o.distributed_optimizer and ps.dp_size == 1:
            self.log("optim.distributed_optimizer: DP=1, nothing to shard; the optimizer keeps whole tensors")
        if self.sharded_optimizer:
            from .dist_optim import DistributedOptimizer

            self.optimizer = DistributedOptimizer(self.model, make_optimizer, ps, self.mixed,
                                                  reduce_16bit=o.grad_reduce_dtype == "param")
            self.opt_params = self.optimizer.masters
            mine, whole = self.optimizer.state_bytes()
            reduced = self.optimizer.model_params[0].dtype if self.optimizer.reduce_16bit else torch.float32
            self.log(f"distributed optimizer: fp32 masters + AdamW moments {mine / 2**20:.1f} MiB per rank "
                     f"({whole / 2**20:.1f} MiB unsharded, DP={ps.dp_size}); grads reduced in "
                     f"{str(reduced).removeprefix('torch.')}")
        elif self.mixed:
            flat = o.name == "adamw" and use_flat_adamw(ps.device, graphed)  # (the flat pass is AdamW's)
            self.optimizer = MasterWeightsOptimizer(self.model, make_optimizer, flat=flat)
            self.opt_params = self.optimizer.masters
            if self._grads_stay_local() and os.environ.get("MEGATRON_BERT_DEFER_GRAD_COPY", "1") != "0":
                # nothing touches the master grads between backward and step: a one-micro-batch step
                # lets the flat AdamW read the bf16 grads in place (MEGATRON_BERT_DEFER_GRAD_COPY=0: A/B)
                self.optimizer.enable_deferred_copy()
        else:
            self.optimizer = make_optimizer(self.model)
            self.opt_params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.train.compile and ps.device.type == "cuda":
            compile_model(self.model, cfg.train.compile_mode, ps, rt.sequence_parallel, self.log)
        total = cfg.train.max_steps
        warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_fraction * total)
        self.schedule = LRSchedule(cfg.train.lr, total, warmup, o.lr_schedule, o.min_lr,
                                   decay_steps=int(round(o.decay_fraction * total)), decay_style=o.decay_style)
        self.scaler = LossScaler(cfg.train.precision == "fp16")
        self.autocast = self._autocast_factory()
        self._resume_or_init()
        if graphed:
            from .cuda_graph import StepGraphs

            self.step_graphs = StepGraphs(self._step_on_device, ps.device, log=self.log)
        if ps.is_main:
            hydra_dir = Path(cfg.run_dir) / ".hydra"
            hydra_dir.mkdir(parents=True, exist_ok=True)
            (hydra_dir / "config.yaml").write_text(to_yaml(cfg))
            (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(list(self.overrides)))
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {cfg.model.name} ({n_params * ps.tp_size / 1e6:.1f}M params, "
                 f"{n_params / 1e6:.1f}M per rank) | {ps}")

    def _grads_stay_local(self) -> bool:
        """No DP all-reduce and no fp16 unscaling between backward and step (the sequence-parallel grad
        sum, of a few LayerNorm and bias grads, works on the bf16 grads where they are)."""
        return self.ps.dp_size == 1 and self.cfg.train.precision == "bf16"

    def _use_cuda_graph(self) -> bool:
        if not self.cfg.train.cuda_graph:
            return False
        if self.ps.device.type != "cuda":
            self.log("train.cuda_graph: no CUDA device, the step runs eagerly")
            return False
        if self.faults is not None:
            self.log("train.cuda_graph: test fault hooks are installed, the step runs eagerly")
            return False
        if self.ps.world_size > 1 and os.environ.get("MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED") != "1":
            # Capturing NCCL collectives is supported by torch but has not been measured here yet
            # (bench/NOTES.md): MEGATRON_BERT_CUDA_GRAPH_DISTRIBUTED=1 captures anyway (A/B runs).
            self.log("train.cuda_graph: only single-GPU runs are captured so far; the step runs eagerly")
            return False
        return True

    def _autocast_factory(self):
        # bf16/fp16 runs keep the parameters themselves in low precision (see setup), so no autocast
        # region is needed; tasks still wrap their forward in this hook.
        return contextlib.nullcontext

    # ------------------------------------------------------------------ stop conditions
    def _install_signal_handlers(self) -> None:
        def handler(signum, _frame):
            self._signal = signal.Signals(signum).name

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass

    def _should_stop(self, start: float, max_time: float | None) -> str | None:
        """Every rank must agree, so the local flags are all-reduced (MAX) over the world."""
        flags = [1.0 if self._signal else 0.0, 1.0 if (max_time and time.time() - start >= max_time) else 0.0]
        t = torch.tensor(flags, device=self.ps.device)
        if self.ps.distributed:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if t[0] > 0:
            return f"signal {self._signal or 'on another rank'}"
        if t[1] > 0:
            return "train.max_time reached"
        return None

    # ------------------------------------------------------------------ the loop
    def _backward(self, loss: torch.Tensor) -> None:
        if self._nan:  # test-only fault hook (faults.py)
            loss = loss * float("nan")
        (loss * self.scaler.scale).backward() if self.scaler.enabled else loss.backward()
        if self.mixed:
            self.optimizer.accumulate_grads()  # into the fp32 master grads

    def train_step(self, micro_batches) -> dict:
        """One optimizer step; returns its statistics as host numbers (the step's only host sync)."""
        n = self.step + 1
        lr = self.schedule.apply(self.optimizer, self.step)
        self._nan = self.faults is not None and self.faults.nan_loss(n)
        if self.step_graphs is not None:
            self._enter("forward/backward (CUDA graph)", n)
            out = self.step_graphs(micro_batches)
        else:
            out = self._step_on_device(micro_batches)
        stats = _to_host(out)
        stats["finite"] = bool(stats["finite"])
        if self._nan:
            stats["loss"] = float("nan")
        self.scaler.update(not stats["finite"])
        stats.update(lr=lr)
        return stats

    def _step_on_device(self, micro_batches) -> dict:
        """zero grads → forward/backward → SP/DP grad all-reduce → (fp16: unscale) → norm → clipped
        AdamW step, skipped unless the loss and the norm are finite. Every decision is a device
        tensor and nothing waits for the host, so the whole step can be captured as a CUDA graph."""
        params, n = self.opt_params, self.step + 1
        self.optimizer.zero_grad(set_to_none=True)
        self._enter("forward/backward", n)
        out = self.task.forward_backward(self.model, micro_batches, self._backward, self.autocast)
        self._enter(faults.GRAD_ALLREDUCE, n)
        # bf16 grads read in place (one micro-batch; only deferred where _grads_stay_local, see setup)
        deferred = self.optimizer.deferred if self.mixed else None
        if self.sharded_optimizer:  # SP sum, then a reduce-scatter over DP into this rank's slices
            self.optimizer.reduce_grads()
        else:
            allreduce_sequence_parallel_grads(params, self.ps, grads=deferred)
            allreduce_data_parallel_grads(params, self.ps, average=False)  # losses are globally normalised
        if self.scaler.enabled:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], 1.0 / self.scaler.scale)
        self._enter("gradient-norm all-reduce", n)
        norm = grad_norm(params, self.ps, grads=deferred,
                         dp_sharded=self.optimizer.dp_sharded if self.sharded_optimizer else None)
        # The norm is all-reduced and the loss DP-reduced (and TP-identical): every rank decides alike.
        finite = torch.isfinite(norm) & torch.isfinite(torch.as_tensor(out["loss"], device=norm.device))
        self._enter("optimizer step", n)
        step_if_finite(self.optimizer, params, clip_coefficient(norm, self.cfg.optim.clip_grad), finite)
        return {**out, "grad_norm": norm, "finite": finite}

    def run(self) -> int:
        t = self.cfg.train
        heartbeat = None
        if t.heartbeat_interval > 0:
            heartbeat = faults.Heartbeat(self, t.heartbeat_interval, self.cfg.run_dir, self.ps.rank, self.log)
            heartbeat.start()
        self.profiler = StepProfiler(t.profile_steps, t.profile_ranks, self.ps.rank, self.cfg.run_dir,
                                     self.ps.device, lambda line: print(line, flush=True))
        try:
            result = self._run()
        except BaseException:
            self.profiler.close(sync=False)  # a failed step may have left the device stuck in a collective
            raise
        else:
            self.profiler.close()
            return result
        finally:
            if heartbeat is not None:
                heartbeat.stop()

    def _run(self) -> int:
        cfg, ps = self.cfg, self.ps
        t = cfg.train
        max_time = parse_time(t.max_time)
        start = time.time()
        batches = self.task.train_batches(self.consumed_samples)
        thr = Throughput()
        seq_len = cfg.data.seq_length
        flops_seq = flops_per_sequence(self.model_cfg.num_layers, self.model_cfg.hidden_size, seq_len,
                                       self.model_cfg.padded_vocab_size)
        peak = peak_flops(ps.device)
        bad_steps, skipped, step_times = 0, 0, []
        loss_acc, loss_n = {}, 0
        if self.step >= t.max_steps:
            self.log(f"nothing to do: already at step {self.step} >= train.max_steps={t.max_steps}")
        last_saved, save_due = self.step, False
        while self.step < t.max_steps:
            t_wait = time.perf_counter()
            self._enter("data loading", self.step + 1)
            micro_batches = next(batches)
            thr.data_wait += time.perf_counter() - t_wait
            t_step = time.perf_counter()
            with self.profiler.step(self.step + 1):
                stats = self.train_step(micro_batches)
            self.step += 1
            self.consumed_samples += t.global_batch_size
            thr.add(t.global_batch_size)
            step_times.append(time.perf_counter() - t_step)
            self.last_step_time = time.monotonic()
            if not stats["finite"]:
                skipped += 1
                bad_steps += 1
            else:
                bad_steps = 0
                for k in ("loss", "lm_loss", "binary_loss"):
                    if stats.get(k) is not None:
                        loss_acc[k] = loss_acc.get(k, 0.0) + stats[k]
                loss_n += 1

            if self.step % t.log_interval == 0 or self.step == t.max_steps:
                secs, samples, wait = thr.report()
                sps = samples / max(secs, 1e-9)
                rec = {"step": self.step, "consumed_samples": self.consumed_samples,
                       **{k: v / max(loss_n, 1) for k, v in loss_acc.items()},
                       "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                       "loss_scale": self.scaler.scale if self.scaler.enabled else None,
                       "samples_per_s": sps, "tokens_per_s": sps * seq_len,
                       "data_wait_fraction": wait / max(secs, 1e-9), "skipped": skipped,
                       "elapsed_s": time.time() - start}
                if loss_n == 0:
                    rec["loss"] = float("nan")
                if ps.device.type == "cuda":
                    rec["tflops_per_gpu"] = flops_seq * sps / ps.world_size / 1e12
                    rec["mfu"] = rec["tflops_per_gpu"] * 1e12 / peak if peak else None
                    rec["mem_gib"] = torch.cuda.max_memory_allocated(ps.device) / 2**30
                self.writer.write(rec)
                avg = sum(step_times[-20:]) / len(step_times[-20:])
                self.writer.train_line(rec, t.max_steps, avg * (t.max_steps - self.step))
                loss_acc, loss_n, skipped = {}, 0, 0

            if not self.scaler.enabled and bad_steps >= t.max_bad_steps:  # the same on every rank
                with contextlib.suppress(CheckpointError):
                    self._wait_async_save()  # a pending background save is of a good step: let it land
                raise TrainingStopped(
                    f"{bad_steps} consecutive steps had a non-finite loss or gradient (last at step {self.step}): "
                    f"stopping; {self._kept()} — lower train.lr or use train.precision=fp32")
            best = None  # this evaluation, if it is the best so far by checkpoint.best_metric
            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                self._enter("evaluation", self.step)
                res = self.run_eval()
                best = self.best_candidate(res) if res is not None else None
                if res is not None and cfg.checkpoint.best_metric:
                    self.stale_evals = 0 if best else self.stale_evals + 1
            # A save falling on a non-finite bf16/fp32 step waits for the next finite one (fp16 skips are routine;
            # a best evaluation there is not kept: its weights cannot be saved).
            save_due = save_due or bool(cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0)
            if (save_due or best) and (stats["finite"] or self.scaler.enabled):
                self.save_best(best) if best else self.save()
                last_saved, save_due = self.step, False
            self._enter("stop-flag all-reduce", self.step)
            reason = self._should_stop(start, max_time)
            if not reason and t.early_stop_patience and self.stale_evals >= t.early_stop_patience:
                reason = f"early stop: {self._no_improvement()} (train.early_stop_patience)"
            if reason:
                self.stop_reason = reason
                self.log(f"stopping at step {self.step}: {reason}")
                break
        if self.step != last_saved:
            self.save()
        if self._async_saver is not None:  # wait for the pending async save (raises its error)
            try:
                self._wait_async_save()
            except CheckpointError as e:
                raise self._save_failed(e) from None
            self._async_saver.close()
            self._async_saver = None
        final = latest_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        best = best_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.best_metric and cfg.checkpoint.dir else None
        self.log(f"done: step {self.step}, {self.consumed_samples} samples | metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}"
                 + (f" | checkpoint: {final}" if final else "")
                 + (f" | best {self.best['metric']} {self.best['value']:.4f}: {best}" if best and self.best else ""))
        self.writer.close()
        return 0

    def _no_improvement(self) -> str:
        if self.best is None:  # every evaluation so far gave NaN
            return f"{self.stale_evals} evaluations gave no finite {self.cfg.checkpoint.best_metric}"
        return (f"{self.best['metric']} has not improved on {self.best['value']:.4f} (step {self.best['step']}) "
                f"in {self.stale_evals} evaluations")

    def run_eval(self) -> dict | None:
        if self.cfg.train.eval_iters <= 0:
            return None
        res = self.task.evaluate(self.model, self.cfg.train.eval_iters, self.autocast)
        rec = {"step": self.step, "split": "valid", **res}
        self.writer.write(rec)
        self.log(f"valid step {self.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
        return res
