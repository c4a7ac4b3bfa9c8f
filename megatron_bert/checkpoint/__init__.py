"""Sharded, reshardable, atomic checkpoints (torch.distributed.checkpoint underneath).

``python -m megatron_bert.checkpoint {inspect,consolidate} PATH [OUT]`` inspects / consolidates one.
"""
from .async_save import AsyncCheckpointSaver
from .manager import (
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    read_model_state,
    resolve_checkpoint,
    save_checkpoint,
    write_model_checkpoint,
)
from .sharded import CheckpointError

__all__ = [
    "CheckpointError", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "best_checkpoint", "list_checkpoints",
    "resolve_checkpoint", "read_meta", "read_model_state", "write_model_checkpoint", "AsyncCheckpointSaver",
]
