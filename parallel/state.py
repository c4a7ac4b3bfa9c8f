"""The one object that knows who we are: ranks, tensor × data parallel groups, device.

Ranks are laid out with tensor parallelism fastest-varying (``tp_rank = rank % tp``), so a TP
group is a run of consecutive ranks, i.e. GPUs of one node, where the all-reduces are cheap.

Nothing here is global: build a ``ParallelState`` once and pass it to whatever needs it.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


class ParallelConfigError(ValueError):
    """A parallel layout that cannot work (e.g. TP does not divide the world size)."""


def check_divisible(numerator: int, denominator: int, what: str, fix: str) -> None:
    if denominator <= 0 or numerator % denominator != 0:
        raise ParallelConfigError(f"{what} ({numerator}) is not divisible by {denominator}: {fix}")


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` → this rank's GPU when CUDA is present, else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ParallelConfigError("device=cuda was asked for but no CUDA GPU is visible: use device=cpu or auto")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if device == "cpu":
        return torch.device("cpu")
    raise ParallelConfigError(f"unknown device {device!r}: use auto, cpu or cuda")


def _rank_layout(world_size: int, tp: int) -> tuple[list[list[int]], list[list[int]]]:
    """TP groups are consecutive ranks; DP groups take every tp-th rank."""
    dp = world_size // tp
    tp_groups = [list(range(d * tp, (d + 1) * tp)) for d in range(dp)]
    dp_groups = [list(range(t, world_size, tp)) for t in range(tp)]
    return tp_groups, dp_groups


@dataclass
class ParallelState:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    tp_size: int = 1
    tp_rank: int = 0
    dp_size: int = 1
    dp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    # None means "no process group": single-process runs need no torch.distributed at all.
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None
    owns_process_group: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> "ParallelState":
        """A one-process state: every collective becomes a no-op."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(device=dev)

    @classmethod
    def from_env(
        cls,
        tensor_parallel: int = 1,
        device: str = "auto",
        timeout_s: float = 600.0,
        env: dict[str, str] | None = None,
    ) -> "ParallelState":
        """Build from torchrun's RANK / WORLD_SIZE / LOCAL_RANK (plain ``python`` = one process).

        Validates the layout *before* touching torch.distributed so a bad config costs nothing.
        """
        env = os.environ if env is None else env
        world_size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        validate_layout(world_size, tensor_parallel)
        dev = resolve_device(device, local_rank)
        if world_size == 1 and not dist.is_initialized():
            return cls(device=dev, local_rank=local_rank)

        backend = "nccl" if dev.type == "cuda" else "gloo"
        owns = False
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(
                backend=backend,
                rank=rank,
                world_size=world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
                device_id=dev if dev.type == "cuda" else None,
            )
            owns = True
        return cls.from_process_group(tensor_parallel, dev, backend, owns, timeout_s)

    @classmethod
    def from_process_group(
        cls, tensor_parallel: int, device: torch.device, backend: str | None = None, owns: bool = False,
        timeout_s: float | None = None,
    ) -> "ParallelState":
        """Carve TP × DP groups out of an already initialised default process group."""
        world_size = dist.get_world_size()
        rank = dist.get_rank()
        validate_layout(world_size, tensor_parallel)
        tp_lists, dp_lists = _rank_layout(world_size, tensor_parallel)
        tp_group = dp_group = None
        # new_group does not inherit the world group's timeout: pass it, or a hung TP/DP collective
        # would wait torch's default (30 min) instead of train.dist_timeout.
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        # Every rank must create every group, in the same order.
        for ranks in tp_lists:
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                tp_group = g
        for ranks in dp_lists:
            g = dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                dp_group = g
        return cls(
            rank=rank,
            world_size=world_size,
            local_rank=int(os.environ.get("LOCAL_RANK", rank)),
            tp_size=tensor_parallel,
            tp_rank=rank % tensor_parallel,
            dp_size=world_size // tensor_parallel,
            dp_rank=rank // tensor_parallel,
            device=device,
            backend=backend or dist.get_backend(),
            tp_group=tp_group,
            dp_group=dp_group,
            world_group=dist.group.WORLD,
            owns_process_group=owns,
        )

    # ------------------------------------------------------------------ helpers
    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device_mesh(self):
        """A 2-D ``DeviceMesh`` (dp, tp) matching this layout, built on first use (collective call).

        Used to present TP shards as DTensors, e.g. for torch.distributed.checkpoint.
        """
        if getattr(self, "_mesh", None) is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.dp_size, self.tp_size), mesh_dim_names=("dp", "tp"))
        return self._mesh

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def destroy(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
        self.owns_process_group = False

    def __repr__(self) -> str:  # groups are not printable in a useful way
        return (
            f"ParallelState(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
            f"dp={self.dp_rank}/{self.dp_size}, device={self.device}, backend={self.backend})"
        )


def validate_layout(world_size: int, tensor_parallel: int) -> None:
    if tensor_parallel < 1:
        raise ParallelConfigError(f"parallel.tensor must be >= 1, got {tensor_parallel}")
    check_divisible(
        world_size, tensor_parallel, "world size",
        f"parallel.tensor={tensor_parallel} must divide the number of processes (e.g. torchrun --nproc_per_node)",
    )
