"""Access to the compiled extension ``kcore._C``: the module (with a clear error when it is missing),
the element-type table and the tensor descriptor that every binding takes.

The boundary contract (csrc/bindings/checks.h): a tensor crosses into C++ as the tuple
:func:`tensor_arg` builds, ``(data_ptr, element type code, shape, strides in elements, device)``,
with the codes of ``csrc/core/dtype.h`` (exported as ``kcore._C.elem_types``; :data:`ELEM_TYPES`
is that table keyed by ``torch.dtype``). torch is imported only when a descriptor is first made,
so ``import kcore`` stays light.
"""

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


# torch.dtype -> element type code, built from kcore._C.elem_types on first use (see tensor_arg).
ELEM_TYPES: dict = {}


def _load_elem_types() -> dict:
    import torch

    for name, code in native().elem_types.items():
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype):
            ELEM_TYPES[dtype] = code
    return ELEM_TYPES


def dtype_code(dtype) -> int:
    """The element type code of ``dtype`` (a ``torch.dtype``) in the native contract.

    Raises:
        InvalidInputError: a dtype the native core has no code for.
    """
    codes = ELEM_TYPES or _load_elem_types()
    try:
        return codes[dtype]
    except KeyError:
        from kcore.errors import InvalidInputError

        raise InvalidInputError(f"dtype {dtype} has no native element type (known: {sorted(map(str, codes))})") from None


def tensor_arg(t) -> tuple:
    """The descriptor of tensor ``t`` that the bindings take (``TensorArg`` in
    csrc/bindings/checks.h): ``(data_ptr, dtype code, shape, strides, device)``, strides in
    elements, device ``-1`` for host memory or the CUDA device index. Metadata only: no copy, no
    read of the values, no device sync. The tensor must stay alive for the call."""
    codes = ELEM_TYPES or _load_elem_types()
    return (t.data_ptr(), codes[t.dtype], t.shape, t.stride(), t.get_device())


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
