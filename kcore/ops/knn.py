"""Exact k-nearest-neighbour search and kNN-LM interpolation (Khandelwal et al. 2020, "Generalization
through Memorization: Nearest Neighbor Language Models"; urvashik/knnlm, neulab/knn-transformers).

Two public ops, each with ``backend="auto"|"cpu"|"triton"|"torch"``:

* :func:`knn_search` - exact search of a key matrix (the kNN-LM datastore) with squared-L2 or
  inner-product scores, faiss conventions (``IndexFlatL2`` / ``IndexFlatIP``: ascending squared
  distances / descending inner products, id ``-1`` and distance ``+inf`` (ip: ``-inf``) for
  missing neighbours).
* :func:`knn_interpolate` - mixes the neighbours' distribution into the LM's next-token
  distribution: ``log p = logaddexp(log(1 - lmbda) + log_softmax(lm_logits), log(lmbda) + log p_knn)``.

The ``torch`` backend is the plain reference every test compares against; ``cpu`` is the C++ core
(kcore._C), ``triton`` the kernels in ``kcore.kernels.knn`` (CUDA, or CPU under
``TRITON_INTERPRET=1``). Both ops are also registered as torch custom ops (``torch.ops.kcore.*``,
with fake implementations) so they can be traced by ``torch.compile``; eager calls skip the
dispatcher to keep the per-call overhead low.
"""

from __future__ import annotations

import math
import numbers
from typing import Tuple

import torch

from kcore.errors import InvalidInputError
from kcore.ops._dispatch import check_tensor, resolve_backend

