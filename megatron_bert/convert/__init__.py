"""Checkpoint conversion: Megatron-LM → ours, ours ↔ Hugging Face MegatronBert.

Command line: ``python -m megatron_bert.convert {import-megatron,export-hf,import-hf} SRC OUT``.
Submodules load on first use, so the command line answers quickly (e.g. for a mistyped path).
"""
from __future__ import annotations

import importlib

_EXPORTS = {"ConversionError": "common", "import_megatron": "megatron", "export_hf": "hf", "import_hf": "hf"}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
