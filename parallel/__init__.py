"""A small tensor-parallel library on torch.distributed (no model knowledge)."""
from .cross_entropy import vocab_parallel_cross_entropy
from .dp_shard import DPShardPlan
from .grads import (allreduce_data_parallel_grads, allreduce_sequence_parallel_grads, clip_grad_norm_, grad_norm,
                    whole_tensor_norms)
from .init import init_sharded, is_tp_sharded, normal_init, set_tp_metadata, shard_of, unshard
from .layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, column_parallel_linear
from .mappings import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_sp,
    scatter_to_tp,
)
from .random import RNGTracker, checkpoint, keyed_dropout, seed_everything
from .state import ParallelConfigError, ParallelState, validate_layout

__all__ = [
    "ParallelState", "ParallelConfigError", "validate_layout",
    "ColumnParallelLinear", "column_parallel_linear", "RowParallelLinear", "VocabParallelEmbedding", "vocab_parallel_cross_entropy",
    "copy_to_tp", "reduce_from_tp", "scatter_to_tp", "gather_from_tp",
    "scatter_to_sp", "gather_from_sp", "reduce_scatter_to_sp",
    "RNGTracker", "seed_everything", "checkpoint", "keyed_dropout",
    "init_sharded", "normal_init", "set_tp_metadata", "is_tp_sharded", "shard_of", "unshard",
    "allreduce_data_parallel_grads", "allreduce_sequence_parallel_grads", "grad_norm", "clip_grad_norm_", "whole_tensor_norms",
    "DPShardPlan",
]
