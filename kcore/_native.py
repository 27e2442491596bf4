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


class host_openmp_scope:
    """Context manager: inside it, this thread's CPU kernels run on the process's OpenMP team
    (PyTorch's libgomp threads) instead of kcore's own pool, unless ``KCORE_HOST_OPENMP=0``.

    Why: right after a torch op, torch's OpenMP workers spin-wait on the cores kcore's pool
    threads need (a 100k-token memory-attention step: 82 ms per token in the model vs 52 ms
    alone). kcore's Hugging Face hooks, which run during or right after the model's forward
    pass, where torch has started those workers anyway, open this scope. Outside it kcore does not
    start libgomp's workers itself: torch cannot run in a fork() child of a process that did.
    """

    __slots__ = ("_c",)

    def __enter__(self):
        self._c = native()
        self._c.enter_host_openmp_scope()
        return self

    def __exit__(self, *exc):
        self._c.exit_host_openmp_scope()
        return False
