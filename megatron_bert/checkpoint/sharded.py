"""Sharded checkpoints on torch.distributed.checkpoint (DCP), reshardable to any TP / DP size.

Each TP-sharded tensor is presented to DCP as a DTensor on the (dp, tp) mesh with placements
``[Replicate(), Shard(partition_dim)]``: DCP then records global shapes and chunk offsets, every
rank writes only its own shard (replicas are de-duplicated), and a later load at another TP size
reads exactly the overlapping pieces. Replicated tensors are plain tensors (written once).

DCP keys: ``model.<param>``, ``optim.<param>.exp_avg``, ``optim.<param>.exp_avg_sq``,
``optim.<param>.step``. Everything that is not a tensor lives in ``meta.json``.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import FileSystemReader

from parallel import ParallelState
from parallel.init import is_tp_sharded


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says what is wrong and how to fix it."""


# --------------------------------------------------------------------------- safe metadata
_SAFE_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_SAFE_GLOBALS = {("torch", "Size"), ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                 ("torch", "device"), ("builtins", "slice"), ("pathlib", "PosixPath"), ("pathlib", "Path"),
                 ("torch.serialization", "_get_layout")}


class _MetadataUnpickler(pickle.Unpickler):
    """DCP writes its ``.metadata`` with pickle; we read it through an allow-list so a crafted file
    cannot run code (tensor data itself is read by DCP with ``torch.load(weights_only=True)``)."""

    def find_class(self, module, name):
        if module in _SAFE_MODULES or (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and (name.endswith("_format") or isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)  # dtypes, memory formats
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            raise pickle.UnpicklingError("tensor found in checkpoint metadata")
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} has no DCP metadata file: it is not a complete checkpoint") from None
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError) as e:
            raise CheckpointError(f"checkpoint metadata in {self.path} is corrupt or unsafe ({e})") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(path) -> "dcp.Metadata":
    return SafeFileSystemReader(str(path)).read_metadata()


# --------------------------------------------------------------------------- state dicts
def _present(t: torch.Tensor, param: torch.nn.Parameter, ps: ParallelState):
    """Wrap a local shard as a DTensor carrying its global layout (plain tensor when unsharded)."""
    if ps.tp_size == 1 or not is_tp_sharded(param):
        return t
    if getattr(param, "partition_stride", 1) != 1:
        raise CheckpointError("strided TP partitions are not supported by the checkpoint format")
    from torch.distributed.tensor import DTensor, Replicate, Shard

    dim = param.partition_dim
    shape = list(t.shape)
    shape[dim] *= ps.tp_size
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, ps.device_mesh(), [Replicate(), Shard(dim)], run_check=False,
                              shape=torch.Size(shape), stride=stride)


def _local(t) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def build_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ps: ParallelState) -> dict:
    """DCP state dict viewing the live parameters / optimizer moments (no copies on save)."""
    sd = {}
    for name, p in model.named_parameters():
        sd[f"model.{name}"] = _present(p.detach(), p, ps)
        if optimizer is not None:
            st = optimizer.state.get(p)
            if not st:  # no step taken yet: create the moments so the layout is complete
                st = optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                           "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                           "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            for key in ("exp_avg", "exp_avg_sq"):
                sd[f"optim.{name}.{key}"] = _present(st[key], p, ps)
            sd[f"optim.{name}.step"] = st["step"]
    return sd


@contextlib.contextmanager
def _quiet():
    """DCP warns that it assumes a single process when torch.distributed is off: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        yield


def save_state(path, model, optimizer, ps: ParallelState) -> None:
    """Every rank writes its shards of the model (and optimizer) into directory ``path``."""
    sd = build_state_dict(model, optimizer, ps)
    with _quiet():
        dcp.save(sd, checkpoint_id=str(path), no_dist=not dist.is_initialized())


def load_state(path, model, optimizer, ps: ParallelState, strict: bool = True) -> None:
    """Load into the live model / optimizer at the *current* TP/DP layout."""
    meta = read_metadata(path)
    saved = meta.state_dict_metadata
    sd = build_state_dict(model, optimizer, ps)
    if not strict:
        sd = {k: v for k, v in sd.items() if k in saved}
    missing = [k for k in sd if k not in saved]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors the model needs (first: {missing[0]}): "
            "it was written for a different model or task")
    for k, v in sd.items():
        want = tuple(v.shape)
        got = tuple(saved[k].size)
        if want != got:
            raise CheckpointError(
                f"checkpoint {path} holds {k} with shape {got} but the model needs {want}: "
                "it was written for a different model size (check model=... and model.vocab_size)")
    try:
        with _quiet():
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(path)), no_dist=not dist.is_initialized())
    except CheckpointError:
        raise
    except Exception as e:  # truncated / corrupt shard files surface here
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not read checkpoint {path}: {msg[:300]} (a shard file is missing or corrupt)") from None
    # DCP loads in place for plain tensors and DTensor locals alike; copy to be explicit about it.
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if k.startswith("model."):
                p = params[k[len("model."):]]
                if _local(v).data_ptr() != p.data_ptr():
                    p.copy_(_local(v))


def read_full_state(path) -> dict[str, torch.Tensor]:
    """Single process: every tensor of a checkpoint as a full (unsharded) CPU tensor."""
    meta = read_metadata(path)
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
          for k, m in meta.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    try:
        with _quiet():
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"could not read checkpoint {path}: {type(e).__name__} (a shard file is missing or corrupt)") from None
    return sd


def write_full_state(path, tensors: dict[str, torch.Tensor]) -> None:
    """Single process: write full tensors as a DCP checkpoint (loadable at any TP)."""
    with _quiet():
        dcp.save({k: v.contiguous() for k, v in tensors.items()}, checkpoint_id=str(path), no_dist=True)
