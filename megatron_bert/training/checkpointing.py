"""Checkpoints of a training run: resume or initialise at setup, and the save (collective), which never
writes non-finite weights and follows ``checkpoint.on_error`` when the disk fails (RELIABILITY.md).

A mixin of ``Trainer`` (trainer.py): its methods use the trainer's ``cfg``, ``ps``, ``task``, ``model``,
``model_cfg``, ``optimizer``, ``opt_params``, ``tracker``, ``scaler``, ``step``, ``consumed_samples`` and
``log``, and the pending background save (``_async_saver``, ``_async_step``, set in ``Trainer.__init__``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from ..checkpoint import (CheckpointError, latest_checkpoint, load_checkpoint, read_meta, resolve_checkpoint,
                          save_checkpoint)
from ..checkpoint.manager import agree
from . import faults
from .config import ConfigError
from .faults import TrainingStopped

ARCH_KEYS = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "vocab_size",
             "max_position_embeddings", "type_vocab_size")


# Keys that decide which sample the global index i is (data/dataset.py, data/blend.py).
SAMPLE_STREAM_KEYS = ("data.prefix", "data.valid_prefix", "data.seq_length", "data.binary_head", "data.masked_lm_prob",
                      "data.whole_word_masking", "data.max_ngrams", "data.ngram_distribution", "data.short_seq_prob",
                      "data.valid_fraction", "train.seed")


# Keys of the model config taken from the checkpoint the weights come from when fine-tuning or
# evaluating (vocab_size is checked against the tokenizer instead, dropout stays the run's choice).
ARCH_FROM_CHECKPOINT = ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size",
                        "max_position_embeddings", "type_vocab_size", "layernorm_epsilon", "activation")


def resume_path(cfg):
    """The checkpoint ``checkpoint.resume`` names (``auto``: the latest in ``checkpoint.dir``), or None."""
    c = cfg.checkpoint
    if c.resume == "auto":
        return latest_checkpoint(c.dir) if c.dir else None
    return None if c.resume == "none" else c.resume


def weights_source(cfg) -> tuple[Path | None, str | None, dict]:
    """(checkpoint dir, "resume" | "pretrained", meta) of the weights the trainer will load —
    the rule of ``CheckpointingMixin._resume_or_init`` — or (None, None, {})."""
    path, kind = resume_path(cfg), "resume"
    if path is None and cfg.task.pretrained:
        path, kind = cfg.task.pretrained, "pretrained"
    if path is None:
        return None, None, {}
    ckpt = resolve_checkpoint(path)
    return ckpt, kind, read_meta(ckpt)


def adopt_architecture(model_cfg, meta: dict, source, log) -> None:
    """Set the ARCH_FROM_CHECKPOINT fields of ``model_cfg`` to the checkpoint's, saying which changed."""
    saved = meta.get("model") or {}
    changed = []
    for k in ARCH_FROM_CHECKPOINT:
        if saved.get(k) is None:
            continue
        mine = model_cfg[k] if not (k == "ffn_hidden_size" and model_cfg[k] is None) else 4 * model_cfg.hidden_size
        if mine != saved[k]:
            model_cfg[k] = saved[k]
            changed.append(f"{k}={saved[k]}")
    if changed:
        log(f"model: architecture from checkpoint {source}: {', '.join(changed)}")


def sample_stream_changes(saved: dict, now: dict) -> list[str]:
    """``key: old → new`` for the sample-stream keys a resumed run changed (saved config vs this one);
    keys the checkpoint does not record are not compared."""
    out = []
    for key in SAMPLE_STREAM_KEYS:
        group, name = key.split(".")
        if name in saved.get(group, {}):
            old, new = saved[group][name], now.get(group, {}).get(name)
            if old != new:
                out.append(f"{key}: {old!r} → {new!r}")
    return out


