"""A small reader / writer for the safetensors format, so conversion needs no extra package.

Layout: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, "__metadata__": {str: str}}``
(offsets relative to the end of the header), then the raw little-endian tensor bytes.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import torch

from .common import ConversionError

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


def _check_host() -> None:
    if sys.byteorder != "little":
        raise ConversionError("safetensors files are little-endian; this converter only runs on little-endian hosts")


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous().reshape(-1)
    if t.dtype == torch.bool:
        t = t.to(torch.uint8)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def save_file(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (any of the dtypes above) to ``path`` atomically."""
    _check_host()
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPES:
            raise ConversionError(f"tensor {name} has dtype {t.dtype}, which safetensors cannot store")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned, as the reference writer does
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            f.write(_raw_bytes(t))
    os.replace(tmp, path)


def load_file(path) -> dict[str, torch.Tensor]:
    """Read every tensor of a safetensors file (CPU, original dtypes)."""
    _check_host()
    path = Path(path)
    data = bytearray(path.stat().st_size)
    with open(path, "rb") as f:
        f.readinto(data)
    bad = f"{path} is not a valid safetensors file"
    if len(data) < 8:
        raise ConversionError(f"{bad} (too short): re-download or re-save it")
    (n,) = struct.unpack("<Q", data[:8])
    if n > min(_MAX_HEADER, len(data) - 8):
        raise ConversionError(f"{bad} (header length {n} is impossible): re-download or re-save it")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ConversionError(f"{bad} (header is not JSON): re-download or re-save it") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{bad} (header is not a JSON object)")
    start = 8 + n
    whole = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    body_len = len(data) - start
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _FROM_NAME[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{bad} (entry {name!r} has an unknown dtype or a malformed description)") from None
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= body_len or end - begin != numel * itemsize:
            raise ConversionError(f"{bad} (entry {name!r} points outside the file or has the wrong size): "
                                  "the file is truncated or corrupt")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = whole[start + begin:start + end]  # a view: the file is held in memory once
        if (start + begin) % itemsize:
            raw = raw.clone()  # unaligned entry (legal, but rare): copy it so it can be reinterpreted
        t = raw.view(torch.uint8 if dtype == torch.bool else dtype)
        out[name] = (t.bool() if dtype == torch.bool else t).reshape(shape)
    return out
