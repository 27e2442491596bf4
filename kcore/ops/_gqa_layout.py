"""Grouped-query layout shared by the native backends of :func:`kcore.ops.memory_attention` (the
C++ ``cpu`` backend in ``_memory_attention_cpu.py`` and the Triton kernels in
``kernels/memory_attention.py``). A leaf module: it imports torch only, so both backends and the
op module depend on it and not on each other.

Both backends score every query vector that reads one KV head in the same pass over that head's
keys, so the queries ``(batch, num_q_heads, q_len, head_dim)`` are regrouped as
``(num_kv_heads, batch * group * q_len, head_dim)`` float32 (``group = num_q_heads //
num_kv_heads``, grouped-query attention), and the results are put back afterwards.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch


def group_queries_by_kv_head(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """``(batch, num_q_heads, q_len, head_dim)`` -> float32 ``(num_kv_heads, batch * group * q_len,
    head_dim)``, contiguous: the queries of each KV head side by side."""
    b, hq, lq, d = query.shape
    g = hq // num_kv_heads
    return query.float().reshape(b, num_kv_heads, g, lq, d).permute(1, 0, 2, 3, 4).reshape(num_kv_heads, b * g * lq, d).contiguous()


def ungroup_by_kv_head(t: torch.Tensor, batch: int, num_q_heads: int, q_len: int) -> torch.Tensor:
    """Inverse of :func:`group_queries_by_kv_head` for results ``(num_kv_heads, batch * group *
    q_len, ...)`` -> ``(batch, num_q_heads, q_len, ...)``, contiguous."""
    hkv = t.shape[0]
    g = num_q_heads // hkv
    t = t.reshape(hkv, batch, g, q_len, *t.shape[2:]).permute(1, 0, 2, 3, *range(4, t.dim() + 2))
    return t.reshape(batch, num_q_heads, q_len, *t.shape[4:]).contiguous()


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels read (head, row) strides but need each row's head_dim contiguous.
    return t if t.stride(-1) == 1 else t.contiguous()


def native_inputs(
    query: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    mem_keys_normed: torch.Tensor,
    key_scales: Optional[torch.Tensor],
    value_scales: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, ...]:
    """The prologue of both native backends: ``(q, keys, values, keys_normed, key_scales,
    value_scales)`` with ``q`` grouped by KV head (float32), the memory tensors with contiguous
    rows, and an int8 bank's ``(num_kv_heads, mem_len)`` row scales as contiguous float32."""
    q = group_queries_by_kv_head(query, mem_keys.shape[0])
    if key_scales is not None:
        key_scales = key_scales.float().contiguous()
        value_scales = value_scales.float().contiguous()
    return (q, _rows_contiguous(mem_keys), _rows_contiguous(mem_values), _rows_contiguous(mem_keys_normed),
            key_scales, value_scales)


def native_outputs(query: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor):
    """The epilogue: grouped ``out`` / ``lse`` / ``indices`` back to ``(batch, num_q_heads, q_len,
    ...)``, ``out`` in the query's dtype."""
    b, hq, lq, _ = query.shape
    return (ungroup_by_kv_head(out, b, hq, lq).to(query.dtype), ungroup_by_kv_head(lse, b, hq, lq),
            ungroup_by_kv_head(idx, b, hq, lq))
