"""Sharded checkpoints on torch.distributed.checkpoint (DCP), reshardable to any TP / DP size.

Each TP-sharded tensor is presented to DCP as a DTensor on the (dp, tp) mesh with placements
``[Replicate(), Shard(partition_dim)]``: DCP then records global shapes and chunk offsets, every
rank writes only its own shard (replicas are de-duplicated), and a later load at another TP size
reads exactly the overlapping pieces. Replicated tensors are plain tensors (written once). With the
distributed optimizer (training/dist_optim.py) masters and moments are DP slices too: placements
``[Shard(dp_dim), Shard(tp_dim) | Replicate()]``, so they load into any TP/DP layout, sliced or not.

DCP keys: ``model.<param>``, ``optim.<param>.exp_avg``, ``optim.<param>.exp_avg_sq``,
``optim.<param>.step``. Everything that is not a tensor lives in ``meta.json``.
"""
from __future__ import annotations

import contextlib
import io
import pickle
import threading
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
# DCP pickles its ``.metadata``. We unpickle it through an exact allow-list so that a crafted file
# cannot run code: only the dataclasses / enums DCP itself defines for metadata, ``torch.Size``,
# dtypes / layouts / memory formats and a few builtins. Dotted names are refused outright: pickle
# protocol 4 resolves ``module`` + ``"a.b.c"`` by attribute lookup, which would otherwise reach
# e.g. ``os.system`` *through* an allowed module.
_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_SAFE_GLOBALS = {("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"), ("builtins", "set"),
                 ("builtins", "frozenset"), ("builtins", "slice"), ("pathlib", "PosixPath"), ("pathlib", "Path"),
                 ("pathlib", "PurePosixPath"), ("torch.serialization", "_get_layout")}


def _allowed_global(module: str, name: str):
    """The object ``module.name`` may resolve to in checkpoint metadata, or None if it is not allowed."""
    import dataclasses
    import enum
    import importlib

    if "." in name or not name.isidentifier():
        return None
    if (module, name) in _SAFE_GLOBALS:
        return getattr(importlib.import_module(module), name)
    if module in _DCP_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        if isinstance(obj, type) and obj.__module__ == module and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
            return obj
        return None
    if module == "torch":
        obj = getattr(torch, name, None)
        if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler for DCP ``.metadata`` that refuses every global outside the allow-list.

    (Tensor data itself is read by DCP with ``torch.load(weights_only=True)``.)"""

    def find_class(self, module, name):
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")
        return obj

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("checkpoint metadata holds a persistent reference (e.g. a tensor)")


def _check_metadata(metadata) -> None:
    """Structure checks, so that a well-formed but wrong pickle fails here and not deep inside DCP."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise pickle.UnpicklingError(f"not DCP metadata (got {type(metadata).__name__})")
    for info in (metadata.storage_data or {}).values():
        if not isinstance(info, _StorageInfo):
            raise pickle.UnpicklingError("unexpected storage entry")
        rel = str(info.relative_path)
        if not rel or "/" in rel or "\\" in rel or rel in (".", ".."):
            raise pickle.UnpicklingError(f"storage file name {rel!r} points outside the checkpoint directory")


def _check_pickle_header(data: bytes) -> None:
    """DCP writes its metadata with pickle protocol 2 or later: the PROTO opcode first and, from
    protocol 4, a first frame no longer than the file. Anything else is refused before unpickling:
    random bytes can make the unpickler try to allocate gigabytes (MemoryError, and a stray
    SystemError line on stderr as its buffers are freed)."""
    if len(data) < 2 or data[0] != 0x80 or not 2 <= data[1] <= pickle.HIGHEST_PROTOCOL:
        raise pickle.UnpicklingError("not a pickle of protocol 2 or later")
    if data[1] >= 4 and len(data) > 2 and data[2] == 0x95:  # FRAME + 8-byte length
        if len(data) < 11 or int.from_bytes(data[3:11], "little") > len(data) - 11:
            raise pickle.UnpicklingError("its first pickle frame runs past the end of the file")