class CheckpointingMixin:
    def _resume_or_init(self) -> None:
        path = resume_path(self.cfg)
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
            best = meta.get("best")
            if best and (best.get("metric"), best.get("mode")) == (self.cfg.checkpoint.best_metric, self._best_mode()):
                self.best = best  # the run goes on comparing with the best evaluation before the restart
                self.stale_evals = int(meta.get("stale_evals", 0))
            changed = sample_stream_changes(meta.get("config", {}), OmegaConf.to_container(self.cfg))
            if changed:
                self.log(f"note: the data settings differ from the checkpoint's ({'; '.join(changed)}): samples from "
                         f"{self.consumed_samples} on come from the new sample stream, not the one the run was reading")
        elif self.cfg.task.pretrained:
            self._check_architecture(self.cfg.task.pretrained)
            # weights only (the optimizer is passed so mixed-precision fp32 masters get them too)
            ckpt, _, _ = load_checkpoint(self.cfg.task.pretrained, self.model, self.optimizer, self.ps, strict=False,
                                         load_optimizer=False)
            self.log(f"initialised from pretrained weights {ckpt} (new parameters keep their fresh init)")

    def _check_architecture(self, path) -> None:
        saved = read_meta(resolve_checkpoint(path)).get("model", {})
        mine = self.model_cfg.to_dict()
        diff = [f"{k}: checkpoint {saved.get(k)} vs config {mine[k]}" for k in ARCH_KEYS if saved.get(k) != mine[k]]
        if diff:
            raise CheckpointError(f"checkpoint {path} is for a different model ({'; '.join(diff)}): "
                                  "pick the matching model=... or another checkpoint.dir")

    def _kept(self) -> str:
        kept = latest_checkpoint(self.cfg.checkpoint.dir) if self.cfg.checkpoint.dir else None
        return f"the last good checkpoint {kept} is kept" if kept else "no earlier checkpoint exists"

    # ------------------------------------------------------------------ the best evaluation
    def _best_mode(self) -> str:
        c = self.cfg.checkpoint
        if c.best_mode != "auto":
            return c.best_mode
        return "min" if "loss" in (c.best_metric or "") else "max"

    def best_candidate(self, res: dict) -> dict | None:
        """After an evaluation: its record if it is the best so far by ``checkpoint.best_metric``, else None.
        Every rank has the metrics; rank 0's decision is taken (a save is collective: a last-bit
        difference between ranks must not split them). :meth:`save_best` then keeps it."""
        metric = self.cfg.checkpoint.best_metric
        if not metric or not self.cfg.checkpoint.dir:
            return None
        value = res.get(metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            names = ", ".join(k for k, v in res.items() if isinstance(v, float))
            raise ConfigError(f"checkpoint.best_metric={metric} is not a metric of this evaluation (it reports: "
                              f"{names}): pick one of them")
        mode = self._best_mode()
        best = self.best["value"] if self.best else None
        better = value == value and (best is None or (value > best if mode == "max" else value < best))  # NaN: never
        if self.ps.distributed:
            flag = torch.tensor([1.0 if better else 0.0], device=self.ps.device)
            dist.broadcast(flag, src=0)
            better = bool(flag.item())
        return {"metric": metric, "mode": mode, "value": float(value), "step": self.step} if better else None

    def save_best(self, candidate: dict) -> Path | None:
        """Save this step as the best one: synchronously (so that ``best`` never names a checkpoint still
        being written), the record in its meta (a resumed run compares with it), then ``<dir>/best``."""
        previous, self.best = self.best, candidate
        try:
            path = self.save(best=True)
        except BaseException:
            self.best = previous
            raise
        if path is not None:
            self.log(f"best {self.best['metric']} so far ({self.best['value']:.4f}): {path}")
        return path

    def save(self, best: bool = False) -> Path | None:
        """Save (collective). Never writes non-finite weights; disk errors follow checkpoint.on_error:
        ``exit`` stops at the first failure, ``retry`` tries ``checkpoint.retries`` more times.
        ``best``: the best evaluation's checkpoint, written before it returns (even with
        checkpoint.async_save) and named by ``<dir>/best``."""
        c = self.cfg.checkpoint
        if not c.dir:
            return None
        self._enter("checkpoint save", self.step)
        if not faults.all_finite(self.opt_params, self.ps):
            raise TrainingStopped(f"the weights are non-finite at step {self.step}: not saving them; {self._kept()}")
        attempts = 1 + (c.retries if c.on_error == "retry" else 0)
        for attempt in range(1, attempts + 1):
            try:
                return self._save_once(best)
            except CheckpointError as e:
                if attempt == attempts:
                    raise self._save_failed(e) from None
                self.log(f"warning: {e}; retrying in {c.retry_wait:g} s (attempt {attempt + 1} of {attempts})")
                time.sleep(c.retry_wait)

    def _save_failed(self, e: CheckpointError) -> CheckpointError:
        c = self.cfg.checkpoint
        hint = "" if c.on_error == "retry" else " (or set checkpoint.on_error=retry)"
        return CheckpointError(f"{e} — {self._kept()}; free disk space or fix the permissions of {c.dir}{hint}")

    def _wait_async_save(self) -> None:
        """Wait for the pending background save; its failure (possibly on one rank only) is agreed on."""
        if self._async_saver is None:
            return
        step, error = self._async_step, None
        try:
            self._async_saver.wait()
        except CheckpointError as e:
            error = e
        agree(self.ps, error, step, Path(self.cfg.checkpoint.dir) / f".step_{step}.tmp")

    def _save_once(self, best: bool = False) -> Path:
        c = self.cfg.checkpoint
        rng = {"cpu": torch.get_rng_state(), "tracker": self.tracker.get_states()}
        if self.ps.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.ps.device)
        meta = {"config": OmegaConf.to_container(self.cfg), "model": self.model_cfg.to_dict(),
                "head": self.task.head, "head_kwargs": getattr(self.task, "head_kwargs", {}),
                "consumed_samples": self.consumed_samples, "scaler": self.scaler.state_dict(), "best": self.best,
                "stale_evals": self.stale_evals,
                **self.task.checkpoint_meta()}
        t0 = time.perf_counter()
        if c.async_save and not best:
            from ..checkpoint import AsyncCheckpointSaver

            if self._async_saver is None:
                self._async_saver = AsyncCheckpointSaver(self.ps, self.log)
            self._wait_async_save()
            self._async_step = self.step
            path, held = self._async_saver.save(c.dir, self.step, self.model, self.optimizer, meta, rng, keep=c.keep)
            self.log(f"saving checkpoint {path} in the background (training held {held:.2f} s)")
            return path
        self._wait_async_save()  # (a sync save after async ones: the pending one lands first)
        path = save_checkpoint(c.dir, self.step, self.model, self.optimizer, self.ps, meta, rng, keep=c.keep, best=best)
        self.log(f"saved checkpoint {path} ({time.perf_counter() - t0:.1f} s)")
        return path
