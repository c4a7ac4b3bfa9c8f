"""Pretraining as a task for the trainer: data, model, loss, evaluation.

The loss of a step is normalised over the *global* batch (masked tokens summed over every
micro-batch and DP rank), so any split of the batch over micro-batches and DP ranks computes the
same gradient — the reason a TP=2×DP=2 run tracks a TP=1 run to 1e-5.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from parallel import ParallelState

from ..model import MegatronBertForPreTraining, gather_lm_logits

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "sample_ids")


def _dp_sum(values: list[float], ps: ParallelState, device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if ps.dp_size > 1:
        dist.all_reduce(t, group=ps.dp_group)
    return t.tolist()


class PretrainTask:
    head = "pretraining"

    def __init__(self, cfg, ps: ParallelState, log):
        self.cfg, self.ps, self.log = cfg, ps, log
        self.use_binary = cfg.data.binary_head != "none"

    # ------------------------------------------------------------------ data
    def setup(self):
        """Tokenizer + datasets. Rank 0 builds caches first; the others then just load them."""
        from ..data import build_pretraining_datasets, load_tokenizer, prepare_quickstart

        d = self.cfg.data
        prefix, tokenizer = d.prefix, d.tokenizer
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
                self.train_ds, self.valid_ds = build_pretraining_datasets(
                    prefix, self.tokenizer, d.seq_length, self.cfg.train.seed, valid_fraction=d.valid_fraction,
                    binary_head=None if d.binary_head == "none" else d.binary_head, masked_lm_prob=d.masked_lm_prob,
                    whole_word_masking=d.whole_word_masking, short_seq_prob=d.short_seq_prob, cache_dir=d.cache_dir)
            self.ps.barrier()
        self.tokenizer_path = str(Path(tokenizer).resolve())
        self.data_prefix = str(prefix)
        self.log(f"data: {len(self.train_ds)} train / {len(self.valid_ds)} valid samples per epoch from {prefix}")
        return self.tokenizer.vocab_size

    def train_batches(self, consumed_samples: int):
        from ..data import PretrainingLoader

        t = self.cfg.train
        return iter(PretrainingLoader(
            self.train_ds, t.global_batch_size, t.micro_batch_size, self.ps.dp_rank, self.ps.dp_size,
            consumed_samples=consumed_samples, num_workers=self.cfg.data.num_workers,
            pin_memory=self.ps.device.type == "cuda"))

    # ------------------------------------------------------------------ model
    def build_model(self, model_cfg, rt, tracker):
        return MegatronBertForPreTraining(model_cfg, self.ps, rt, tracker=tracker)

    def _inputs(self, mb):
        dev = self.ps.device
        x = {k: mb[k].to(dev, non_blocking=True) for k in ("input_ids", "token_type_ids", "labels")}
        x["sample_ids"] = mb["sample_id"].to(dev, non_blocking=True)
        # Decided on the host (no device sync): no padding → no mask → flash attention on GPU.
        x["attention_mask"] = None if bool(mb["attention_mask"].all()) else mb["attention_mask"].to(dev, non_blocking=True)
        x["lm_positions"] = (mb["labels"].reshape(-1) != -100).nonzero().squeeze(1).to(dev, non_blocking=True)
        if self.use_binary:
            x["next_sentence_label"] = mb["binary_label"].to(dev, non_blocking=True)
        return x

    # ------------------------------------------------------------------ one step
    def forward_backward(self, model, micro_batches, backward, autocast) -> dict:
        """Forward + backward over this rank's micro-batches; returns DP-reduced step statistics."""
        ps, G = self.ps, self.cfg.train.global_batch_size
        local_tokens = sum(int((mb["labels"] != -100).sum()) for mb in micro_batches)
        global_tokens = max(1.0, _dp_sum([local_tokens], ps, ps.device)[0])
        lm_sum = torch.zeros((), dtype=torch.float64, device=ps.device)
        bin_sum = torch.zeros((), dtype=torch.float64, device=ps.device)
        for mb in micro_batches:
            with autocast():
                out = model(**self._inputs(mb), only_masked_logits=True)
            loss = out.lm_loss_sum / global_tokens
            if self.use_binary:
                b = mb["input_ids"].shape[0]
                loss = loss + out.binary_loss * (b / G)
                bin_sum += out.binary_loss.detach().double() * b
            lm_sum += out.lm_loss_sum.detach().double()
            backward(loss)
        lm, binary = _dp_sum([lm_sum.item(), bin_sum.item()], ps, ps.device)
        stats = {"lm_loss": lm / global_tokens, "tokens": global_tokens}
        stats["binary_loss"] = binary / G if self.use_binary else None
        stats["loss"] = stats["lm_loss"] + (stats["binary_loss"] or 0.0)
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
                    x = self._inputs(mb)
                    with autocast():
                        out = model(**x, only_masked_logits=True)
                    logits = gather_lm_logits(out.prediction_logits.float(), self.ps)
                    target = x["labels"][x["labels"] != -100]
                    sums[0] += out.lm_loss_sum.item()
                    sums[1] += target.numel()
                    sums[2] += (logits.argmax(-1) == target).sum().item()
                    if self.use_binary:
                        n = x["input_ids"].shape[0]
                        sums[3] += out.binary_loss.item() * n
                        sums[4] += (out.seq_relationship_logits.argmax(-1) == x["next_sentence_label"]).sum().item()
                        sums[5] += n
        finally:
            model.train(was_training)
        lm, tokens, correct, bsum, bcorrect, n = _dp_sum(sums, self.ps, self.ps.device)
        res = {"lm_loss": lm / max(tokens, 1), "lm_accuracy": correct / max(tokens, 1)}
        if self.use_binary:
            res.update(binary_loss=bsum / max(n, 1), binary_accuracy=bcorrect / max(n, 1))
        res["loss"] = res["lm_loss"] + res.get("binary_loss", 0.0)
        return res

    def checkpoint_meta(self) -> dict:
        return {"tokenizer": self.tokenizer_path, "data_prefix": self.data_prefix}
