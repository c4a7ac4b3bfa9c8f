"""Fine-tuning (GLUE, NER, SQuAD, RACE) as a task for the trainer, at any TP × DP size.

What the task owns:
- data: the tokenizer (``data.tokenizer``, else the one the checkpoint records), the TaskSpec from
  ``megatron_bert.tasks`` and its featurized train / eval / test splits;
- sampling (finetune_data.py): a per-epoch permutation seeded by (train.seed, epoch), so a step's
  samples depend on ``consumed_samples`` only, and ``sample_id = epoch * N + index`` for keyed dropout;
- the loss, normalised over the *global* batch (examples for classification / regression / QA /
  multiple choice, labelled tokens for NER), so every micro-batch / DP split gives the same gradient
  (the trainer sums gradients over DP);
- evaluation over every eval split, logits gathered from the DP ranks in dataset order, metrics by
  the TaskSpec (on rank 0, broadcast to the others);
- ``task.mode=evaluate|predict`` (``run_mode``, called by train.py instead of the training loop):
  score / predict with fine-tuned weights and write the predictions file.

The model architecture (sizes, activation, LayerNorm epsilon) follows the checkpoint the weights
come from, so ``task.pretrained=CKPT`` is enough; dropout and everything else come from the config.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from parallel import ParallelState

from ..checkpoint import CheckpointError
from ..model import HEADS
from .checkpointing import adopt_architecture, weights_source
from .config import ConfigError
from .finetune_data import FinetuneLoader
from .finetune_eval import FinetuneEvaluation
from .pretrain import _dp_sum, _dp_sum_

class FinetuneTask(FinetuneEvaluation):
    head: str | None = None

    def __init__(self, cfg, ps: ParallelState, log):
        self.cfg, self.ps, self.log = cfg, ps, log
        self.mode = cfg.task.mode
        self.head_kwargs: dict = {}
        self.label_names = None
        self.train_ds = None
        self.eval_sets: dict = {}     # split -> TaskDataset, scored during training / evaluate mode
        self.predict_sets: dict = {}  # split -> TaskDataset, used by run_mode

    # ================================================================== setup
    def setup(self) -> int:
        from ..data import load_tokenizer
        from ..tasks import get_task

        t = self.cfg.task
        if t.epochs is not None and not t.epochs > 0:
            raise ConfigError(f"task.epochs={t.epochs} must be > 0 (or null to use train.max_steps)")
        if self.mode != "train" and t.pretrained:
            # An explicitly named fine-tuned checkpoint wins over whatever the run dir holds.
            self.cfg.checkpoint.resume = "none"
        self.source, self.source_kind, self.source_meta = weights_source(self.cfg)
        if self.mode != "train" and self.source is None:
            raise ConfigError(f"task.mode={self.mode} needs fine-tuned weights: give task.pretrained=CHECKPOINT "
                              "(the checkpoints/ folder of a fine-tuning run) or checkpoint.resume=PATH")
        adopt_architecture(self.cfg.model, self.source_meta, self.source, self.log)

        tok_path = self._tokenizer_path()
        self.tokenizer = load_tokenizer(tok_path)
        self.tokenizer_path = str(Path(tok_path).resolve())
        saved_vocab = (self.source_meta.get("model") or {}).get("vocab_size")
        if saved_vocab and self.cfg.model.vocab_size is None and saved_vocab != self.tokenizer.vocab_size:
            raise CheckpointError(
                f"tokenizer {tok_path} has {self.tokenizer.vocab_size} tokens but checkpoint {self.source} was "
                f"trained with vocab_size={saved_vocab}: give data.tokenizer=<the tokenizer it was pretrained with>")

        try:
            self.spec = get_task(t.name, **self._task_options())
        except ValueError as e:
            raise ConfigError(f"task={t.name}: {e}") from None
        self._check_head_type()  # before the (possibly long) data loading
        self.seq_length = self._seq_length()
        self._load_data()
        self._set_head()
        if self.mode == "train":
            self._set_steps()
        return self.tokenizer.vocab_size

    def _tokenizer_path(self) -> str:
        path = self.cfg.data.tokenizer or self.source_meta.get("tokenizer")
        if not path:
            where = f"checkpoint {self.source} records none" if self.source else "no checkpoint is given"
            raise ConfigError(f"data.tokenizer is not set and {where}: give data.tokenizer=vocab.txt or a "
                              "SentencePiece .model (the tokenizer the model was pretrained with)")
        if not Path(path).exists():
            raise ConfigError(f"tokenizer {path} does not exist: give data.tokenizer=PATH (vocab.txt or .model)")
        return str(path)

    def _task_options(self) -> dict:
        t = self.cfg.task
        opts = dict(doc_stride=t.doc_stride, max_query_length=t.max_query_length, n_best_size=t.n_best_size,
                    max_answer_length=t.max_answer_length, null_score_diff_threshold=t.null_score_diff_threshold,
                    num_choices=t.num_choices, regression=t.regression,
                    version_2_with_negative=t.version_2_with_negative)
        if t.dataset:
            opts["dataset"] = t.dataset
        labels = list(t.labels) if t.labels else None
        if labels is None and self.mode != "train":
            labels = self.source_meta.get("label_names")  # the label order the head was trained with
        if labels is not None:
            opts["labels"] = [str(x) for x in labels]
        return opts

    def _seq_length(self) -> int:
        t, m = self.cfg.task, self.cfg.model
        seq = int(t.max_seq_length or self.cfg.data.seq_length)
        if seq > m.max_position_embeddings:
            raise ConfigError(f"task.max_seq_length={seq} exceeds model.max_position_embeddings="
                              f"{m.max_position_embeddings}: lower task.max_seq_length")
        tp = self.ps.tp_size
        if self.cfg.parallel.sequence_parallel and tp > 1 and seq % tp:
            raise ConfigError(f"task.max_seq_length={seq} must be divisible by parallel.tensor={tp} "
                              "with parallel.sequence_parallel=true")
        self.cfg.data.seq_length = seq  # what the trainer's throughput numbers use
        return seq

    # ------------------------------------------------------------------ data
    def _data_files(self) -> tuple[dict, list, list]:
        """{split: path}, eval split names, test split names (explicit *_file keys override data_dir)."""
        from ..tasks import TaskDataError

        t, spec = self.cfg.task, self.spec
        files = {}
        if t.data_dir:
            if not os.path.isdir(t.data_dir):
                raise TaskDataError(str(t.data_dir), "not a directory", "point task.data_dir at the task's data folder")
            try:
                files = spec.data_files(t.data_dir)
            except TaskDataError:
                if not (t.train_file or t.valid_file or t.test_file):
                    raise
        eval_splits = [s for s in spec.eval_splits if s in files]
        test_splits = sorted(s for s in files if s.startswith("test"))
        if t.train_file:
            files["train"] = t.train_file
        if t.valid_file:
            for s in eval_splits:
                files.pop(s, None)
            files["valid"], eval_splits = t.valid_file, ["valid"]
        if t.test_file:
            for s in test_splits:
                files.pop(s, None)
            files["test"], test_splits = t.test_file, ["test"]
        return files, eval_splits, test_splits

    def _load(self, path: str, split: str):
        from ..tasks import TaskDataError

        ds = self.spec.load_dataset(str(path), self.tokenizer, self.seq_length, split=split)
        if len(ds) == 0:
            raise TaskDataError(str(path), "holds no examples",
                                "check the file (and that it is in the right task's format)")
        return ds

    def _load_data(self) -> None:
        from ..tasks import TaskDataError

        files, eval_splits, test_splits = self._data_files()
        mode, name = self.mode, self.spec.name
        if mode == "train":
            if "train" not in files:
                raise ConfigError(f"task={self.cfg.task.name} has no training data: give task.data_dir=DIR "
                                  "or task.train_file=FILE")
            # The train split first: it fixes the label set of NER / generic classification.
            self.train_ds = self._load(files["train"], "train")
            if not self.train_ds.has_labels:
                raise TaskDataError(files["train"], "some examples have no label",
                                    "every training example needs a label")
            wanted = eval_splits
        else:
            wanted = eval_splits if mode == "evaluate" or not test_splits else test_splits
            if not wanted:
                what = "validation" if mode == "evaluate" else "test or validation"
                raise ConfigError(f"task.mode={mode} has no {what} data: give task.data_dir=DIR or "
                                  f"task.{'valid' if mode == 'evaluate' else 'test'}_file=FILE")
            if self.spec.head_type in ("sequence_classification", "token_classification") and "train" in files:
                try:
                    self.spec.num_labels
                except RuntimeError:  # label set unknown (checkpoint without label_names): read it off train
                    self.spec.load_examples(str(files["train"]))
        try:
            self.spec.num_labels
        except RuntimeError:
            raise ConfigError(f"task={self.cfg.task.name}: the label set is unknown; pass "
                              "task.labels=[...] in the order the model was trained with") from None
        sets = {s: self._load(files[s], s) for s in wanted}
        if mode == "evaluate":
            for s, ds in sets.items():
                if not ds.has_labels:
                    raise TaskDataError(str(files[s]), "has unlabeled examples",
                                        "task.mode=evaluate needs labels; use task.mode=predict for unlabeled data")
        if mode == "train":
            self.eval_sets = sets
        else:
            self.eval_sets = sets if mode == "evaluate" else {}
            self.predict_sets = sets
            self.predict_kind = "valid" if wanted is eval_splits else "test"
        parts = [f"{len(self.train_ds)} train"] if self.train_ds is not None else []
        parts += [f"{len(ds)} {s}" for s, ds in sets.items()]
        self.log(f"data: {name}, {' / '.join(parts)} features of {self.seq_length} tokens")
        if mode == "train" and not sets:
            self.log("data: no validation file found: evaluation during training is off")
            self.cfg.train.eval_iters = 0

    def _set_head(self) -> None:
        spec = self.spec
        self.head = spec.head_type
        if self.head == "sequence_classification":
            self.head_kwargs = {"num_labels": spec.num_labels, "problem_type": spec.problem_type}
        elif self.head == "token_classification":
            self.head_kwargs = {"num_labels": spec.num_labels}
        self.label_names = spec.label_names
        meta, src = self.source_meta, self.source
        if self._must_match_head() and "num_labels" in self.head_kwargs:
            saved = (meta.get("head_kwargs") or {}).get("num_labels")
            if saved is not None and int(saved) != self.head_kwargs["num_labels"]:
                raise CheckpointError(f"checkpoint {src} predicts {saved} labels but the task has "
                                      f"{self.head_kwargs['num_labels']} ({self.label_names}): "
                                      "check task.dataset / task.labels")

    def _must_match_head(self) -> bool:
        """Evaluate/predict and resuming need a checkpoint of this task's head (not just `bert.*`)."""
        return self.mode != "train" or self.source_kind == "resume"

    def _check_head_type(self) -> None:
        saved, mine, src = self.source_meta.get("head"), self.spec.head_type, self.source
        if not self._must_match_head() or saved == mine:
            return
        if self.mode == "train":
            raise CheckpointError(
                f"checkpoint.dir holds {src}, a {saved!r} checkpoint, not a {mine!r} one: use a fresh "
                "run_dir (or checkpoint.dir) for fine-tuning and pass the weights as task.pretrained")
        raise CheckpointError(
            f"checkpoint {src} has a {saved!r} head, not a fine-tuned {mine!r} one: "
            f"task.mode={self.mode} needs the checkpoint of a task={self.cfg.task.name} fine-tuning run")

    def _set_steps(self) -> None:
        t = self.cfg.train
        epochs = self.cfg.task.epochs
        if epochs is None:
            return
        steps = max(1, math.ceil(epochs * len(self.train_ds) / t.global_batch_size))
        self.log(f"schedule: task.epochs={epochs} x {len(self.train_ds)} features / global batch "
                 f"{t.global_batch_size} -> {steps} steps (train.max_steps={t.max_steps} is ignored)")
        t.max_steps = steps

    def train_batches(self, consumed_samples: int):
        t = self.cfg.train
        return iter(FinetuneLoader(self.train_ds, t.global_batch_size, t.micro_batch_size, self.ps.dp_rank,
                                   self.ps.dp_size, t.seed, consumed_samples))

    # ================================================================== model + loss
    def build_model(self, model_cfg, rt, tracker):
        return HEADS[self.head](model_cfg, self.ps, rt, tracker=tracker, **self.head_kwargs)

    def _inputs(self, mb) -> dict:
        dev = self.ps.device
        x = {k: mb[k].to(dev, non_blocking=True) for k in ("input_ids", "token_type_ids")}
        x["sample_ids"] = mb["sample_id"].to(dev, non_blocking=True)
        # Decided on the host (no device sync): no padding -> no mask (lets SDPA use its fastest kernel).
        mask = mb["attention_mask"]
        x["attention_mask"] = None if bool(mask.all()) else mask.to(dev, non_blocking=True)
        return x

    def _logits(self, out) -> torch.Tensor:
        """One tensor per head: [b, labels], [b, s, labels], [b, choices] or QA [b, s, 2] (start, end)."""
        if self.head == "question_answering":
            return torch.stack([out.start_logits, out.end_logits], dim=-1).float()
        return out.logits.float()

    def _count(self, labels: dict) -> int:
        """Loss normaliser contribution: labelled examples (tokens for NER)."""
        if self.head == "question_answering":
            return int(labels["start_positions"].shape[0])
        y = labels["labels"]
        if self.spec.problem_type == "regression":
            return int(torch.isfinite(y).sum())
        return int((y != -100).sum())

    def _loss_sum(self, logits: torch.Tensor, labels: dict) -> torch.Tensor:
        """Summed loss (HF semantics per head); divided by the global count it is the batch mean."""
        if self.head == "question_answering":
            s = logits.shape[1]  # positions outside the sequence are ignored, as HF does
            sp = labels["start_positions"].view(-1).clamp(0, s)
            ep = labels["end_positions"].view(-1).clamp(0, s)
            return (F.cross_entropy(logits[..., 0], sp, ignore_index=s, reduction="sum")
                    + F.cross_entropy(logits[..., 1], ep, ignore_index=s, reduction="sum")) / 2
        y = labels["labels"]
        if self.spec.problem_type == "regression":
            y = y.float().view(-1)
            ok = torch.isfinite(y)
            diff = torch.where(ok, logits.view(-1) - torch.nan_to_num(y), torch.zeros_like(y))
            return (diff * diff).sum()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), reduction="sum")

    def _labels(self, mb, device) -> dict:
        return {k: mb[k].to(device, non_blocking=True) for k in self.spec.label_fields}

    def forward_backward(self, model, micro_batches, backward, autocast) -> dict:
        ps = self.ps
        local = sum(self._count(self._labels(mb, "cpu")) for mb in micro_batches)
        norm = max(1.0, _dp_sum([local], ps, ps.device)[0])
        total = torch.zeros((), dtype=torch.float64, device=ps.device)
        for mb in micro_batches:
            with autocast():
                out = model(**self._inputs(mb))
            loss_sum = self._loss_sum(self._logits(out), self._labels(mb, ps.device))
            backward(loss_sum / norm)
            total += loss_sum.detach().double()
        loss = _dp_sum_(total, ps) / norm  # a device scalar: the trainer reads all statistics at once
        return {"loss": loss, "examples" if self.head != "token_classification" else "tokens": norm}

    def checkpoint_meta(self) -> dict:
        t = self.cfg.task
        return {"tokenizer": self.tokenizer_path, "label_names": self.label_names,
                "task": {"name": t.name, "spec": self.spec.name, "problem_type": self.spec.problem_type,
                         "max_seq_length": self.seq_length}}
