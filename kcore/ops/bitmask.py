"""Token bitmasks for constrained decoding: allocate, build, and apply them to logits in place.

The bitmask format is the one shared by xgrammar, llguidance and outlines-core: an int32 tensor of
shape ``(batch, ceil(vocab / 32))`` where bit ``j % 32`` of word ``j // 32`` is set when token ``j``
is allowed. :func:`apply_token_bitmask_` follows xgrammar's ``apply_token_bitmask_inplace``
(mlc-ai/xgrammar) with one deliberate difference: a bitmask that covers fewer tokens than the logits
is an error, never a silent partial mask.
"""

from __future__ import annotations

import operator
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch.autograd.graph import increment_version

from kcore._native import native, tensor_arg
from kcore.errors import InvalidInputError
from kcore.ops._dispatch import check_tensor, resolve_backend

__all__ = [
    "apply_token_bitmask_",
    "allocate_token_bitmask",
    "bitmask_from_bool",
    "bitmask_to_bool",
]

BACKENDS = ("cpu", "triton", "cuda", "torch")
LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

IndicesLike = Union[torch.Tensor, Sequence[int], None]


def allocate_token_bitmask(batch_size: int, vocab_size: int, *, device: Union[str, torch.device] = "cpu") -> torch.Tensor:
    """Return a bitmask that allows every token.

    Args:
        batch_size: rows (``batch``), >= 0.
        vocab_size: tokens per row (``vocab``), >= 0; use the logits' width (the padded
            embedding size), not the tokenizer's, so padding tokens can be masked.
        device: where to allocate (CPU by default, where masks are usually filled).

    Returns:
        int32 tensor ``(batch, ceil(vocab / 32))`` filled with -1 (all bits set = all allowed).

    Raises:
        InvalidInputError: negative or non-integer sizes.
    """
    for name, v in (("batch_size", batch_size), ("vocab_size", vocab_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InvalidInputError(f"{name} must be an int >= 0, got {v!r}")
    return torch.full((batch_size, (vocab_size + 31) // 32), -1, dtype=torch.int32, device=device)


def bitmask_from_bool(allowed: torch.Tensor) -> torch.Tensor:
    """Pack a boolean mask into the int32 bitmask format.

    Args:
        allowed: bool ``(batch, vocab)``, any device; True = token allowed.

    Returns:
        int32 ``(batch, ceil(vocab / 32))`` on ``allowed``'s device; bits for the padding tokens
        ``vocab .. 32 * ceil(vocab / 32) - 1`` are 0.

    Raises:
        InvalidInputError: ``allowed`` is not a 2-D bool tensor.
    """
    check_tensor("allowed", allowed, ndim=2, dtypes=(torch.bool,), dims="(batch, vocab)")
    batch, vocab = allowed.shape
    words = (vocab + 31) // 32
    padded = torch.zeros((batch, words * 32), dtype=torch.int64, device=allowed.device)
    padded[:, :vocab] = allowed
    weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=allowed.device),
                                       torch.arange(32, device=allowed.device))
    packed = (padded.view(batch, words, 32) * weights).sum(dim=2)  # (batch, words), in [0, 2^32)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Unpack an int32 bitmask ``(batch, words)`` into bool ``(batch, vocab_size)`` (True = allowed).

    Raises:
        InvalidInputError: ``bitmask`` is not 2-D int32 or has fewer than ``ceil(vocab_size / 32)``
            words per row; ``vocab_size`` is not an int >= 0.
    """
    check_tensor("bitmask", bitmask, ndim=2, dtypes=(torch.int32,), dims="(batch, words)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 0:
        raise InvalidInputError(f"vocab_size must be an int >= 0, got {vocab_size!r}")
    if bitmask.shape[1] * 32 < vocab_size:
        raise InvalidInputError(
            f"bitmask must have >= ceil(vocab_size / 32) = {(vocab_size + 31) // 32} words per row, got {bitmask.shape[1]}"
        )
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = torch.bitwise_and(torch.bitwise_right_shift(bitmask.unsqueeze(-1), shifts), 1)
    return bits.reshape(bitmask.shape[0], bitmask.shape[1] * 32)[:, :vocab_size].bool()


def apply_token_bitmask_(
    logits: torch.Tensor,
    bitmask: torch.Tensor,
    *,
    indices: IndicesLike = None,
    backend: str = "auto",
) -> None:
    """Set ``logits[r, j] = -inf`` in place wherever token ``j`` is not allowed by row ``r``'s bitmask.

    The structured-generation masking step of xgrammar / llguidance / outlines-core (method and
    bitmask format from xgrammar, Dong et al. 2024, ``apply_token_bitmask_inplace``).

    Args:
        logits: float32, float16 or bfloat16 ``(batch, vocab)``, CPU or CUDA, modified in place.
            The last dim must be contiguous; rows may be strided (e.g. ``scores[:, :vocab]`` or
            every other row of a bigger tensor).
        bitmask: int32 ``(bitmask_batch, words)`` on ``logits``' device, last dim contiguous, with
            ``words >= ceil(vocab / 32)``. Bit ``j % 32`` of word ``j // 32`` set = token ``j``
            allowed. A wider bitmask (built for a padded vocab) is accepted: bits for tokens
            ``>= vocab`` (``logits.shape[1]``) are ignored. Rows may be strided, stride 0
            included (one mask broadcast with ``bitmask.expand(batch, -1)``).
        indices: optional 1-D int32/int64 tensor (CPU or ``logits``' device), 1-D integer numpy
            array, or sequence of ints (list, tuple, range) ``(num_indices,)``: only these rows are masked, row ``r`` with bitmask row ``r``; other
            rows are untouched. Without it ``bitmask_batch`` must equal ``batch``. Each index must
            be in ``[0, min(batch, bitmask_batch))`` (for indices on a GPU this check reads them
            back: one device sync; pass a list to avoid it). Duplicates are allowed.
        backend: ``"auto"`` (``cuda`` then ``triton`` on GPU, ``cpu`` on CPU), ``"cpu"`` (C++,
            AVX-512 masked stores, threads for large batches), ``"triton"``, ``"cuda"``, or
            ``"torch"`` (plain reference).

    Returns:
        None (``logits`` is modified in place). Allowed logits are left bit-identical; NaN logits
        of masked tokens become -inf.

    Raises:
        InvalidInputError: wrong type, rank, dtype, device, contiguity or shape of ``logits``,
            ``bitmask`` or ``indices``; a bitmask narrower than ``ceil(vocab / 32)``; an index out
            of range; ``logits`` a leaf tensor that requires grad (as for any in-place torch op).
        BackendUnavailableError: the chosen backend cannot run here.

    Registered as the torch custom op ``torch.ops.kcore.apply_token_bitmask_`` (mutating
    ``logits``, with a fake implementation) so it works under ``torch.compile``. In eager mode the
    call goes straight to the kernel, skipping the dispatcher's ~10 us per call. When autograd
    records (``logits.requires_grad`` with grad mode on) the ``torch`` backend runs instead, so the
    gradient of masked logits is 0, as for ``masked_fill_``.
    """
    idx = _check_args(logits, bitmask, indices)
    if idx is not None and idx.numel() == 0:
        return
    if torch.compiler.is_compiling():
        torch.ops.kcore.apply_token_bitmask_(logits, bitmask, idx, backend)
    elif logits.requires_grad and torch.is_grad_enabled():
        # The kernels write through raw pointers, invisible to autograd: masked positions would
        # pass gradient through. The torch reference records a differentiable masked_fill_.
        if logits.is_leaf:
            raise InvalidInputError(
                "logits is a leaf tensor that requires grad: it cannot be masked in place; "
                "pass logits.detach() or a tensor computed from it"
            )
        resolve_backend(backend, logits.device, supported=BACKENDS)  # still reject unknown names
        if idx is not None:
            _check_index_values(idx, logits, bitmask)
        _apply_torch(logits, bitmask, idx)
    else:
        _apply(logits, bitmask, idx, backend)


def _check_args(logits, bitmask, indices: IndicesLike) -> Optional[torch.Tensor]:
    """Checks of everything known without reading tensor values; returns indices as int64 or None."""
    # Cheap predicates first (this runs every decoding step); check_tensor words the error.
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.dtype in LOGITS_DTYPES):
        check_tensor("logits", logits, ndim=2, dtypes=LOGITS_DTYPES, dims="(batch, vocab)")
    if not (
        isinstance(bitmask, torch.Tensor)
        and bitmask.dim() == 2
        and bitmask.dtype == torch.int32
        and bitmask.device == logits.device
    ):
        check_tensor("bitmask", bitmask, ndim=2, dtypes=(torch.int32,), device=logits.device, dims="(batch, ceil(vocab / 32))")
    batch, vocab = logits.shape
    words = (vocab + 31) // 32
    if bitmask.shape[1] < words:
        raise InvalidInputError(
            f"bitmask must have at least ceil(vocab / 32) = {words} words per row for logits of vocab {vocab}, "
            f"got shape {tuple(bitmask.shape)}; a narrower bitmask would leave tokens unmasked"
        )
    if vocab > 1 and logits.stride(1) != 1:
        raise InvalidInputError(f"logits must be contiguous in its last dim (stride 1), got strides {logits.stride()}")
    if bitmask.shape[1] > 1 and bitmask.stride(1) != 1:
        raise InvalidInputError(f"bitmask must be contiguous in its last dim (stride 1), got strides {bitmask.stride()}")
    if batch > 1 and logits.stride(0) < vocab:
        raise InvalidInputError(f"logits rows overlap in memory: row stride {logits.stride(0)} < vocab {vocab}")
    if indices is None:
        if bitmask.shape[0] != batch:
            raise InvalidInputError(
                f"bitmask must have batch = {batch} rows like logits when indices is None, got shape {tuple(bitmask.shape)}"
            )
        return None
    if isinstance(indices, torch.Tensor):
        if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError(
                f"indices must be a 1-D int32/int64 tensor, got dtype {indices.dtype} and shape {tuple(indices.shape)}"
            )
        if indices.device != logits.device and indices.device.type != "cpu":
            raise InvalidInputError(f"indices must be on the CPU or on logits' device {logits.device}, got {indices.device}")
        return indices.to(device=logits.device, dtype=torch.int64).contiguous()
    if isinstance(indices, np.ndarray):
        if indices.ndim != 1 or indices.dtype.kind not in "iu":
            raise InvalidInputError(
                f"indices must be a 1-D integer array, got dtype {indices.dtype} and shape {indices.shape}"
            )
        indices = indices.tolist()
    if isinstance(indices, (list, tuple, range)):
        try:
            if any(isinstance(i, bool) for i in indices):
                raise TypeError
            indices = [operator.index(i) for i in indices]  # ints, numpy ints
        except TypeError:
            raise InvalidInputError(f"indices must be a sequence of ints, got {indices!r}") from None
        limit = min(batch, bitmask.shape[0])
        bad = [i for i in indices if not 0 <= i < limit]
        if bad:
            raise InvalidInputError(f"indices must be in [0, {limit}) (rows of logits and bitmask), got {bad[0]}")
        return torch.tensor(indices, dtype=torch.int64, device=logits.device)
    raise InvalidInputError(f"indices must be None, a 1-D int tensor or a list of ints, got {type(indices).__name__}")


def _check_index_values(idx: torch.Tensor, logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    # Reads the values (a device sync on GPU): an out-of-range row would be a wild memory write.
    limit = min(logits.shape[0], bitmask.shape[0])
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= limit:
        raise InvalidInputError(f"indices must be in [0, {limit}) (rows of logits and bitmask), got {lo if lo < 0 else hi}")


def _apply(logits: torch.Tensor, bitmask: torch.Tensor, idx: Optional[torch.Tensor], backend: str) -> None:
    if logits.is_cpu and (backend == "auto" or backend == "cpu"):
        name = "cpu"  # what resolve_backend answers, without its cost on the per-step path
    else:
        name = resolve_backend(backend, logits.device, supported=BACKENDS)
    if name == "torch":
        if idx is not None:
            _check_index_values(idx, logits, bitmask)
        _apply_torch(logits, bitmask, idx)
        return
    if name == "cpu":
        _apply_native(logits, bitmask, idx, None)  # the C++ side range-checks the indices
    else:
        if idx is not None:
            _check_index_values(idx, logits, bitmask)
        if name == "cuda":
            _apply_native(logits, bitmask, idx, torch.cuda.current_stream(logits.device).cuda_stream)
        else:
            from kcore.kernels.bitmask import apply_token_bitmask_triton

            apply_token_bitmask_triton(logits, bitmask, idx)
    # The kernels write through raw pointers: tell autograd that logits changed, as an in-place
    # torch op would, so a stale saved tensor raises instead of giving a wrong gradient.
    increment_version(logits)


def _apply_native(logits, bitmask, idx, stream) -> None:
    args = (tensor_arg(logits), tensor_arg(bitmask), None if idx is None else tensor_arg(idx))
    if stream is None:
        native().apply_token_bitmask_cpu(*args)
    else:
        native().apply_token_bitmask_cuda(*args, stream)


def _apply_torch(logits: torch.Tensor, bitmask: torch.Tensor, idx: Optional[torch.Tensor]) -> None:
    """Plain torch reference: unpack the bits, then ``masked_fill_``."""
    vocab = logits.shape[1]
    if idx is None:
        logits.masked_fill_(~bitmask_to_bool(bitmask, vocab), float("-inf"))
        return
    rows = logits[idx].masked_fill_(~bitmask_to_bool(bitmask[idx], vocab), float("-inf"))
    logits[idx] = rows


@torch.library.custom_op("kcore::apply_token_bitmask_", mutates_args=("logits",))
def _apply_token_bitmask_op(
    logits: torch.Tensor, bitmask: torch.Tensor, indices: Optional[torch.Tensor], backend: str
) -> None:
    _apply(logits, bitmask, indices, backend)


@_apply_token_bitmask_op.register_fake
def _apply_token_bitmask_fake(logits, bitmask, indices, backend) -> None:
    return None
