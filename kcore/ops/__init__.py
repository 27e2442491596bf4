"""Tensor ops of kcore, one module per op family, each with ``backend="auto"`` dispatch.

Backends: ``"cpu"`` (C++), ``"triton"`` (the top-level ``kernels/`` folder, shipped as
``kcore.kernels``; GPU or ``TRITON_INTERPRET=1``), ``"cuda"`` (csrc/cuda), ``"torch"`` (the plain
reference every test compares against). ``"auto"`` picks the fastest available for the tensor's
device. Backend modules are imported only when chosen.

Op families: ``bitmask`` (token bitmasks), ``knn`` (kNN search, kNN-LM interpolation and mixing),
``memory_attention`` (top-k memory attention, context attention, the merge of the two).
"""

from __future__ import annotations

import importlib

# The memory-attention family's module bears its op's name. Importing it here makes the package
# attribute the op itself: a later `import kcore.ops.memory_attention` would otherwise leave the
# module there. (It imports torch, which every op needs anyway; the backends stay lazy.)
from kcore.ops.memory_attention import context_attention, memory_attention, merge_attention_states  # noqa: E402

_LAZY = {
    "apply_token_bitmask_": "kcore.ops.bitmask",
    "allocate_token_bitmask": "kcore.ops.bitmask",
    "bitmask_from_bool": "kcore.ops.bitmask",
    "bitmask_to_bool": "kcore.ops.bitmask",
    "knn_search": "kcore.ops.knn",
    "knn_interpolate": "kcore.ops.knn",
}

__all__ = [*_LAZY, "memory_attention", "context_attention", "merge_attention_states"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kcore.ops' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
