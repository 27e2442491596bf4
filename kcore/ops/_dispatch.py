"""Backend choice and argument checks shared by the ops in :mod:`kcore.ops`."""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Iterable, Optional

import torch

from kcore.errors import BackendUnavailableError, InvalidInputError

BACKENDS = ("auto", "cpu", "triton", "cuda", "torch")


@functools.lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors only under ``TRITON_INTERPRET=1``."""
    if not triton_installed():
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


def cuda_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from kcore._native import cuda_compiled

    return cuda_compiled()


def resolve_backend(backend: str, device: torch.device, *, supported: Iterable[str]) -> str:
    """Turn ``backend`` into a concrete backend name for tensors on ``device``.

    ``supported`` lists the backends the op implements. ``"auto"`` picks ``cuda`` then ``triton``
    on a CUDA device, ``cpu`` on a CPU device, else ``torch``.

    Raises:
        InvalidInputError: unknown backend name.
        BackendUnavailableError: the backend cannot run on this device or is not built.
    """
    supported = tuple(supported)
    if backend not in BACKENDS:
        raise InvalidInputError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            order = ("cuda", "triton", "torch")
        elif device.type == "cpu":
            order = ("cpu", "torch")
        else:
            order = ("torch",)
        for name in order:
            if name in supported and _usable(name, device):
                return name
        return "torch"
    if backend not in supported:
        raise BackendUnavailableError(f"backend {backend!r} is not implemented for this op; choose one of {supported}")
    if not _usable(backend, device):
        raise BackendUnavailableError(f"backend {backend!r} cannot run on device {device} here")
    return backend


def _usable(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpu":
        return device.type == "cpu"
    if name == "cuda":
        return cuda_usable(device)
    if name == "triton":
        return triton_usable(device)
    return False


def check_tensor(
    name: str,
    t,
    *,
    ndim: Optional[int] = None,
    dtypes: Optional[Iterable[torch.dtype]] = None,
    device: Optional[torch.device] = None,
    dims: str = "",
) -> torch.Tensor:
    """Raise ``InvalidInputError`` naming ``name`` unless ``t`` is a tensor of the given rank,
    dtype and device. ``dims`` names the expected shape for the message, e.g. ``"(batch, vocab)"``."""
    if not isinstance(t, torch.Tensor):
        raise InvalidInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise InvalidInputError(f"{name} must have {ndim} dims {dims}, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise InvalidInputError(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise InvalidInputError(f"{name} must be on device {device}, got {t.device}")
    return t
