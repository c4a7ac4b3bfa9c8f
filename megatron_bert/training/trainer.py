"""The training loop, shared by pretraining and fine-tuning (the task supplies data, model and loss).

One step:  zero grads → task.forward_backward over the micro-batches → SP/DP grad all-reduce →
(fp16: unscale) → TP-aware clip → finite? AdamW step : skip → LR schedule, logging, eval, checkpoint.
"""
from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from parallel import ParallelState, allreduce_data_parallel_grads, allreduce_sequence_parallel_grads, clip_grad_norm_
from parallel.random import seed_everything

from ..checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from ..config import ModelRuntime
from .config import model_config, parse_time, to_yaml
from .metrics import MetricsWriter, Throughput, flops_per_sequence, peak_flops
from .optim import LossScaler, LRSchedule, MasterWeightsOptimizer, build_optimizer

ARCH_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size",
             "max_position_embeddings", "type_vocab_size")


class TrainingStopped(RuntimeError):
    """Training cannot go on (e.g. repeated non-finite steps); the message says why."""


class Trainer:
    def __init__(self, cfg, ps: ParallelState, task, overrides: list[str] | None = None):
        self.cfg, self.ps, self.task = cfg, ps, task
        self.overrides = overrides or []
        self.writer = MetricsWriter(cfg.run_dir, ps.is_main)
        self.log = self.writer.console
        self.step = 0
        self.consumed_samples = 0
        self.stop_reason: str | None = None
        self._signal = None

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

        def make_optimizer(model, substitute=None):
            return build_optimizer(model, cfg.train.lr, o.weight_decay, (o.beta1, o.beta2), o.eps, ps.device, substitute)

        self.mixed = cfg.train.precision in ("bf16", "fp16")
        if self.mixed:
            # Low-precision parameters and activations; fp32 master weights live in the optimizer.
            self.model.to(torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16)
            self.optimizer = MasterWeightsOptimizer(self.model, make_optimizer)
            self.opt_params = self.optimizer.masters
        else:
            self.optimizer = make_optimizer(self.model)
            self.opt_params = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.train.compile and ps.device.type == "cuda":
            if ps.tp_size == 1:
                for layer in self.model.bert.encoder.layers:
                    layer.compile(mode=cfg.train.compile_mode)
            else:
                # Measured on H100 (BENCHMARKS.md): with TP collectives inside, the compiled layer
                # breaks into many graphs and runs slower than eager, so only the epilogues compile.
                self.log("train.compile: TP>1 compiles the fused elementwise epilogues only")
        total = cfg.train.max_steps
        warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_fraction * total)
        self.schedule = LRSchedule(cfg.train.lr, total, warmup, o.lr_schedule, o.min_lr)
        self.scaler = LossScaler(cfg.train.precision == "fp16")
        self.autocast = self._autocast_factory()
        self._resume_or_init()
        if ps.is_main:
            hydra_dir = Path(cfg.run_dir) / ".hydra"
            hydra_dir.mkdir(parents=True, exist_ok=True)
            (hydra_dir / "config.yaml").write_text(to_yaml(cfg))
            (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(list(self.overrides)))
        n_params = sum(p.numel() for p in self.model.parameters())
        self.log(f"model: {cfg.model.name} ({n_params * ps.tp_size / 1e6:.1f}M params, "
                 f"{n_params / 1e6:.1f}M per rank) | {ps}")

    def _autocast_factory(self):
        # bf16/fp16 runs keep the parameters themselves in low precision (see setup), so no autocast
        # region is needed; tasks still wrap their forward in this hook.
        return contextlib.nullcontext

    def _resume_or_init(self) -> None:
        c = self.cfg.checkpoint
        path = None
        if c.resume == "auto":
            path = latest_checkpoint(c.dir) if c.dir else None
        elif c.resume != "none":
            path = c.resume
        if path is not None:
            self._check_architecture(path)
            ckpt, meta, rng = load_checkpoint(path, self.model, self.optimizer, self.ps)
            self.step, self.consumed_samples = int(meta["step"]), int(meta["consumed_samples"])
            if meta.get("scaler"):
                self.scaler.load_state_dict(meta["scaler"])
            if rng is not None:
                torch.set_rng_state(rng["cpu"])
                if "cuda" in rng and self.ps.device.type == "cuda":
                    torch.cuda.set_rng_state(rng["cuda"], self.ps.device)
                self.tracker.set_states(rng["tracker"])
            self.log(f"resumed from {ckpt} (step {self.step}, {self.consumed_samples} samples; "
                     f"saved at TP={meta['saved_tp']} DP={meta['saved_dp']}, now TP={self.ps.tp_size} DP={self.ps.dp_size})")
        elif self.cfg.task.pretrained:
            self._check_architecture(self.cfg.task.pretrained)
            # weights only (the optimizer is passed so mixed-precision fp32 masters get them too)
            ckpt, _, _ = load_checkpoint(self.cfg.task.pretrained, self.model, self.optimizer, self.ps, strict=False,
                                         load_optimizer=False)
            self.log(f"initialised from pretrained weights {ckpt} (new parameters keep their fresh init)")

    def _check_architecture(self, path) -> None:
        from ..checkpoint import read_meta, resolve_checkpoint

        saved = read_meta(resolve_checkpoint(path)).get("model", {})
        mine = self.model_cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)} vs config {mine[k]}" for k in ARCH_KEYS if saved.get(k) != mine[k]]
        if diff:
            raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diff)}): "
                                  "pick the matching model=... or another checkpoint.dir")

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path | None:
        c = self.cfg.checkpoint
        if not c.dir:
            return None
        rng = {"cpu": torch.get_rng_state(), "tracker": self.tracker.get_states()}
        if self.ps.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ps.device)
        meta = {"config": OmegaConf.to_container(self.cfg), "model": self.model_cfg.to_dict(),
                "head": self.task.head, "head_kwargs": getattr(self.task, "head_kwargs", {}),
                "consumed_samples": self.consumed_samples, "scaler": self.scaler.state_dict(),
                **self.task.checkpoint_meta()}
        t0 = time.perf_counter()
        if c.async_save:
            from ..checkpoint import AsyncCheckpointSaver

            if getattr(self, "_async_saver", None) is None:
                self._async_saver = AsyncCheckpointSaver(self.ps, self.log)
            path, held = self._async_saver.save(c.dir, self.step, self.model, self.optimizer, meta, rng, keep=c.keep)
            self.log(f"saving checkpoint {path} in the background (training held {held:.2f} s)")
            return path
        path = save_checkpoint(c.dir, self.step, self.model, self.optimizer, self.ps, meta, rng, keep=c.keep)
        self.log(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        return path

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
        (loss * self.scaler.scale).backward() if self.scaler.enabled else loss.backward()
        if self.mixed:
            self.optimizer.accumulate_grads()  # into the fp32 master grads

    def train_step(self, micro_batches) -> dict:
        params = self.opt_params
        lr = self.schedule.apply(self.optimizer, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        stats = self.task.forward_backward(self.model, micro_batches, self._backward, self.autocast)
        allreduce_sequence_parallel_grads(params, self.ps)
        allreduce_data_parallel_grads(params, self.ps, average=False)  # losses are globally normalised
        if self.scaler.enabled:
            inv = 1.0 / self.scaler.scale
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], inv)
        norm = float(clip_grad_norm_(params, self.cfg.optim.clip_grad, self.ps))
        finite = norm == norm and norm != float("inf") and stats["loss"] == stats["loss"] \
            and abs(stats["loss"]) != float("inf")
        if finite:
            self.optimizer.step()
        self.scaler.update(not finite)
        stats.update(lr=lr, grad_norm=norm, finite=finite)
        return stats

    def run(self) -> int:
        cfg, ps = self.cfg, self.ps
        t = cfg.train
        self._install_signal_handlers()
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
        last_saved = self.step
        while self.step < t.max_steps:
            t_wait = time.perf_counter()
            micro_batches = next(batches)
            thr.data_wait += time.perf_counter() - t_wait
            t_step = time.perf_counter()
            stats = self.train_step(micro_batches)
            self.step += 1
            self.consumed_samples += t.global_batch_size
            thr.add(t.global_batch_size)
            step_times.append(time.perf_counter() - t_step)
            if not stats["finite"]:
                skipped += 1
                bad_steps += 1
                if not self.scaler.enabled and bad_steps >= t.max_bad_steps:
                    raise TrainingStopped(
                        f"{bad_steps} consecutive steps had a non-finite loss or gradient (last at step {self.step}): "
                        f"stopping; the last good checkpoint is kept — lower train.lr or use train.precision=fp32")
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

            if self.step % t.eval_interval == 0 or self.step == t.max_steps:
                self.run_eval()
            if cfg.checkpoint.save_interval and self.step % cfg.checkpoint.save_interval == 0:
                self.save()
                last_saved = self.step
            reason = self._should_stop(start, max_time)
            if reason:
                self.stop_reason = reason
                self.log(f"stopping at step {self.step}: {reason}")
                break
        if self.step != last_saved:
            self.save()
        if getattr(self, "_async_saver", None) is not None:  # wait for the pending async save (raises its error)
            self._async_saver.close()
            self._async_saver = None
        final = latest_checkpoint(cfg.checkpoint.dir) if cfg.checkpoint.dir else None
        self.log(f"done: step {self.step}, {self.consumed_samples} samples | metrics: {Path(cfg.run_dir) / 'metrics.jsonl'}"
                 + (f" | checkpoint: {final}" if final else ""))
        self.writer.close()
        return 0

    def run_eval(self) -> dict | None:
        if self.cfg.train.eval_iters <= 0:
            return None
        res = self.task.evaluate(self.model, self.cfg.train.eval_iters, self.autocast)
        rec = {"step": self.step, "split": "valid", **res}
        self.writer.write(rec)
        self.log(f"valid step {self.step} | " + " | ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
        return res
