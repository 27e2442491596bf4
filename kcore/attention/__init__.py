"""Attention over retrieved memories (Extended Mind Transformers semantics): the memory bank."""

from __future__ import annotations

import importlib

_LAZY = {
    "MemoryBank": "kcore.attention.memory_bank",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kcore.attention' has no attribute {name!r}")
