"""Exception classes of kcore.

Every error kcore raises on bad input or a bad file is one of these, with a message naming the
argument or file, the expected and the actual value. The C++ core raises them too (translated in
``csrc/bindings/module.cpp``).
"""

__all__ = [
    "KcoreError",
    "InvalidInputError",
    "FileFormatError",
    "TokenizerMismatchError",
    "BackendUnavailableError",
]


class KcoreError(Exception):
    """Base class of every kcore error."""


class InvalidInputError(KcoreError, ValueError):
    """An argument has the wrong shape, dtype, device or value (also a ``ValueError``)."""


class FileFormatError(KcoreError, ValueError):
    """A kcore file is truncated, corrupted, of an unknown format version, or not a kcore file."""


class TokenizerMismatchError(KcoreError, ValueError):
    """A file was built for another tokenizer (its fingerprint differs) or another vocab size."""


class BackendUnavailableError(KcoreError, RuntimeError):
    """The requested backend cannot run here (no GPU, no Triton, CUDA code not compiled, ...)."""
