"""Fine-tuning tasks: data readers, featurizers, metrics and prediction writers.

    spec = get_task("glue", dataset="mnli")          # or "mnli", "glue/mnli", "ner", "squad", "race"
    files = spec.data_files(data_dir)                 # {"train": ..., "matched": ..., "mismatched": ...}
    train = spec.load_dataset(files["train"], tokenizer, max_seq_length, split="train")
    spec.head_type, spec.num_labels, spec.problem_type, spec.label_fields
    metrics, preds = spec.evaluate(valid_ds, logits)  # logits of every feature, dataset order
    spec.write_predictions(path, valid_ds, preds)
"""
from .common import (HEAD_TYPES, IGNORE_INDEX, INPUT_FIELDS, TaskDataError, TaskDataset, TaskSpec, collate,
                     get_task, list_tasks, register_task)
from . import glue, ner, race, squad  # noqa: F401  (importing registers the tasks)

__all__ = ["HEAD_TYPES", "IGNORE_INDEX", "INPUT_FIELDS", "TaskDataError", "TaskDataset", "TaskSpec", "collate",
           "get_task", "list_tasks", "register_task"]
