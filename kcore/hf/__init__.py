"""Hugging Face ``transformers`` integration: logits processors, hooks, attention registration.

The only part of kcore that imports transformers (lazily, on first use of a name below).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "FactLogitsProcessor": "kcore.hf.facts",
    "prefix_allowed_tokens_fn": "kcore.hf.facts",
    "extract_facts": "kcore.hf.facts",
    "KNNLMLogitsProcessor": "kcore.hf.knnlm",
    "MLPMemoryLogitsProcessor": "kcore.hf.knnlm",
    "enable_memory_attention": "kcore.hf.memory_attention",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kcore.hf' has no attribute {name!r}")
