"""Pretraining as a task for the trainer: data, model, loss, evaluation.

The loss of a step is normalised over the *global* batch (masked tokens summed over every
micro-batch and DP rank), so any split of the batch over micro-batches and DP ranks computes the
same gradient — the reason a TP=2×DP=2 run tracks a TP=1 run to 1e-5.

``task.mode=evaluate`` (``run_mode``): score a checkpoint's weights (architecture and tokenizer from the
checkpoint) on the validation data with the protocol of the evaluations during training, no training.
"""
from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import ListConfig, OmegaConf

from parallel import ParallelState

from ..checkpoint import CheckpointError
from ..model import MASKED_LM_HEADS, SENTENCE_HEAD_PARTS, MegatronBertForPreTraining, gather_lm_logits
from ..model.heads import target_positions_of
from .config import ConfigError


def _dp_sum(values: list[float], ps: ParallelState, device) -> list[float]:
    return _dp_sum_(torch.tensor(values, dtype=torch.float64, device=device), ps).tolist()


def _dp_sum_(t: torch.Tensor, ps: ParallelState) -> torch.Tensor:
    """Sum a device tensor over the data-parallel group, in place (no host synchronisation)."""
    if ps.dp_size > 1:
        dist.all_reduce(t, group=ps.dp_group)
    return t


def lm_slots(seq_len: int, masked_lm_prob: float) -> int:
    """MLM target slots per sample for static shapes: the masking budget is at most
    ceil(seq_len * masked_lm_prob) per sample (data/masking.py), so these hold every batch."""
    return min(seq_len, max(1, math.ceil(seq_len * masked_lm_prob)))


def to_model_inputs(mb: dict, *, prune_last_layer: bool, use_binary: bool, static_lm_prob: float | None) -> dict:
    """A collated micro-batch → the model's keyword inputs, decided on the host so the device never
    waits: no padding → no mask (flash attention on GPU); the MLM targets of each sample as
    ``target_positions [b, k]`` (-1 = unused slot; the last layer then computes only [CLS] and the
    targets: ``train.prune_last_layer``) or, unpruned, as ``lm_positions`` (flat indices, padded
    with an unlabelled position). With ``static_lm_prob`` (GPU) k is :func:`lm_slots` so that every
    step has the same shapes (CUDA graphs, no recompiles); a sample with more targets widens that batch."""
    labels = mb["labels"]
    b, s = labels.shape
    labelled = labels != -100
    cap = lm_slots(s, static_lm_prob) if static_lm_prob is not None else None
    x = {"input_ids": mb["input_ids"], "token_type_ids": mb["token_type_ids"], "labels": labels,
         "sample_ids": mb["sample_id"],
         "attention_mask": None if bool(mb["attention_mask"].all()) else mb["attention_mask"]}
    if prune_last_layer:
        k = max(1, int(labelled.sum(1).max()), cap or 0)
        x["target_positions"] = target_positions_of(labels, k)
    else:
        flat = labels.reshape(-1)
        positions = labelled.reshape(-1).nonzero().squeeze(1)
        if cap is not None and positions.numel() < b * cap:
            filler = (flat == -100).nonzero()[0]
            positions = torch.cat([positions, filler.expand(b * cap - positions.numel())])
        x["lm_positions"] = positions
    if use_binary:
        x["next_sentence_label"] = mb["binary_label"]
    return x


