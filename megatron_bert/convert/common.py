"""Shared pieces of the converters: the error type, head tables, fused-QKV layouts, vocab re-padding."""
from __future__ import annotations

import argparse
import functools
import importlib
import pathlib
import pickle
import re
import shutil
import sys
import types
import warnings
from pathlib import Path

import torch

from ..config import pad_vocab_size


class ConversionError(RuntimeError):
    """A conversion that cannot proceed; the message (one line) says what is wrong and how to fix it."""


_NOTES: list[list[str]] = []


def note(msg: str) -> None:
    """A non-fatal remark for the user: printed (stderr) once the conversion has succeeded, so a
    failing run prints only its one error line."""
    if _NOTES:
        _NOTES[-1].append(msg)
    else:
        print(f"note: {msg}", file=sys.stderr)


def reports_notes(fn):
    """Decorator for a conversion entry point: hold its notes until it returns."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _NOTES.append([])
        try:
            result = fn(*args, **kwargs)
        finally:
            held = _NOTES.pop()
        for msg in held:
            note(msg)
        return result
    return wrapper


WORD_EMB = "bert.embeddings.word_embeddings.weight"
POS_EMB = "bert.embeddings.position_embeddings.weight"
TYPE_EMB = "bert.embeddings.token_type_embeddings.weight"
LM_BIAS = "lm_head.bias"
LAYER_PREFIX = "bert.encoder.layers."

# Per-layer parameter modules (our names), each with .weight and .bias.
LAYER_MODULES = ("input_layernorm", "attention.query_key_value", "attention.dense", "post_attention_layernorm",
                 "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
LM_HEAD_MODULES = ("lm_head.dense", "lm_head.layernorm")

# Which optional parts each head of model/heads.py::HEADS owns.
#   pooler: bert.pooler.dense; lm: lm_head.*; extra: the head's own linear module.
HEAD_PARTS: dict[str, dict] = {
    "model": dict(pooler=True, lm=False, extra=None),
    "pretraining": dict(pooler=True, lm=True, extra="binary_head"),
    "masked_lm": dict(pooler=False, lm=True, extra=None),
    "causal_lm": dict(pooler=False, lm=True, extra=None),
    "next_sentence": dict(pooler=True, lm=False, extra="binary_head"),
    "sequence_classification": dict(pooler=True, lm=False, extra="classifier"),
    "multiple_choice": dict(pooler=True, lm=False, extra="classifier"),
    "token_classification": dict(pooler=False, lm=False, extra="classifier"),
    "question_answering": dict(pooler=False, lm=False, extra="qa_outputs"),
}


def expected_names(head: str, num_layers: int) -> list[str]:
    """Our parameter names for ``head`` (with the ``bert.`` prefix, even for head "model")."""
    if head not in HEAD_PARTS:
        raise ConversionError(f"unknown head {head!r} in checkpoint meta: expected one of {', '.join(HEAD_PARTS)}")
    parts = HEAD_PARTS[head]
    names = [WORD_EMB, POS_EMB, TYPE_EMB]
    for i in range(num_layers):
        names += [f"{LAYER_PREFIX}{i}.{m}.{leaf}" for m in LAYER_MODULES for leaf in ("weight", "bias")]
    names += ["bert.encoder.final_layernorm.weight", "bert.encoder.final_layernorm.bias"]
    if parts["pooler"]:
        names += ["bert.pooler.dense.weight", "bert.pooler.dense.bias"]
    if parts["lm"]:
        names += [LM_BIAS] + [f"{m}.{leaf}" for m in LM_HEAD_MODULES for leaf in ("weight", "bias")]
    if parts["extra"]:
        names += [f"{parts['extra']}.weight", f"{parts['extra']}.bias"]
    return names


def to_prefixed(state: dict, head: str) -> dict:
    """Head "model" (the bare MegatronBertModel) names its parameters without ``bert.``: add it."""
    return {f"bert.{k}": v for k, v in state.items()} if head == "model" else dict(state)


def from_prefixed(state: dict, head: str) -> dict:
    return {k[len("bert."):]: v for k, v in state.items()} if head == "model" else dict(state)


def check_names(state: dict, head: str, num_layers: int, where: str) -> None:
    want = expected_names(head, num_layers)
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in set(want)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({', '.join(missing[:10])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({', '.join(unexpected[:10])})")
        raise ConversionError(f"{where} does not match head {head!r} with {num_layers} layers: {'; '.join(parts)}")


# --------------------------------------------------------------------------- fused QKV
# Rows of a fused [3h, h] QKV weight (or [3h] bias) in one of three orders:
#   "split_first": [3, heads, head_dim]  (Megatron checkpoint_version 0)
#   "head_dim_first": [heads, head_dim, 3]  (Megatron checkpoint_version 1.0)
#   "per_head": [heads, 3, head_dim]  (Megatron >= 2.0, and ours)
QKV_ORDERS = ("split_first", "head_dim_first", "per_head")


def qkv_to_per_head(t: torch.Tensor, heads: int, order: str) -> torch.Tensor:
    """Reorder fused-QKV rows from ``order`` to ours ([heads, 3, head_dim]); ``heads`` = heads in ``t``."""
    rows, rest = t.shape[0], tuple(t.shape[1:])
    if rows % (3 * heads):
        raise ConversionError(f"fused QKV has {rows} rows, not divisible by 3 x {heads} heads: "
                              "the attention head count is wrong (pass --num-attention-heads)")
    hd = rows // (3 * heads)
    if order == "split_first":
        t = t.reshape(3, heads, hd, *rest).transpose(0, 1)
    elif order == "head_dim_first":
        t = t.reshape(heads, hd, 3, *rest).transpose(1, 2)
    elif order != "per_head":
        raise ValueError(order)
    return t.reshape(rows, *rest).contiguous()


def split_qkv(t: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our per-head fused QKV → separate (q, k, v), each [h, ...] with rows ordered (head, head_dim)."""
    rows, rest = t.shape[0], tuple(t.shape[1:])
    per = t.reshape(heads, 3, rows // (3 * heads), *rest)
    return tuple(per[:, j].reshape(rows // 3, *rest).contiguous() for j in range(3))


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    rows, rest = q.shape[0], tuple(q.shape[1:])
    parts = [x.reshape(heads, rows // heads, *rest) for x in (q, k, v)]
    return torch.stack(parts, dim=1).reshape(3 * rows, *rest).contiguous()


# --------------------------------------------------------------------------- vocabulary
VOCAB_ROWS = (WORD_EMB, LM_BIAS)  # tensors whose dim 0 is the (padded) vocabulary


def repad_vocab(state: dict, vocab_size: int, source: str) -> None:
    """Make the vocab-sized tensors exactly our padded size for ``vocab_size`` (zero rows added or
    padding rows dropped), in place. Rows below ``vocab_size`` are never dropped."""
    have = state[WORD_EMB].shape[0]
    want = pad_vocab_size(vocab_size)
    if have < vocab_size:
        raise ConversionError(f"{source} has {have} embedding rows but the vocabulary has {vocab_size} tokens: "
                              "the vocab size / tokenizer does not belong to this checkpoint")
    if have == want:
        return
    for name in VOCAB_ROWS:
        if name not in state:
            continue
        t = state[name]
        if have > want:
            state[name] = t[:want].clone()
        else:
            state[name] = torch.cat([t, t.new_zeros((want - have, *t.shape[1:]))])
    how = f"dropped {have - want} padding rows" if have > want else f"appended {want - have} zero rows"
    note(f"re-padded the vocabulary from {have} to {want} rows (multiple of 128 for {vocab_size} tokens): {how}")


# --------------------------------------------------------------------------- files
TOKENIZER_FILES = ("vocab.txt", "spiece.model", "tokenizer.model", "sentencepiece.model")


def find_tokenizer_file(path) -> Path | None:
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        for name in TOKENIZER_FILES:
            if (p / name).is_file():
                return p / name
        models = sorted(p.glob("*.model"))
        return models[0] if models else None
    return None


def copy_tokenizer(src, out_dir: Path) -> Path | None:
    """Copy a tokenizer file (vocab.txt or a SentencePiece .model) into ``out_dir``; None if absent."""
    f = find_tokenizer_file(src)
    if f is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    dest = out_dir / f.name
    if f.resolve() != dest.resolve():
        shutil.copyfile(f, dest)
    return dest


def prepare_output_root(out, force: bool) -> Path:
    """OUT for an import: refuse to mix the converted model into an existing training run."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {out} exists and is not a directory: choose a new directory")
    if out.is_dir() and not force and (any(out.glob("step_*")) or (out / "latest").exists()):
        raise ConversionError(f"output {out} already holds checkpoints: choose a new directory or pass --force")
    return out


# --------------------------------------------------------------------------- safe torch.load
class MegatronEnumStandIn:
    """Stands in for a Megatron enum member (``megatron.*.enums.X``) found in pickled ``args``:
    only its value is kept; nothing from the original module is imported or run."""

    def __init__(self, value=None):
        self.value = value

    def __repr__(self) -> str:
        return f"<megatron enum value {self.value!r}>"


_NUMPY_ARRAY_GLOBALS = {  # what numpy arrays / scalars in a pickle need (torch's documented recipe)
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
}
_ENUM_RE = re.compile(r"megatron(?:\.\w+)*\.enums\.\w+")
_NUMPY_DTYPE_RE = re.compile(r"numpy\.dtypes\.\w+DType")


def _allowed_global(name: str, label: str):
    """The object to use for pickle global ``name``, or a ConversionError when it is not allowed."""
    plain = {"argparse.Namespace": argparse.Namespace, "types.SimpleNamespace": types.SimpleNamespace,
             "pathlib.PosixPath": pathlib.PosixPath, "pathlib.Path": pathlib.Path}
    if name in plain:
        return plain[name]
    if _ENUM_RE.fullmatch(name):
        return MegatronEnumStandIn
    if name in _NUMPY_ARRAY_GLOBALS or _NUMPY_DTYPE_RE.fullmatch(name):
        module, _, attr = name.rpartition(".")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            pass  # another numpy major version: fall through to the refusal
    raise ConversionError(
        f"{label} refers to the Python object {name}, which is not on the allow-list for checkpoints "
        "(tensors, argparse.Namespace, numpy arrays, Megatron enums): refusing to unpickle it; "
        "re-save the checkpoint with only tensors and plain data")


def _numpy_dtype_classes() -> dict:
    try:
        import numpy.dtypes as npd
    except ImportError:  # numpy < 1.25 has no dtype classes to allow
        return {}
    return {f"numpy.dtypes.{n}": getattr(npd, n) for n in dir(npd) if n.endswith("DType")}


def safe_torch_load(opener, label: str):
    """``torch.load(weights_only=True)`` through an allow-list of extra globals.

    ``opener()`` returns a fresh binary file object (it may be called more than once)."""
    try:
        with opener() as f:
            magic = f.read(4)
    except OSError as e:
        raise ConversionError(f"cannot read {label}: {e.strerror or e}") from None
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch zip format / legacy pickle
        raise ConversionError(f"{label} is not a PyTorch checkpoint (it is neither a torch zip file nor a pickle): "
                              "check the path")
    allowed: dict[str, object] = {}
    try:  # zip-format files: list the globals statically, before unpickling anything
        with opener() as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(f)
        for name in unsafe:
            allowed[name] = _allowed_global(name, label)
    except ConversionError:
        raise
    except Exception:  # legacy format or not a checkpoint at all: found out below
        pass
    for _ in range(16):
        if any(name.startswith("numpy.") for name in allowed):
            allowed.update(_numpy_dtype_classes())  # built while unpickling an array's dtype
        try:
            with torch.serialization.safe_globals([(obj, name) for name, obj in allowed.items()]), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")  # e.g. "pickle protocol 0": our errors say what matters
                with opener() as f:
                    return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            text = str(e)
            m = re.search(r"GLOBAL ([\w.]+)", text)
            if m is not None and m.group(1) not in allowed:
                allowed[m.group(1)] = _allowed_global(m.group(1), label)
                continue
            if "WeightsUnpickler error" in text and "Unsupported operand" not in text:
                reason = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
                reason = reason.split(" Check the documentation")[0][:200]
                raise ConversionError(f"{label} cannot be loaded safely (weights_only): {reason}") from None
            raise ConversionError(f"{label} is not a PyTorch checkpoint (it could not be unpickled): "
                                  "check the path") from None
        except OSError as e:
            raise ConversionError(f"cannot read {label}: {e.strerror or e}") from None
        except (RuntimeError, EOFError, KeyError, ValueError, TypeError, AttributeError, IndexError,
                UnicodeDecodeError) as e:
            raise ConversionError(f"{label} is not a PyTorch checkpoint ({type(e).__name__} while loading it): "
                                  "check the path") from None
    raise ConversionError(f"{label} needs too many extra pickle globals: refusing to unpickle it")
