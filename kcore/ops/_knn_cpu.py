"""``cpu`` backend of :mod:`kcore.ops.knn`: prepares raw pointers for the C++ kernels in kcore._C
(csrc/core/knn_search.cpp, csrc/core/knn_interpolate.cpp). Arguments are already checked by
``kcore.ops.knn``; this module only fixes layouts (contiguity) and allocates the outputs."""

from __future__ import annotations

import torch

from kcore._native import native, tensor_arg

_METRIC_CODE = {"l2": 0, "ip": 1}


def knn_search(queries: torch.Tensor, keys: torch.Tensor, k: int, metric: str):
    nq, dim = queries.shape
    q = queries.to(torch.float32).contiguous()
    if keys.shape[0] > 0 and keys.stride(1) != 1:
        keys = keys.contiguous()  # the kernel reads whole rows; a column-strided view is copied once
    elif keys.shape[0] > 1 and keys.stride(0) < dim:
        keys = keys.contiguous()  # overlapping rows (e.g. ``expand``): the kernel needs stride >= dim
    dists = torch.empty((nq, k), dtype=torch.float32)
    ids = torch.empty((nq, k), dtype=torch.int64)
    native().knn_search(tensor_arg(q), tensor_arg(keys), k, _METRIC_CODE[metric], tensor_arg(dists), tensor_arg(ids))
    return dists, ids


def knn_interpolate(lm_logits, dists, values, lmbda: float, temperature: float, metric: str):
    batch, vocab = lm_logits.shape
    if lm_logits.stride(1) != 1 or (batch > 1 and lm_logits.stride(0) < vocab):
        lm_logits = lm_logits.contiguous()  # column-strided or overlapping rows (e.g. ``expand``)
    dists = dists.contiguous()
    values = values.contiguous()
    out = torch.empty((batch, vocab), dtype=torch.float32)
    native().knn_interpolate(
        tensor_arg(lm_logits), tensor_arg(dists), tensor_arg(values), lmbda, temperature, _METRIC_CODE[metric],
        tensor_arg(out),
    )
    return out