class SafeFileSystemReader(FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        try:
            with self.fs.create_stream(path, "rb") as f:
                data = f.read()
            _check_pickle_header(data)
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
            _check_metadata(metadata)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path} has no DCP metadata file: it is not a complete checkpoint") from None
        except (pickle.UnpicklingError, EOFError) as e:
            raise CheckpointError(f"checkpoint metadata in {self.path} is corrupt or unsafe ({e})") from None
        except Exception as e:  # random bytes make pickle fail in many ways
            raise CheckpointError(f"checkpoint metadata in {self.path} is corrupt "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        from torch.distributed.checkpoint.metadata import StorageMeta

        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def read_metadata(path) -> "dcp.Metadata":
    return SafeFileSystemReader(str(path)).read_metadata()


def _first_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]


def describe_dcp_error(e: BaseException) -> str:
    """One short line for a DCP failure (``CheckpointException`` is a BaseException holding per-rank errors)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, pair = next(iter(sorted(failures.items(), key=lambda kv: kv[0])))
        exc = pair[0] if isinstance(pair, tuple) else pair
        if isinstance(exc, CheckpointError):
            return _first_line(exc, 300)
        return f"rank {rank}: {_exc_text(exc)}"
    return _exc_text(e)


def _exc_text(e: BaseException) -> str:
    name, text = type(e).__name__, _first_line(e)
    return name if text == name else f"{name}: {text}"


def _is_dcp_failure(e: BaseException) -> bool:
    from torch.distributed.checkpoint.api import CheckpointException

    return isinstance(e, (Exception, CheckpointException)) and not isinstance(e, CheckpointError)


# --------------------------------------------------------------------------- state dicts
def _present(t: torch.Tensor, param: torch.nn.Parameter, ps: ParallelState, dp_dim: int | None = None):
    """Wrap a local shard as a DTensor carrying its global layout (plain tensor when unsharded).

    ``dp_dim``: ``t`` is this DP rank's slice of ``param`` along that dimension (the distributed
    optimizer's masters and moments, cut like DTensor's ``Shard``: parallel/dp_shard.py)."""
    tp_dim = param.partition_dim if ps.tp_size > 1 and is_tp_sharded(param) else None
    if tp_dim is None and dp_dim is None:
        return t
    if tp_dim is not None and getattr(param, "partition_stride", 1) != 1:
        raise CheckpointError("strided TP partitions are not supported by the checkpoint format")
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = list(param.shape)  # this TP rank's shard of the global tensor
    if tp_dim is not None:
        shape[tp_dim] *= ps.tp_size
    stride = torch.empty(shape, device="meta").stride()
    placements = [Shard(dp_dim) if dp_dim is not None else Replicate(),
                  Shard(tp_dim) if tp_dim is not None else Replicate()]
    return DTensor.from_local(t, ps.device_mesh(), placements, run_check=False,
                              shape=torch.Size(shape), stride=stride)


def _local(t) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _weights_of(optimizer) -> dict:
    """Model parameter -> the fp32 master the optimizer updates (mixed precision), if it has masters."""
    return getattr(optimizer, "master_of", None) or {}


def _adam_state(optimizer, w: torch.Tensor, group: dict, after_load: list) -> dict:
    """This parameter's AdamW state as {"step", "exp_avg", "exp_avg_sq"} tensors, created (zeros, the
    layout torch itself would use) when no step was taken yet so the checkpoint layout is complete."""
    st = optimizer.state.get(w)
    if not st:
        on_device = bool(group.get("fused") or group.get("capturable"))
        st = optimizer.state[w] = {
            "step": torch.zeros((), dtype=torch.float32, device=w.device if on_device else "cpu"),
            "exp_avg": torch.zeros_like(w, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(w, memory_format=torch.preserve_format)}
    if "step" in st:
        return st
    # apex FusedAdam counts steps per param group: save that count, restore it after a load
    step = torch.tensor(float(group.get("step", 0)))
    after_load.append(lambda: group.__setitem__("step", int(step.item())))
    return {**st, "step": step}


def _build(model, optimizer, ps: ParallelState, with_optimizer: bool = True) -> tuple[dict, list]:
    masters = _weights_of(optimizer)
    # distributed optimizer: the masters (and moments) are DP slices along these dims (None: whole)
    dp_dims = getattr(optimizer, "dp_shard_dims", None)
    groups = {id(q): g for g in (optimizer.param_groups if optimizer is not None else ()) for q in g["params"]}
    sd, after_load = {}, []
    for name, p in model.named_parameters():
        w = masters.get(p, p)  # mixed precision: the fp32 master is the weight that is saved / loaded
        dp_dim = dp_dims.get(p) if dp_dims is not None else None
        sd[f"model.{name}"] = _present(w.detach(), p, ps, dp_dim)
        if with_optimizer and id(w) in groups:
            st = _adam_state(optimizer, w, groups[id(w)], after_load)
            for key in ("exp_avg", "exp_avg_sq"):
                sd[f"optim.{name}.{key}"] = _present(st[key], p, ps, dp_dim)
            sd[f"optim.{name}.step"] = st["step"]
    if masters and dp_dims is None:  # after a load: the low-precision model parameters follow their masters
        after_load.append(lambda: _copy_masters_to_model(masters))  # (sharded: its after_load all-gathers)
    hook = getattr(optimizer, "after_load", None)  # e.g. the flat AdamW re-checks its step counters
    if callable(hook):
        after_load.append(hook)
    return sd, after_load


def _copy_masters_to_model(masters: dict) -> None:
    with torch.no_grad():
        for p, m in masters.items():
            p.copy_(m)


def build_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ps: ParallelState) -> dict:
    """DCP state dict viewing the live parameters / optimizer moments (no copies on save).

    ``optimizer`` may be a torch AdamW (moments keyed by the parameters), apex FusedAdam (step count
    per group), or a mixed-precision wrapper exposing ``master_of`` {model param: fp32 master} and
    ``state`` / ``param_groups`` over the masters: then the fp32 masters are what is saved as the
    model weights, so a checkpoint is fp32 whatever the training precision."""
    return _build(model, optimizer, ps)[0]


# DCP warns that it "assumes the intent is to save in a single process" whenever torch.distributed is
# off; single-process saves / loads are intended here. Filtered once, process-wide (a per-call
# ``catch_warnings`` would swap global state under the async writer thread).
_SINGLE_PROCESS_WARNING = ".*torch.distributed is disabled, unavailable or uninitialized.*"
warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)


@contextlib.contextmanager
def _quiet():
    """The same filter, per call, for callers that reset warning filters (e.g. pytest); main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SINGLE_PROCESS_WARNING)
        yield


