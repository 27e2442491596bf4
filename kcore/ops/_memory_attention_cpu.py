"""``cpu`` backend of :func:`kcore.ops.memory_attention`: the C++ kernel of
csrc/core/memory_attention.cpp (blocked scoring, running top-k, attention over the k)."""

from __future__ import annotations

import torch

from kcore._native import native, tensor_arg
from kcore.ops.memory_attn import group_queries_by_kv_head, ungroup_by_kv_head


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernel reads (head, row) strides but needs each row's head_dim contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


def memory_attention_cpu(
    query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold, key_scales=None, value_scales=None
):
    """Arguments already checked by :func:`kcore.ops.memory_attention` (CPU tensors, mem_len >= 1)."""
    b, hq, lq, d = query.shape
    hkv, m, _ = mem_keys.shape
    g = hq // hkv
    k_eff = min(topk, m)
    nq = b * g * lq
    # (num_kv_heads, batch * group * q_len, head_dim): the queries of each KV head side by side.
    q = group_queries_by_kv_head(query, hkv)
    keys = _rows_contiguous(mem_keys)
    values = _rows_contiguous(mem_values)
    keys_normed = _rows_contiguous(mem_keys_normed)
    if key_scales is not None:  # int8 bank: (num_kv_heads, mem_len) float32 row scales
        key_scales = key_scales.float().contiguous()
        value_scales = value_scales.float().contiguous()
    out = torch.empty((hkv, nq, d), dtype=torch.float32)
    lse = torch.empty((hkv, nq), dtype=torch.float32)
    idx = torch.empty((hkv, nq, k_eff), dtype=torch.int64)
    native().memory_attention_forward(
        tensor_arg(q), tensor_arg(keys_normed), tensor_arg(keys), tensor_arg(values),
        None if key_scales is None else tensor_arg(key_scales), None if value_scales is None else tensor_arg(value_scales),
        k_eff, scale, None if similarity_threshold is None else float(similarity_threshold),
        tensor_arg(out), tensor_arg(lse), tensor_arg(idx),
    )

    return (ungroup_by_kv_head(out, b, hq, lq).to(query.dtype), ungroup_by_kv_head(lse, b, hq, lq),
            ungroup_by_kv_head(idx, b, hq, lq))
