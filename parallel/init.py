"""TP-invariant initialisation and the sharding metadata carried on parameters.

Every rank draws the *full* (master) weight from the same generator and keeps its slice, so a
model built at TP=1, 2 or 4 holds exactly the same global weights for the same seed. The cost is a
transient full-size tensor per layer on the host, which is what makes checkpoints and tests exact.
"""
from __future__ import annotations

from typing import Callable

import torch

InitMethod = Callable[[torch.Tensor], None]


def normal_init(std: float, generator: torch.Generator | None = None) -> InitMethod:
    def init(t: torch.Tensor) -> None:
        if generator is not None and generator.device != t.device:
            # draw on the generator's device so the numbers do not depend on where t lives
            tmp = torch.empty(t.shape, dtype=t.dtype, device=generator.device)
            torch.nn.init.normal_(tmp, mean=0.0, std=std, generator=generator)
            with torch.no_grad():
                t.copy_(tmp)
        else:
            torch.nn.init.normal_(t, mean=0.0, std=std, generator=generator)

    return init


def zeros_init(t: torch.Tensor) -> None:
    torch.nn.init.zeros_(t)


def set_tp_metadata(param: torch.Tensor, partition_dim: int, stride: int = 1) -> None:
    """Mark a parameter as sharded along ``partition_dim`` across the TP group."""
    param.tensor_parallel = True
    param.partition_dim = partition_dim
    param.partition_stride = stride


def is_tp_sharded(param: torch.Tensor) -> bool:
    return getattr(param, "tensor_parallel", False)


def shard_of(full: torch.Tensor, partition_dim: int, tp_rank: int, tp_size: int, stride: int = 1) -> torch.Tensor:
    """This rank's part of a global tensor.

    ``stride > 1`` means the dimension is made of ``stride`` logical blocks (e.g. [Q; K; V] stacked)
    and each rank takes its piece *of every block*, so each rank still owns matching rows of each.
    """
    size = full.shape[partition_dim]
    if size % (tp_size * stride) != 0:
        raise ValueError(f"dimension of size {size} cannot be split into {tp_size} ranks × stride {stride}")
    per = size // (tp_size * stride)
    pieces = [full.narrow(partition_dim, (s * tp_size + tp_rank) * per, per) for s in range(stride)]
    return torch.cat(pieces, dim=partition_dim).contiguous()


def unshard(shards: list[torch.Tensor], partition_dim: int, stride: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_of` given every rank's shard in TP-rank order."""
    if stride == 1:
        return torch.cat(shards, dim=partition_dim)
    blocks = [s.chunk(stride, dim=partition_dim) for s in shards]
    return torch.cat([blocks[r][k] for k in range(stride) for r in range(len(shards))], dim=partition_dim)


def init_sharded(
    global_shape: tuple[int, ...],
    init_method: InitMethod,
    partition_dim: int,
    tp_rank: int,
    tp_size: int,
    stride: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Initialise the global tensor in fp32 (on ``device``: a GPU draws it in milliseconds), return
    this rank's slice as ``dtype``."""
    master = torch.empty(global_shape, dtype=torch.float32, device=device)
    init_method(master)
    return shard_of(master, partition_dim, tp_rank, tp_size, stride).to(dtype)
