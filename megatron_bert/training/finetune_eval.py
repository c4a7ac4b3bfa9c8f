"""Evaluation and prediction of a fine-tuning task (the second half of ``FinetuneTask``).

Each DP rank computes the logits of a contiguous share of a split, the shares are all-gathered in
dataset order, and rank 0 scores them with the TaskSpec (and writes predictions); the result, or
rank 0's error, is broadcast so no rank is left waiting in a collective.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from ..data.loader import collate

PREDICTION_EXT = {"sequence_classification": ".jsonl", "multiple_choice": ".jsonl",
                  "token_classification": ".txt", "question_answering": ".json"}


class FinetuneEvaluation:
    """Mixin: needs ``ps``, ``cfg``, ``spec``, ``head``, ``eval_sets`` / ``predict_sets`` and the loss helpers
    ``_inputs``, ``_logits``, ``_count``, ``_loss_sum`` of :class:`~.finetune.FinetuneTask`."""

    def _logit_shape(self, ds) -> tuple:
        s = ds.arrays["input_ids"].shape[-1]
        return {"sequence_classification": (self.spec.num_labels,),
                "token_classification": (s, self.spec.num_labels),
                "question_answering": (s, 2),
                "multiple_choice": (self.spec.num_labels,)}[self.head]

    @torch.no_grad()
    def _gather_logits(self, model, ds, autocast) -> torch.Tensor:
        """Logits of every feature of ``ds`` in dataset order (CPU, float32), on every rank. Each DP
        rank runs a contiguous share; TP ranks of a DP rank compute the same (replicated) logits."""
        ps, n = self.ps, len(ds)
        chunk = -(-n // ps.dp_size)
        lo, hi = min(n, ps.dp_rank * chunk), min(n, (ps.dp_rank + 1) * chunk)
        mbs = self.cfg.train.micro_batch_size
        parts = []
        was_training = model.training
        model.eval()
        try:
            for s in range(lo, hi, mbs):
                mb = collate([ds[i] for i in range(s, min(hi, s + mbs))])
                with autocast():
                    out = model(**self._inputs(mb))
                parts.append(self._logits(out))
        finally:
            model.train(was_training)
        shape = self._logit_shape(ds)
        local = torch.cat(parts) if parts else torch.zeros((0, *shape), device=ps.device)
        if ps.dp_size > 1:
            if local.shape[0] < chunk:
                local = torch.cat([local, local.new_zeros((chunk - local.shape[0], *shape))])
            gathered = [torch.empty_like(local) for _ in range(ps.dp_size)]
            dist.all_gather(gathered, local.contiguous(), group=ps.dp_group)
            local = torch.cat(gathered)[:n]
        return local.cpu()

    def _score(self, split: str, ds, logits: torch.Tensor):
        """(metrics incl. the split's loss, predictions) — rank 0 only work."""
        metrics, preds = self.spec.evaluate(ds, logits.numpy())
        if ds.has_labels:
            labels = {k: torch.from_numpy(np.asarray(ds.arrays[k])) for k in self.spec.label_fields}
            labels = {k: v.long() if not v.dtype.is_floating_point else v for k, v in labels.items()}
            count = self._count(labels)
            loss = float(self._loss_sum(logits, labels)) / max(count, 1)
            metrics = {**self.spec._suffix({"loss": loss}, split), **metrics}
        return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in metrics.items()}, preds

    def _on_main(self, fn):
        """Run ``fn`` on global rank 0 and hand its result to every rank; an error there becomes an
        error everywhere (instead of the other ranks waiting forever in the next collective)."""
        result, error = None, None
        if self.ps.is_main:
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - re-raised below
                error = e
        if self.ps.distributed:
            box = [(result, None if error is None else str(error).strip().splitlines()[0] if str(error).strip()
                    else type(error).__name__)]
            dist.broadcast_object_list(box, src=0, device=self.ps.device if self.ps.device.type == "cuda" else None)
            if not self.ps.is_main:
                result, message = box[0]
                if message is not None:
                    raise ConfigError(f"rank 0 failed: {message}")  # rank 0 prints the real error
        if error is not None:
            raise error
        return result

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        """Metrics of every eval split (the whole split; ``iters`` is not used) on one line."""
        res = {}
        for split, ds in self.eval_sets.items():
            logits = self._gather_logits(model, ds, autocast)
            res.update(self._on_main(lambda: self._score(split, ds, logits)[0]))
        return res

    def predictions_path(self, split: str) -> str:
        t = self.cfg.task
        base = t.predictions_file or str(Path(self.cfg.run_dir) / f"predictions{PREDICTION_EXT[self.head]}")
        if len(self.predict_sets) > 1:
            stem, ext = os.path.splitext(base)
            return f"{stem}_{split}{ext}"
        return base

    def _score_and_write(self, split, ds, logits, path) -> dict:
        metrics, preds = self._score(split, ds, logits)
        if self.head == "question_answering":
            stem = os.path.splitext(path)[0]
            self.spec.write_predictions(path, ds, preds, nbest_path=f"{stem}_nbest.json",
                                        null_odds_path=f"{stem}_null_odds.json" if self.spec.version_2 else None)
        else:
            self.spec.write_predictions(path, ds, preds)
        return metrics

    def run_mode(self, trainer) -> int:
        """task.mode=evaluate|predict: score / predict every chosen split, write predictions, no training."""
        step = int(self.source_meta.get("step", trainer.step))
        metrics = {}
        for split, ds in self.predict_sets.items():
            logits = self._gather_logits(trainer.model, ds, trainer.autocast)
            path = self.predictions_path(split)
            metrics.update(self._on_main(lambda: self._score_and_write(split, ds, logits, path)))
            self.log(f"{self.mode}: {split}: {len(ds.examples)} predictions -> {path}")
        if metrics:
            trainer.writer.write({"step": step, "split": self.predict_kind, "mode": self.mode, **metrics})
            self.log(f"{self.mode} ({self.source}) | "
                     + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float)))
        trainer.writer.close()
        return 0