__all__ = ["knn_search", "knn_interpolate"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT_DTYPES = (torch.int32, torch.int64)
_METRICS = ("l2", "ip")
_SEARCH_BACKENDS = ("cpu", "triton", "torch")
_INTERP_BACKENDS = ("cpu", "triton", "torch")

# Keys are converted to fp32 this many rows at a time by the torch reference (bounds its memory).
_TORCH_KEY_BLOCK = 32768


# ----------------------------------------------------------------------------------------------
# knn_search
# ----------------------------------------------------------------------------------------------


def knn_search(
    queries: torch.Tensor,
    keys: torch.Tensor,
    k: int,
    *,
    metric: str = "l2",
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Exact k-nearest-neighbour search of ``queries`` among the rows of ``keys``.

    Args:
        queries: ``(num_queries, dim)`` float32/float16/bfloat16, on the device of ``keys``; must
            be finite.
        keys: ``(num_keys, dim)`` float32/float16/bfloat16 (e.g. ``torch.from_numpy`` of a numpy
            memmap of a datastore). Rows must be contiguous (``keys.stride(1) == 1``) for the
            native backends; assumed finite (not scanned: it may be gigabytes).
        k: number of neighbours per query, an int (Python or numpy) ``>= 1``. ``k > num_keys`` is
            allowed: the missing neighbours get id ``-1`` and distance ``+inf`` (``"ip"``:
            ``-inf``), as in faiss. The outputs take ``12 * num_queries * k`` bytes whatever
            ``num_keys`` is (an impossible allocation raises torch's ``RuntimeError``).
        metric: ``"l2"``: squared Euclidean distance ``||q - x||^2``, ascending (faiss
            ``IndexFlatL2``); ``"ip"``: inner product ``<q, x>``, descending (``IndexFlatIP``).
        backend: ``"auto"`` (``cpu`` for CPU tensors, ``triton`` for CUDA tensors), ``"cpu"``,
            ``"triton"`` or ``"torch"`` (reference).

    Returns:
        ``(dists, ids)``: ``dists`` float32 ``(num_queries, k)``, ``ids`` int64
        ``(num_queries, k)`` (row indices into ``keys``), on the device of ``queries``, best first.
        Scores are float32 (low-precision keys are widened exactly); neighbours at equal
        distance may come back in any order (``cpu`` orders them by id).

    The ``cpu`` backend (C++) streams the keys once, split across threads, with a per-query
    threshold filter and ``nth_element`` top-k. For bfloat16 keys and 4 or more queries on CPUs
    with AVX512-BF16 it scores with ``vdpbf16ps`` from bf16-rounded queries first, keeps every key
    whose rigorous error interval can reach the top k, and re-scores those exactly in float32:
    the result is the exact search's.

    Raises:
        InvalidInputError: wrong rank, dtype, device or dimension; ``k < 1``; unknown metric;
            NaN or inf in ``queries``.
        BackendUnavailableError: the chosen backend cannot run here.
    """
    backend = _check_search_args(queries, keys, k, metric, backend)
    k = int(k)
    if torch.compiler.is_compiling():
        return torch.ops.kcore.knn_search(queries, keys, k, metric, backend)
    return _knn_search_impl(queries, keys, k, metric, backend)


def _check_search_args(queries, keys, k, metric, backend) -> str:
    check_tensor("queries", queries, ndim=2, dtypes=_FLOAT_DTYPES, dims="(num_queries, dim)")
    check_tensor("keys", keys, ndim=2, dtypes=_FLOAT_DTYPES, dims="(num_keys, dim)")
    if queries.device != keys.device:
        raise InvalidInputError(f"queries and keys must be on the same device, got {queries.device} and {keys.device}")
    if queries.shape[1] != keys.shape[1]:
        raise InvalidInputError(
            f"queries and keys must have the same dim, got queries {tuple(queries.shape)} and keys {tuple(keys.shape)}"
        )
    if queries.shape[1] < 1:
        raise InvalidInputError(f"dim must be >= 1, got queries of shape {tuple(queries.shape)}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
    if metric not in _METRICS:
        raise InvalidInputError(f"metric must be one of {_METRICS}, got {metric!r}")
    if queries.numel() and not bool(torch.isfinite(queries).all()):
        raise InvalidInputError("queries must be finite, found NaN or inf")
    return resolve_backend(backend, queries.device, supported=_SEARCH_BACKENDS)


def _knn_search_impl(queries, keys, k, metric, backend):
    if backend == "cpu":
        from kcore.ops import _knn_cpu

        return _knn_cpu.knn_search(queries, keys, k, metric)
    if backend == "triton":
        from kcore.kernels import knn as _knn_triton

        return _knn_triton.knn_search(queries, keys, k, metric)
    return _knn_search_torch(queries, keys, k, metric)


def _pad_value(metric: str) -> float:
    return math.inf if metric == "l2" else -math.inf


def _knn_search_torch(queries: torch.Tensor, keys: torch.Tensor, k: int, metric: str):
    """Reference: float32 ``matmul`` per block of keys, running ``topk`` merged block by block."""
    nq, n = queries.shape[0], keys.shape[0]
    device = queries.device
    largest = metric == "ip"
    best_d = torch.full((nq, 0), _pad_value(metric), dtype=torch.float32, device=device)
    best_i = torch.empty((nq, 0), dtype=torch.int64, device=device)
    q = queries.float()
    q_sq = (q * q).sum(1, keepdim=True) if metric == "l2" else None
    for start in range(0, n, _TORCH_KEY_BLOCK):
        block = keys[start : start + _TORCH_KEY_BLOCK].float()
        scores = q @ block.T  # (num_queries, block)
        if metric == "l2":
            # ||q||^2 - 2<q, x> + ||x||^2, clamped: rounding can make it slightly negative.
            scores = (q_sq - 2.0 * scores + (block * block).sum(1)[None, :]).clamp_min_(0.0)
        ids = torch.arange(start, start + block.shape[0], device=device).expand(nq, -1)
        cat_d = torch.cat([best_d, scores], dim=1)
        cat_i = torch.cat([best_i, ids], dim=1)
        kk = min(k, cat_d.shape[1])
        best_d, pos = torch.topk(cat_d, kk, dim=1, largest=largest, sorted=True)
        best_i = torch.gather(cat_i, 1, pos)
    if best_d.shape[1] < k:
        pad = k - best_d.shape[1]
        best_d = torch.cat([best_d, torch.full((nq, pad), _pad_value(metric), device=device)], dim=1)
        best_i = torch.cat([best_i, torch.full((nq, pad), -1, dtype=torch.int64, device=device)], dim=1)
    return best_d.contiguous(), best_i.contiguous()


# ----------------------------------------------------------------------------------------------
# knn_interpolate
# ----------------------------------------------------------------------------------------------


def knn_interpolate(
    lm_logits: torch.Tensor,
    dists: torch.Tensor,
    values: torch.Tensor,
    *,
    lmbda: float,
    temperature: float,
    metric: str = "l2",
    backend: str = "auto",
) -> torch.Tensor:
    """kNN-LM interpolation of the LM's next-token distribution with the neighbours' distribution.

    ``p_knn(w) = sum_{j: values[j] == w} softmax_j(-dists[j] / temperature)`` over the valid
    neighbours (``"ip"``: ``softmax_j(+dists[j] / temperature)``), and
    ``log p = logaddexp(log(1 - lmbda) + log_softmax(lm_logits), log(lmbda) + log p_knn)``
    (Khandelwal et al. 2020, eq. 2), computed in log space so that it is correct where either side
    is zero: ``lmbda = 0`` gives ``log_softmax(lm_logits)``; ``lmbda = 1`` gives ``log p_knn``
    (``-inf`` for tokens no neighbour has); a row without any valid neighbour gives
    ``log_softmax(lm_logits)``.

    Args:
        lm_logits: ``(batch, vocab)`` float32/float16/bfloat16 next-token logits; ``-inf`` entries
            (masked tokens) are fine, but a row whose LM side is used (``lmbda < 1`` or no valid
            neighbour) needs at least one finite logit and no NaN or ``+inf``.
        dists: ``(batch, k)`` float32 neighbour scores as returned by :func:`knn_search` (squared
            L2 distances for ``"l2"``, inner products for ``"ip"``); must be finite where the
            neighbour is valid.
        values: ``(batch, k)`` int32/int64 token id of each neighbour (the datastore's values);
            ``-1`` marks padding (no neighbour), which is ignored. Valid ids must be ``< vocab``.
        lmbda: interpolation weight of the kNN distribution, in ``[0, 1]``.
        temperature: softmax temperature of the neighbour scores, ``> 0``.
        metric: ``"l2"`` or ``"ip"``, the metric that produced ``dists``.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"`` (reference).

    Returns:
        ``(batch, vocab)`` float32 log-probabilities (a new tensor on the device of ``lm_logits``).
        When autograd records (``lm_logits`` or ``dists`` requires grad, grad mode on) the
        differentiable ``torch`` backend runs whatever ``backend`` says.

    Raises:
        InvalidInputError: wrong rank, dtype, device or shape; ``lmbda`` outside ``[0, 1]``;
            ``temperature <= 0``; a token id ``>= vocab`` or ``< -1``; a non-finite score of a
            valid neighbour; a used ``lm_logits`` row with NaN, ``+inf`` or only ``-inf``
            (``cpu`` and ``torch``; ``triton`` returns NaN there); unknown metric.
        BackendUnavailableError: the chosen backend cannot run here.
    """
    backend = _check_interp_args(lm_logits, dists, values, lmbda, temperature, metric, backend)
    lmbda, temperature = float(lmbda), float(temperature)
    if backend != "torch" and torch.is_grad_enabled() and (lm_logits.requires_grad or dists.requires_grad):
        # The fused kernels are not differentiable: their output would silently drop the
        # gradient. The torch reference is (with respect to lm_logits and dists).
        backend = "torch"
    if torch.compiler.is_compiling():
        return torch.ops.kcore.knn_interpolate(lm_logits, dists, values, lmbda, temperature, metric, backend)
    return _knn_interpolate_impl(lm_logits, dists, values, lmbda, temperature, metric, backend)


def _check_interp_args(lm_logits, dists, values, lmbda, temperature, metric, backend) -> str:
    check_tensor("lm_logits", lm_logits, ndim=2, dtypes=_FLOAT_DTYPES, dims="(batch, vocab)")
    check_tensor("dists", dists, ndim=2, dtypes=(torch.float32,), device=lm_logits.device, dims="(batch, k)")
    check_tensor("values", values, ndim=2, dtypes=_INT_DTYPES, device=lm_logits.device, dims="(batch, k)")
    if dists.shape[0] != lm_logits.shape[0] or values.shape != dists.shape:
        raise InvalidInputError(
            "lm_logits (batch, vocab), dists (batch, k) and values (batch, k) must agree, got "
            f"{tuple(lm_logits.shape)}, {tuple(dists.shape)} and {tuple(values.shape)}"
        )
    if lm_logits.shape[1] < 1:
        raise InvalidInputError(f"lm_logits must have vocab >= 1, got shape {tuple(lm_logits.shape)}")
    # numbers.Real: Python and numpy scalars alike (a tuned lmbda often comes out of numpy).
    if isinstance(lmbda, bool) or not isinstance(lmbda, numbers.Real) or not 0.0 <= lmbda <= 1.0:
        raise InvalidInputError(f"lmbda must be a float in [0, 1], got {lmbda!r}")
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise InvalidInputError(f"temperature must be a finite float > 0, got {temperature!r}")
    if metric not in _METRICS:
        raise InvalidInputError(f"metric must be one of {_METRICS}, got {metric!r}")
    return resolve_backend(backend, lm_logits.device, supported=_INTERP_BACKENDS)


def _check_interp_values(dists: torch.Tensor, values: torch.Tensor, vocab: int) -> None:
    """Value checks the native backends do themselves; the torch/triton paths call this."""
    if values.numel() == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < -1 or hi >= vocab:
        raise InvalidInputError(f"values must be token ids in [0, {vocab}) or -1 (padding), got range [{lo}, {hi}]")
    if not bool((torch.isfinite(dists) | (values < 0)).all()):
        raise InvalidInputError("dists must be finite for every valid neighbour (values >= 0)")


def _knn_interpolate_impl(lm_logits, dists, values, lmbda, temperature, metric, backend):
    if backend == "cpu":
        from kcore.ops import _knn_cpu

        return _knn_cpu.knn_interpolate(lm_logits, dists, values, lmbda, temperature, metric)
    _check_interp_values(dists, values, lm_logits.shape[1])
    if backend == "triton":
        from kcore.kernels import knn as _knn_triton

        return _knn_triton.knn_interpolate(lm_logits, dists, values, lmbda, temperature, metric)
    return _knn_interpolate_torch(lm_logits, dists, values, lmbda, temperature, metric)


def _knn_interpolate_torch(lm_logits, dists, values, lmbda, temperature, metric):
    """Reference in plain torch; the kNN side is an exact per-token logsumexp (a per-token max is
    subtracted first), so a token's kNN log-probability never underflows to ``-inf``."""
    lm_logp = torch.log_softmax(lm_logits.float(), dim=-1)
    batch, vocab = lm_logp.shape
    valid = values >= 0
    has_knn = valid.any(dim=1, keepdim=True)
    lm_used = ~has_knn[:, 0] if lmbda == 1.0 else torch.ones(batch, dtype=torch.bool, device=lm_logp.device)
    bad = lm_used & ~torch.isfinite(torch.logsumexp(lm_logits.float(), dim=-1))
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise InvalidInputError(f"lm_logits row {row} has no finite log-sum-exp (a NaN or +inf logit, or every logit -inf)")
    if lmbda == 0.0 or values.shape[1] == 0:
        return lm_logp
    sign = -1.0 if metric == "l2" else 1.0
    scores = torch.where(valid, dists * (sign / temperature), torch.full_like(dists, -math.inf))
    tok = torch.where(valid, values.long(), torch.zeros_like(values, dtype=torch.long))
    lse_all = torch.logsumexp(scores, dim=-1, keepdim=True)  # (batch, 1); -inf for empty rows
    tok_max = torch.full((batch, vocab), -math.inf, device=lm_logp.device)
    tok_max.scatter_reduce_(1, tok, scores, reduce="amax")
    shift = torch.gather(tok_max, 1, tok)
    contrib = torch.where(valid, torch.exp(scores - torch.where(valid, shift, 0.0)), 0.0)
    tok_sum = torch.zeros((batch, vocab), device=lm_logp.device).scatter_add_(1, tok, contrib)
    knn_logp = torch.log(tok_sum) + tok_max - lse_all  # -inf where no neighbour has the token
    if lmbda == 1.0:
        mixed = knn_logp  # the LM side has weight 0 (its logits are not read: they may be NaN)
    else:
        mixed = torch.logaddexp(lm_logp + math.log1p(-lmbda), knn_logp + math.log(lmbda))
    return torch.where(has_knn, mixed, lm_logp)


# ----------------------------------------------------------------------------------------------
# torch custom ops (for torch.compile); eager calls go straight to the implementations above.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("kcore::knn_search", mutates_args=())
def _knn_search_op(queries: torch.Tensor, keys: torch.Tensor, k: int, metric: str, backend: str) -> Tuple[torch.Tensor, torch.Tensor]:
    return _knn_search_impl(queries, keys, k, metric, backend)


@_knn_search_op.register_fake
def _(queries, keys, k, metric, backend):
    nq = queries.shape[0]
    return (
        queries.new_empty((nq, k), dtype=torch.float32),
        queries.new_empty((nq, k), dtype=torch.int64),
    )


@torch.library.custom_op("kcore::knn_interpolate", mutates_args=())
def _knn_interpolate_op(
    lm_logits: torch.Tensor,
    dists: torch.Tensor,
    values: torch.Tensor,
    lmbda: float,
    temperature: float,
    metric: str,
    backend: str,
) -> torch.Tensor:
    return _knn_interpolate_impl(lm_logits, dists, values, lmbda, temperature, metric, backend)


@_knn_interpolate_op.register_fake
def _(lm_logits, dists, values, lmbda, temperature, metric, backend):
    return lm_logits.new_empty(lm_logits.shape, dtype=torch.float32)