class PretrainTask:
    head = "pretraining"

    def __init__(self, cfg, ps: ParallelState, log):
        self.cfg, self.ps, self.log = cfg, ps, log
        self.use_binary = cfg.data.binary_head != "none"
        self.mode = cfg.task.mode
        self.source, self.source_meta = None, {}

    # ------------------------------------------------------------------ data
    def setup(self):
        """Tokenizer + datasets. Rank 0 builds caches first; the others then just load them."""
        from ..data import load_tokenizer, prepare_quickstart
        from ..data.blend import BlendedDataset, build_blended_pretraining_datasets, parse_blend

        if self.mode == "predict":
            raise ConfigError("task.mode=predict is for fine-tuning tasks (task=glue|ner|squad|race); pretraining "
                              "has task.mode=evaluate (masked-LM and SOP/NSP loss and accuracy of a checkpoint)")
        if self.mode == "evaluate":
            self._evaluation_source()

        d = self.cfg.data
        prefix, tokenizer, valid_prefix = d.prefix, d.tokenizer, d.valid_prefix
        if isinstance(prefix, ListConfig):
            prefix = OmegaConf.to_container(prefix)
        if isinstance(valid_prefix, ListConfig):
            valid_prefix = OmegaConf.to_container(valid_prefix)
        for rank_turn in (True, False):
            if self.ps.is_main == rank_turn:
                if prefix is None:
                    if d.name != "quickstart":
                        raise ValueError("data.prefix is not set: give data.prefix=PATH (from megatron_bert.preprocess)")
                    # One process: forking worker pools from a rank that already runs torch.distributed
                    # threads can deadlock the child (seen in CI); the corpus is small anyway.
                    built = prepare_quickstart(d.cache_dir or "data_cache/quickstart", workers=1, log=self.log)
                    prefix, tokenizer = built["prefix"], tokenizer or built["tokenizer"]
                if tokenizer is None:
                    raise ValueError("data.tokenizer is not set: give data.tokenizer=vocab.txt or a .model file")
                self.tokenizer = load_tokenizer(tokenizer)
                options = dict(binary_head=None if d.binary_head == "none" else d.binary_head,
                               masked_lm_prob=d.masked_lm_prob, whole_word_masking=d.whole_word_masking,
                               max_ngrams=d.max_ngrams, ngram_distribution=d.ngram_distribution,
                               short_seq_prob=d.short_seq_prob, cache_dir=d.cache_dir)
                # with a separate validation corpus every document of data.prefix trains
                split = 0.0 if valid_prefix is not None else d.valid_fraction
                self.train_ds, self.valid_ds = build_blended_pretraining_datasets(
                    parse_blend(prefix), self.tokenizer, d.seq_length, self.cfg.train.seed,
                    valid_fraction=split, **options)
                if valid_prefix is not None:  # all of its documents (its "train" part at fraction 0)
                    self.valid_ds, _ = build_blended_pretraining_datasets(
                        parse_blend(valid_prefix, "data.valid_prefix"), self.tokenizer, d.seq_length,
                        self.cfg.train.seed, valid_fraction=0.0, **options)
            self.ps.barrier()
        self.tokenizer_path = str(Path(tokenizer).resolve())
        self.data_prefix = prefix if isinstance(prefix, list) else str(prefix)

        def source(ds, path):
            return f"a blend of {ds.describe()}" if isinstance(ds, BlendedDataset) else path

        if valid_prefix is None:
            self.log(f"data: {len(self.train_ds)} train / {len(self.valid_ds)} valid samples per epoch from "
                     f"{source(self.train_ds, prefix)}")
        else:
            self.log(f"data: {len(self.train_ds)} train samples per epoch from {source(self.train_ds, prefix)} / "
                     f"{len(self.valid_ds)} valid from {source(self.valid_ds, valid_prefix)} (data.valid_prefix)")
        return self.tokenizer.vocab_size

    def train_batches(self, consumed_samples: int):
        """Steps of this rank's micro-batches, each already turned into model inputs on the host (in the
        loader's worker processes when data.num_workers > 0: the training process only waits for them)."""
        from ..data import PretrainingLoader

        t = self.cfg.train
        loader = PretrainingLoader(
            self.train_ds, t.global_batch_size, t.micro_batch_size, self.ps.dp_rank, self.ps.dp_size,
            consumed_samples=consumed_samples, num_workers=self.cfg.data.num_workers,
            pin_memory=self.ps.device.type == "cuda", transform=partial(to_model_inputs, **self.input_options()))
        return iter(loader)

    def _evaluation_source(self) -> None:
        """task.mode=evaluate: the weights to score (task.pretrained, else what checkpoint.resume
        resumes), loaded as weights only; the architecture and tokenizer follow them."""
        from .checkpointing import adopt_architecture, sample_stream_changes, weights_source

        c, t = self.cfg.checkpoint, self.cfg.task
        if t.pretrained:
            c.resume = "none"  # an explicitly named checkpoint wins over whatever the run dir holds
        self.source, _, self.source_meta = weights_source(self.cfg)
        if self.source is None:
            raise ConfigError("task.mode=evaluate needs weights: give task.pretrained=CHECKPOINT (a pretraining "
                              "run's checkpoints/ folder, one step_<N>/ or a converted checkpoint)")
        t.pretrained, c.resume = str(self.source), "none"
        meta, src = self.source_meta, self.source
        if meta.get("head", "pretraining") not in MASKED_LM_HEADS:
            raise CheckpointError(f"checkpoint {src} has a {meta['head']!r} head, not the pretraining (MLM + "
                                  "SOP/NSP) one: evaluate it with its fine-tuning task (task=... task.mode=evaluate)")
        if self.cfg.train.eval_iters < 1:
            raise ConfigError(f"task.mode=evaluate scores train.eval_iters global batches; "
                              f"train.eval_iters={self.cfg.train.eval_iters}: set it >= 1")
        adopt_architecture(self.cfg.model, meta, src, self.log)
        if self.cfg.data.tokenizer is None and meta.get("tokenizer"):
            self.cfg.data.tokenizer = meta["tokenizer"]
        changed = sample_stream_changes(meta.get("config", {}), OmegaConf.to_container(self.cfg))
        if changed:
            self.log(f"note: the data settings differ from the training run's ({'; '.join(changed)}): these "
                     "validation samples are not the ones its evaluations used")

    def run_mode(self, trainer) -> int:
        """task.mode=evaluate: one evaluation of the loaded weights, logged as the training run's are."""
        from ..checkpoint.sharded import tensor_index

        # The trainer loads task.pretrained leniently (new heads keep their init); a score needs every
        # tensor it uses from the checkpoint.
        saved = tensor_index(self.source)
        unused = () if self.use_binary else SENTENCE_HEAD_PARTS
        missing = [k for k in trainer.model.state_dict() if f"model.{k}" not in saved and not k.startswith(unused)]
        if missing and any(k.startswith(SENTENCE_HEAD_PARTS) for k in missing):
            raise ConfigError(f"checkpoint {self.source} has no binary (SOP/NSP) head or pooler: give "
                              "data.binary_head=none to score the masked LM only")
        if missing:
            raise CheckpointError(f"checkpoint {self.source} lacks {len(missing)} tensors the pretraining model "
                                  f"needs (first: {missing[0]}): it was written for another model")
        res = self.evaluate(trainer.model, self.cfg.train.eval_iters, trainer.autocast)
        step = int(self.source_meta.get("step", 0))
        trainer.writer.write({"step": step, "split": "valid", "mode": "evaluate", **res})
        self.log(f"evaluate ({self.source}, step {step}, {self.cfg.train.eval_iters} x "
                 f"{self.cfg.train.global_batch_size} samples) | "
                 + " | ".join(f"{k} {v:.4f}" for k, v in res.items() if isinstance(v, float)))
        trainer.writer.close()
        return 0

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg, rt, tracker):
        return MegatronBertForPreTraining(model_cfg, self.ps, rt, tracker=tracker)

    def input_options(self) -> dict:
        """How :func:`to_model_inputs` shapes this run's micro-batches (plain values: it runs in loader workers)."""
        return {"prune_last_layer": bool(self.cfg.train.prune_last_layer), "use_binary": self.use_binary,
                "static_lm_prob": self.cfg.data.masked_lm_prob if self.ps.device.type == "cuda" else None}

    def model_inputs(self, mb) -> dict:
        return to_model_inputs(mb, **self.input_options())

    def _on_device(self, x: dict) -> dict:
        dev = self.ps.device
        return {k: None if v is None else v.to(dev, non_blocking=True) for k, v in x.items()}

    # ------------------------------------------------------------------ one step
    def forward_backward(self, model, micro_batches, backward, autocast) -> dict:
        """Forward + backward over this rank's micro-batches (model inputs, on the host or already on
        the device). Returns DP-reduced statistics as device scalars; nothing here waits for the host."""
        ps, G = self.ps, self.cfg.train.global_batch_size
        inputs = [self._on_device(x) for x in micro_batches]
        tokens = torch.stack([(x["labels"] != -100).sum() for x in inputs]).sum().double()
        global_tokens = _dp_sum_(tokens, ps).clamp(min=1.0)
        sums = torch.zeros(2, dtype=torch.float64, device=ps.device)  # MLM loss sum, binary loss sum
        for x in inputs:
            with autocast():
                out = model(**x, only_masked_logits=True)
            loss = out.lm_loss_sum / global_tokens.float()
            if self.use_binary:
                b = x["input_ids"].shape[0]
                loss = loss + out.binary_loss * (b / G)
                sums[1] += out.binary_loss.detach().double() * b
            sums[0] += out.lm_loss_sum.detach().double()
            backward(loss)
        lm_sum, bin_sum = _dp_sum_(sums, ps).unbind(0)
        stats = {"lm_loss": lm_sum / global_tokens, "tokens": global_tokens}
        stats["binary_loss"] = bin_sum / G if self.use_binary else None
        stats["loss"] = stats["lm_loss"] + (stats["binary_loss"] if self.use_binary else 0.0)
        return stats

    @torch.no_grad()
    def evaluate(self, model, iters: int, autocast) -> dict:
        """Mean loss / accuracy over the first ``iters`` global batches of the held-out split."""
        from ..data import PretrainingLoader

        t = self.cfg.train
        loader = iter(PretrainingLoader(self.valid_ds, t.global_batch_size, t.micro_batch_size,
                                        self.ps.dp_rank, self.ps.dp_size, consumed_samples=0))
        sums = [0.0] * 6  # lm_sum, tokens, correct, bin_sum, bin_correct, samples
        was_training = model.training
        model.eval()
        try:
            for _ in range(iters):
                for mb in next(loader):
                    x = self._on_device(self.model_inputs(mb))
                    with autocast():
                        out = model(**x, only_masked_logits=True)
                    logits = gather_lm_logits(out.prediction_logits.float(), self.ps)
                    target = out.lm_labels
                    labelled = target != -100  # (padding slots are not)
                    sums[0] += out.lm_loss_sum.item()
                    sums[1] += labelled.sum().item()
                    sums[2] += ((logits.argmax(-1) == target) & labelled).sum().item()
                    if self.use_binary:
                        n = x["input_ids"].shape[0]
                        sums[3] += out.binary_loss.item() * n
                        sums[4] += (out.seq_relationship_logits.argmax(-1) == x["next_sentence_label"]).sum().item()
                        sums[5] += n
        finally:
            model.train(was_training)
        lm, tokens, correct, bsum, bcorrect, n = _dp_sum(sums, self.ps, self.ps.device)
        res = {"lm_loss": lm / max(tokens, 1), "lm_accuracy": correct / max(tokens, 1)}
        res["lm_perplexity"] = math.exp(min(res["lm_loss"], 700.0))
        if self.use_binary:
            res.update(binary_loss=bsum / max(n, 1), binary_accuracy=bcorrect / max(n, 1))
        res["loss"] = res["lm_loss"] + res.get("binary_loss", 0.0)
        return res

    def checkpoint_meta(self) -> dict:
        return {"tokenizer": self.tokenizer_path, "data_prefix": self.data_prefix}
