"""Access to the compiled extension ``kcore._C`` with a clear error when it is missing."""

from __future__ import annotations

import functools

from kcore.errors import BackendUnavailableError


@functools.lru_cache(maxsize=None)
def native():
    """Return the ``kcore._C`` module; raise ``BackendUnavailableError`` if it was not built."""
    try:
        from kcore import _C
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise BackendUnavailableError(
            f"kcore's native extension kcore._C cannot be imported ({e}); "
            "reinstall kcore with `pip install .` from a source checkout"
        ) from e
    return _C


def cuda_compiled() -> bool:
    """True when the extension was built with the CUDA kernels (nvcc was found at build time)."""
    return bool(native().cuda_compiled)
