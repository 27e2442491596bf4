"""kcore: native kernels for knowledge-augmented LLM decoding.

Three capabilities (see README.md):

* fact-constrained decoding: :class:`kcore.FactTrie`, :class:`kcore.FactMatcher`,
  :class:`kcore.hf.FactLogitsProcessor`;
* memory lookup at the output: :mod:`kcore.memory` (kNN-LM datastore, MLP Memory);
* attention over retrieved memories: :mod:`kcore.attention` (memory bank).

Tensor ops live in :mod:`kcore.ops`, Hugging Face integration in :mod:`kcore.hf`. Submodules are
imported lazily so that ``import kcore`` stays light (no transformers, no Triton).
"""

from __future__ import annotations

import importlib

from kcore.errors import (
    BackendUnavailableError,
    FileFormatError,
    InvalidInputError,
    KcoreError,
    TokenizerMismatchError,
)

__version__ = "0.1.0"

_LAZY = {
    "FactTrie": "kcore.trie",
    "FactMatcher": "kcore.matcher",
    "show_config": "kcore._native",
}
_SUBMODULES = ("ops", "hf", "memory", "attention", "kb", "models", "tokenizer")

__all__ = [
    "FactTrie",
    "FactMatcher",
    "show_config",
    "KcoreError",
    "InvalidInputError",
    "FileFormatError",
    "TokenizerMismatchError",
    "BackendUnavailableError",
    *_SUBMODULES,
]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"kcore.{name}")
    raise AttributeError(f"module 'kcore' has no attribute {name!r}")
