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
    except ImportError as e:
        if str(e).startswith("kcore._C: "):  # built, but refused this CPU or KCORE_FORCE_ISA: says why
            raise
        raise BackendUnavailableError(  # pragma: no cover - only on a broken install
            f"kcore's native extension kcore._C cannot be imported ({e}); "
            "reinstall kcore (`pip install kcore`, or `pip install .` from a source checkout)"
        ) from e
    return _C


def show_config(mode: str = "stdout"):
    """Print (``mode="stdout"``) or return (``mode="dicts"``) how kcore was built and which CPU
    kernels run here, like ``numpy.show_config()``.

    The CPU kernels (bitmask apply, kNN search and interpolation, memory attention) are compiled
    for several instruction sets; the best one this CPU runs is chosen at import from cpuid
    (``baseline`` = x86-64-v2, ``avx2`` = x86-64-v3, ``avx512`` = x86-64-v4, ``native`` in a
    ``KCORE_NATIVE=ON`` build). ``KCORE_FORCE_ISA=baseline|avx2|avx512`` overrides the choice; a
    variant this build lacks or this CPU cannot run fails the import with an ``ImportError``
    naming the missing CPU features. Returns ``None``, or with ``mode="dicts"`` a dict with keys
    ``kcore``, ``build`` and ``cpu``. Raises ``ValueError`` for another mode.
    """
    if mode not in ("stdout", "dicts"):
        raise ValueError(f"mode must be 'stdout' or 'dicts', got {mode!r}")
    import kcore

    c = native()
    cpu = c.cpu_features()
    info = {
        "kcore": {"version": kcore.__version__, "extension": c.__file__},
        "build": {**c.build_info(), "cuda_compiled": bool(c.cuda_compiled)},
        "cpu": {**cpu, "num_threads": c.num_threads(), "parallel_backend": c.parallel_backend()},
    }
    if mode == "dicts":
        return info
    b = info["build"]
    lines = [
        f"kcore {kcore.__version__}: {c.__file__}",
        f"build: {b['compiler']}, {b['build_type']}, flags outside the kernels '{b['core_flags']}', "
        + (f"CUDA kernels for sm {b['cuda_architectures']}" if b["cuda_compiled"] else "no CUDA kernels"),
        f"CPU: {cpu['cpu_brand'] or 'unknown'} ({cpu['cpu_vendor'] or 'unknown vendor'})",
        f"CPU features: {' '.join(cpu['cpu_features']) or 'none detected'}",
        "kernel variants: " + ", ".join(
            f"{v} ({cpu['variant_flags'][v]}{'' if v in cpu['supported'] else '; not on this CPU'})"
            for v in cpu["variants"]),
        f"kernel variant in use: {cpu['isa']} (chosen by {cpu['chosen_by']})"
        + (f", plus {', '.join(cpu['runtime_extensions'])} at run time" if cpu["runtime_extensions"] else ""),
        f"CPU threads: {info['cpu']['num_threads']} ({info['cpu']['parallel_backend']})",
    ]
    print("\n".join(lines))
    return None


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