def save_state(path, model, optimizer, ps: ParallelState) -> None:
    """Every rank writes its shards of the model (and optimizer) into directory ``path``."""
    write_state(build_state_dict(model, optimizer, ps), path, ps)


def write_state(sd: dict, path, ps: ParallelState, process_group=None) -> None:
    """Collective: write a state dict (live or staged) with DCP. ``process_group`` defaults to the world."""
    try:
        with _quiet():
            dcp.save(sd, checkpoint_id=str(path), process_group=process_group, no_dist=not dist.is_initialized())
    except BaseException as e:
        if not _is_dcp_failure(e):
            raise
        raise CheckpointError(f"could not write checkpoint {path}: {describe_dcp_error(e)}") from None


def stage_state_dict(sd: dict, pin_memory: bool = False) -> dict:
    """A CPU copy of a DCP state dict (the synchronous part of an async save).

    DTensors keep their spec (mesh + placements + global shape) around a CPU copy of the local
    shard, the same thing DCP's own staging does, so the copy is written exactly like the original.
    With ``pin_memory`` (GPU runs) the copies go to pinned buffers with non-blocking transfers and
    one synchronize at the end.
    """
    from torch.distributed.tensor import DTensor

    def copy(t: torch.Tensor) -> torch.Tensor:
        out = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin_memory and t.numel() > 0)
        out.copy_(t.detach(), non_blocking=pin_memory)
        return out

    staged = {}
    for k, v in sd.items():
        if isinstance(v, DTensor):
            staged[k] = DTensor(copy(v.to_local()), v._spec, requires_grad=False)
        elif isinstance(v, torch.Tensor):
            staged[k] = copy(v)
        else:
            staged[k] = v
    if pin_memory and torch.cuda.is_available():
        torch.cuda.synchronize()
    return staged


