"""For TP ranks sharing one GPU over gloo only (tests/gpu_tp_check.py --shared-gpu, shared_gpu_train.py).

torch 2.11's functional all-gather (``_c10d_functional::all_gather_into_tensor``) crashes the process
(SIGSEGV) on a gloo group with CUDA tensors, while ``dist.all_gather_into_tensor`` on the same group
and tensors works, and so do the functional all-reduce and reduce-scatter (bench/probe_gloo_cuda.py,
session 17). ``install()`` puts a CUDA kernel for that op in front of torch's own: the same gather
through ``dist.all_gather_into_tensor``, done before it returns (``wait_tensor`` then has nothing to
wait for). The product's code stays as it is; NCCL runs never see this.
``init_shared_gpu()`` makes that process group: the shim, every rank on one GPU, gloo."""
import os

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

_lib = None


def _all_gather_into_tensor(x: torch.Tensor, group_size: int, group_name: str) -> torch.Tensor:
    out = x.new_empty((x.shape[0] * group_size, *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=_resolve_process_group(group_name))
    return out


def install() -> None:
    global _lib
    if _lib is None:
        _lib = torch.library.Library("_c10d_functional", "IMPL")
        _lib.impl("all_gather_into_tensor", _all_gather_into_tensor, "CUDA")


def init_shared_gpu() -> torch.device:
    """Under torchrun: install the shim and join a gloo group with every rank on one GPU (on a machine
    with more, the first visible one: set before CUDA starts). Returns that device, ``cuda:0``."""
    install()
    os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    torch.cuda.set_device(0)
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    return torch.device("cuda", 0)
