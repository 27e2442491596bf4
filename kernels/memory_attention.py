"""Triton kernels of :func:`kcore.ops.memory_attention` (backend ``"triton"``).

Two launches per call:

1. ``_select_kernel``, grid (num_kv_heads, query tiles, memory splits): each program loads the
   queries of one KV-head group (all grouped query heads and query tokens of the tile together),
   streams its share of the normalised keys once, scores them block by block in registers and
   folds each block into a running top-k per query (threshold test, then insertion of the block's
   best entries while any beats the current k-th). Only the k candidates per (query, split) are
   written; the scores never reach global memory.
2. ``_attend_kernel``, one program per query vector: merges the splits' candidates into the
   sorted top-k, applies the similarity threshold, gathers the k raw keys and values, and writes
   the softmax-weighted output, its log-sum-exp and the indices.

Method: Extended Mind Transformers (arXiv 2406.02332) top-k memory attention; split-K reduction as
in flash-decoding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kcore.ops._gqa_layout import native_inputs, native_outputs


@triton.jit
def _select_kernel(
    Q,  # (num_kv_heads, nq, head_dim) float32 contiguous
    KN,  # (num_kv_heads, mem_len, head_dim), row-contiguous
    CAND_V,  # (num_kv_heads, nq, num_splits, K_PAD) float32
    CAND_I,  # (num_kv_heads, nq, num_splits, K_PAD) int32
    nq,
    mem_len,
    keys_per_split,
    num_splits,
    stride_kh,
    stride_km,
    HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    qt = tl.program_id(1)
    sp = tl.program_id(2)
    q_rows = qt * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = q_rows < nq
    cols = tl.arange(0, K_PAD)
    # Unused pad slots hold +inf so the "current worst" (row minimum) never lands on them.
    top_v = tl.where(cols[None, :] < TOPK, float("-inf"), float("inf")) + tl.zeros([BLOCK_Q, K_PAD], tl.float32)
    top_i = tl.full([BLOCK_Q, K_PAD], -1, tl.int32)
    m_start = sp * keys_per_split
    m_end = tl.minimum(mem_len, m_start + keys_per_split)
    n_range = tl.arange(0, BLOCK_N)
    for m0 in range(m_start, m_end, BLOCK_N):
        n = m0 + n_range
        n_ok = n < m_end
        s = tl.zeros([BLOCK_Q, BLOCK_N], tl.float32)
        # (BLOCK_Q, BLOCK_N) scores accumulated over head_dim chunks: few queries per KV head at
        # decode, so a broadcast product beats padding them to a tensor-core tile.
        for d0 in tl.static_range(0, HEAD_DIM, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < HEAD_DIM
            q = tl.load(Q + (h * nq + q_rows[:, None]) * HEAD_DIM + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            k = tl.load(
                KN + h * stride_kh + n[:, None] * stride_km + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
            ).to(tl.float32)
            s += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        s = tl.where(q_ok[:, None] & n_ok[None, :], s, float("-inf"))
        # Insert the block's best entries while any beats its row's current worst; after the first
        # blocks this loop usually runs zero or one time.
        need = tl.max((tl.max(s, axis=1) > tl.min(top_v, axis=1)).to(tl.int32), axis=0)
        while need > 0:
            best = tl.max(s, axis=1)
            best_at = tl.argmax(s, axis=1)
            worst = tl.min(top_v, axis=1)
            worst_at = tl.argmin(top_v, axis=1)
            put = (cols[None, :] == worst_at[:, None]) & (best > worst)[:, None]
            top_v = tl.where(put, best[:, None], top_v)
            top_i = tl.where(put, (m0 + best_at)[:, None].to(tl.int32), top_i)
            s = tl.where(n_range[None, :] == best_at[:, None], float("-inf"), s)
            need = tl.max((tl.max(s, axis=1) > tl.min(top_v, axis=1)).to(tl.int32), axis=0)
    out = ((h * nq + q_rows[:, None]) * num_splits + sp) * K_PAD + cols[None, :]
    tl.store(CAND_V + out, top_v, mask=q_ok[:, None])
    tl.store(CAND_I + out, top_i, mask=q_ok[:, None])


@triton.jit
def _attend_kernel(
    Q,  # (num_kv_heads, nq, head_dim) float32 contiguous
    K,
    V,  # (num_kv_heads, mem_len, head_dim), row-contiguous
    KS,
    VS,  # (num_kv_heads, mem_len) float32 row scales of an int8 bank (unused otherwise)
    CAND_V,
    CAND_I,  # (num_kv_heads, nq, num_splits, K_PAD)
    OUT,  # (num_kv_heads, nq, head_dim) float32
    LSE,  # (num_kv_heads, nq) float32
    IDX,  # (num_kv_heads, nq, TOPK) int64
    nq,
    mem_len,
    num_cand,
    stride_kh,
    stride_km,
    stride_vh,
    stride_vm,
    scale,
    min_cos,
    USE_THRESHOLD: tl.constexpr,
    HAS_SCALES: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TOPK: tl.constexpr,
    K_PAD: tl.constexpr,
    C_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
):
    r = tl.program_id(0)
    h = r // nq
    c = tl.arange(0, C_PAD)
    c_ok = c < num_cand
    cv = tl.load(CAND_V + r * num_cand + c, mask=c_ok, other=float("-inf"))
    ci = tl.load(CAND_I + r * num_cand + c, mask=c_ok, other=-1)
    cv = tl.where(((c % K_PAD) < TOPK) & (ci >= 0), cv, float("-inf"))
    kk = tl.arange(0, K_PAD)
    sel_v = tl.full([K_PAD], float("-inf"), tl.float32)
    sel_i = tl.full([K_PAD], -1, tl.int32)
    for j in tl.static_range(TOPK):  # sorted extraction: j-th best of all splits' candidates
        best = tl.max(cv, axis=0)
        at = tl.argmax(cv, axis=0)
        idx = tl.sum(tl.where(c == at, ci, 0), axis=0)
        sel_v = tl.where(kk == j, best, sel_v)
        sel_i = tl.where(kk == j, tl.where(best > float("-inf"), idx, -1), sel_i)
        cv = tl.where(c == at, float("-inf"), cv)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + r * HEAD_DIM + d, mask=d_ok, other=0.0)
    keep = sel_i >= 0
    if USE_THRESHOLD:
        keep = keep & (sel_v >= min_cos * tl.sqrt(tl.sum(q * q, axis=0)))
    rows = tl.where(keep, sel_i, 0).to(tl.int64)
    kr = tl.load(K + h * stride_kh + rows[:, None] * stride_km + d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
    logits = tl.sum(q[None, :] * kr.to(tl.float32), axis=1) * scale
    if HAS_SCALES:
        logits = logits * tl.load(KS + h * mem_len + rows, mask=keep, other=0.0)
    logits = tl.where(keep, logits, float("-inf"))
    m = tl.max(logits, axis=0)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    p = tl.exp(logits - m_safe)
    total = tl.sum(p, axis=0)
    vr = tl.load(V + h * stride_vh + rows[:, None] * stride_vm + d[None, :], mask=keep[:, None] & d_ok[None, :], other=0.0)
    w = p
    if HAS_SCALES:
        w = w * tl.load(VS + h * mem_len + rows, mask=keep, other=0.0)
    acc = tl.sum(w[:, None] * vr.to(tl.float32), axis=0)
    has = total > 0
    safe_total = tl.where(has, total, 1.0)
    tl.store(OUT + r * HEAD_DIM + d, acc / safe_total, mask=d_ok)
    tl.store(LSE + r, tl.where(has, m_safe + tl.log(safe_total), float("-inf")))
    tl.store(IDX + r * TOPK + kk, tl.where(keep, sel_i, -1).to(tl.int64), mask=kk < TOPK)


def _num_splits(device: torch.device, programs: int, mem_len: int, block_n: int) -> int:
    """Memory splits so that the grid fills the device (about 4 programs per SM) while every
    program still streams at least a few key blocks."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # interpreter: fewer, longer programs run faster
        target = 2
    want = max(1, target // max(1, programs))
    return max(1, min(want, triton.cdiv(mem_len, 4 * block_n)))


def memory_attention_triton(
    query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold, key_scales=None, value_scales=None
):
    """Arguments already checked by :func:`kcore.ops.memory_attention` (mem_len >= 1)."""
    q, keys, values, normed, key_scales, value_scales = native_inputs(
        query, mem_keys, mem_values, mem_keys_normed, key_scales, value_scales
    )
    hkv, nq, d = q.shape
    m = mem_keys.shape[1]
    k_eff = min(topk, m)
    dev = query.device
    has_scales = key_scales is not None
    if not has_scales:  # never read (HAS_SCALES=False); the kernel still needs pointer arguments
        key_scales = value_scales = q

    k_pad = triton.next_power_of_2(k_eff)
    block_q = min(16, triton.next_power_of_2(nq))
    block_d = min(32, triton.next_power_of_2(d))
    block_n = max(16, min(128, 4096 // (block_q * block_d)))  # (BLOCK_Q, BLOCK_N, BLOCK_D) ~ 4k
    q_tiles = triton.cdiv(nq, block_q)
    splits = _num_splits(dev, hkv * q_tiles, m, block_n)
    keys_per_split = triton.cdiv(triton.cdiv(m, splits), block_n) * block_n
    splits = triton.cdiv(m, keys_per_split)
    cand_v = torch.empty((hkv, nq, splits, k_pad), dtype=torch.float32, device=dev)
    cand_i = torch.empty((hkv, nq, splits, k_pad), dtype=torch.int32, device=dev)
    _select_kernel[(hkv, q_tiles, splits)](
        q, normed, cand_v, cand_i, nq, m, keys_per_split, splits, normed.stride(0), normed.stride(1),
        HEAD_DIM=d, TOPK=k_eff, K_PAD=k_pad, BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_D=block_d,
    )
    out = torch.empty((hkv, nq, d), dtype=torch.float32, device=dev)
    lse = torch.empty((hkv, nq), dtype=torch.float32, device=dev)
    idx = torch.empty((hkv, nq, k_eff), dtype=torch.int64, device=dev)
    num_cand = splits * k_pad
    _attend_kernel[(hkv * nq,)](
        q, keys, values, key_scales, value_scales, cand_v, cand_i, out, lse, idx, nq, m, num_cand,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        float(scale), 0.0 if similarity_threshold is None else float(similarity_threshold),
        USE_THRESHOLD=similarity_threshold is not None, HAS_SCALES=has_scales, HEAD_DIM=d, TOPK=k_eff, K_PAD=k_pad,
        C_PAD=triton.next_power_of_2(num_cand), D_PAD=triton.next_power_of_2(d),
    )

    return native_outputs(query, out, lse, idx)