def load_state(path, model, optimizer, ps: ParallelState, strict: bool = True, load_optimizer: bool = True) -> None:
    """Load into the live model / optimizer at the *current* TP/DP layout.

    ``load_optimizer=False`` loads the weights only (into the fp32 masters too, when the optimizer has them)."""
    meta = read_metadata(path)
    saved = meta.state_dict_metadata
    sd, after_load = _build(model, optimizer, ps, with_optimizer=load_optimizer)
    if not strict:
        sd = {k: v for k, v in sd.items() if k in saved}
    missing = [k for k in sd if k not in saved]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {len(missing)} tensors the model needs (first: {missing[0]}): "
            "it was written for a different model or task")
    for k, v in sd.items():
        want = tuple(v.shape)
        got = tuple(getattr(saved[k], "size", ()))
        if want != got:
            raise CheckpointError(
                f"checkpoint {path} holds {k} with shape {got} but the model needs {want}: "
                "it was written for a different model size (check model=... and model.vocab_size)")
    try:
        with _quiet():
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(path)), no_dist=not dist.is_initialized())
    except BaseException as e:  # truncated / corrupt shard files surface here (as DCP's CheckpointException)
        if not _is_dcp_failure(e):
            raise
        raise CheckpointError(f"could not read checkpoint {path}: {describe_dcp_error(e)} "
                              "(a shard file is truncated, corrupt or missing: resume from another checkpoint)") from None
    # DCP loads in place (plain tensors and DTensor locals alike); copy where it could not.
    masters = _weights_of(optimizer)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in sd.items():
            if k.startswith("model."):
                p = params[k[len("model."):]]
                w = masters.get(p, p)
                if _local(v).data_ptr() != w.data_ptr():
                    w.copy_(_local(v))
    for fn in after_load:
        fn()


def tensor_index(path) -> dict[str, tuple[tuple[int, ...], torch.dtype, int]]:
    """From the metadata only (no tensor reads): DCP key -> (global shape, dtype, number of chunks)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return {k: (tuple(m.size), m.properties.dtype, len(m.chunks))
            for k, m in read_metadata(path).state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}


def read_full_state(path, keys=None) -> dict[str, torch.Tensor]:
    """Single process: tensors of a checkpoint (all, or those in ``keys``) as full CPU tensors."""
    sd = {k: torch.empty(shape, dtype=dtype) for k, (shape, dtype, _) in tensor_index(path).items()
          if keys is None or k in keys}
    try:
        with _quiet():
            dcp.load(sd, storage_reader=SafeFileSystemReader(str(path)), no_dist=True)
    except BaseException as e:
        if not _is_dcp_failure(e):
            raise
        raise CheckpointError(f"could not read checkpoint {path}: {describe_dcp_error(e)} "
                              "(a shard file is truncated, corrupt or missing)") from None
    return sd


def write_full_state(path, tensors: dict[str, torch.Tensor]) -> None:
    """Single process: write full tensors as a DCP checkpoint (loadable at any TP)."""
    with _quiet():
        dcp.save({k: v.contiguous() for k, v in tensors.items()}, checkpoint_id=str(path), no_dist=True)
