"""``cpu`` backend of :func:`kcore.ops.memory_attention`: the C++ kernel of
csrc/core/memory_attention.cpp (blocked scoring, running top-k, attention over the k)."""

from __future__ import annotations

import torch

from kcore._native import native, tensor_arg
from kcore.ops._gqa_layout import native_inputs, native_outputs


def memory_attention_cpu(
    query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold, key_scales=None, value_scales=None
):
    """Arguments already checked by :func:`kcore.ops.memory_attention` (CPU tensors, mem_len >= 1)."""
    q, keys, values, keys_normed, key_scales, value_scales = native_inputs(
        query, mem_keys, mem_values, mem_keys_normed, key_scales, value_scales
    )
    hkv, nq, d = q.shape
    k_eff = min(topk, mem_keys.shape[1])
    out = torch.empty((hkv, nq, d), dtype=torch.float32)
    lse = torch.empty((hkv, nq), dtype=torch.float32)
    idx = torch.empty((hkv, nq, k_eff), dtype=torch.int64)
    native().memory_attention_forward(
        tensor_arg(q), tensor_arg(keys_normed), tensor_arg(keys), tensor_arg(values),
        None if key_scales is None else tensor_arg(key_scales), None if value_scales is None else tensor_arg(value_scales),
        k_eff, scale, None if similarity_threshold is None else float(similarity_threshold),
        tensor_arg(out), tensor_arg(lse), tensor_arg(idx),
    )
    return native_outputs(query, out, lse, idx)
