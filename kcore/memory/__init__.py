"""Memory lookup at the output: kNN-LM datastore (Khandelwal et al. 2020) and MLP Memory."""

from __future__ import annotations

import importlib

_LAZY = {
    "Datastore": "kcore.memory.datastore",
    "MLPMemory": "kcore.memory.mlp_memory",
    "train_mlp_memory": "kcore.memory.mlp_memory",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kcore.memory' has no attribute {name!r}")
