"""Tensor ops of kcore, one module per op family, each with ``backend="auto"`` dispatch.

Backends: ``"cpu"`` (C++), ``"triton"`` (kernels/, GPU or ``TRITON_INTERPRET=1``), ``"cuda"``
(csrc/cuda), ``"torch"`` (the plain reference every test compares against). ``"auto"`` picks the
fastest available for the tensor's device. Backend modules are imported only when chosen.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "apply_token_bitmask_": "kcore.ops.bitmask",
    "allocate_token_bitmask": "kcore.ops.bitmask",
    "bitmask_from_bool": "kcore.ops.bitmask",
    "bitmask_to_bool": "kcore.ops.bitmask",
    "knn_search": "kcore.ops.knn",
    "knn_interpolate": "kcore.ops.knn",
    "memory_attention": "kcore.ops.memory_attn",
    "merge_attention_states": "kcore.ops.memory_attn",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kcore.ops' has no attribute {name!r}")
