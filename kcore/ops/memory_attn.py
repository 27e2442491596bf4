"""Attention over the top-k retrieved keys of a memory bank, and the merge of partial attentions.

Method: Extended Mind Transformers (Klett & Ahle 2024, arXiv 2406.02332;
normal-computing/extended-mind-transformers). At every layer, each query token and each query
head retrieves the top-k memory keys by cosine similarity with its own query, and attends to them
jointly with its local context in one softmax; the memory logits are plain ``q.k * scale``, with
keys stored before RoPE and never rotated. kcore computes the memory part on its own
(:func:`memory_attention`, returning the log-sum-exp) and joins it to the context part with
:func:`merge_attention_states` (FlashInfer's ``merge_state``), which is exactly the one-softmax
result of the anchor (:func:`memory_attention_joint_reference` computes that directly).

Backends of :func:`memory_attention`: ``"cpu"`` (C++, csrc/core/memory_attention.*),
``"triton"`` (one fused kernel, kernels/memory_attention.py), ``"torch"`` (the reference).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from kcore.errors import InvalidInputError
from kcore.ops._dispatch import check_tensor, resolve_backend


def group_queries_by_kv_head(query: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Layout shared by the native backends: ``(batch, num_q_heads, q_len, head_dim)`` ->
    float32 ``(num_kv_heads, batch * group * q_len, head_dim)``, contiguous, so that every query
    reading one KV head is scored in the same pass over that head's keys."""
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

__all__ = ["memory_attention", "merge_attention_states", "memory_attention_joint_reference"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED = ("cpu", "triton", "torch")

# Upper bound on the (query, memory) similarity elements the torch reference materialises at once.
_TORCH_SCORE_CHUNK = 1 << 26


def memory_attention(
    query: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    *,
    topk: int,
    scale: Optional[float] = None,
    mem_keys_normed: Optional[torch.Tensor] = None,
    similarity_threshold: Optional[float] = None,
    mem_key_scales: Optional[torch.Tensor] = None,
    mem_value_scales: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k memory attention for every query token and query head (Extended Mind Transformers).

    For query head ``h`` (KV head ``h // (num_q_heads // num_kv_heads)``, grouped-query
    attention) and query token ``t``: the ``topk`` memory keys with the highest cosine similarity
    to ``query[b, h, t]`` are selected (ranked by ``q . k_normed``; the query's norm does not
    change the ranking), then ``softmax((q . k_i) * scale)`` over those keys weights their values.

    Args:
        query: ``(batch, num_q_heads, q_len, head_dim)``, float32/float16/bfloat16, the queries
            after RoPE, as transformers passes them to attention functions. Any strides.
        mem_keys: ``(num_kv_heads, mem_len, head_dim)``, float32/float16/bfloat16 or int8 (with
            ``mem_key_scales``), one layer's memory keys (before RoPE), shared by the whole batch,
            on the query's device.
        mem_values: ``(num_kv_heads, mem_len, head_dim)``, same dtype as ``mem_keys``.
        topk: number of memories per (query token, query head), ``>= 1``. More than ``mem_len``
            selects all of them (``topk_eff = min(topk, mem_len)``).
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        mem_keys_normed: optional ``(num_kv_heads, mem_len, head_dim)`` unit-norm keys used for
            the selection (a :class:`kcore.attention.MemoryBank` stores them); computed from
            ``mem_keys`` when ``None`` (an extra pass over the keys). Any float dtype, also for
            an int8 bank.
        similarity_threshold: optional cosine similarity below which a selected memory is
            dropped (its logit becomes ``-inf`` and its index ``-1``).
        mem_key_scales, mem_value_scales: ``(num_kv_heads, mem_len)`` float row scales of an int8
            bank (row = int8 row * scale, symmetric per-row quantisation); only the k selected
            rows are dequantised. Required with int8 keys/values, rejected otherwise.
        backend: ``"auto"``, ``"cpu"``, ``"triton"`` or ``"torch"``.

    Returns:
        ``(out, lse, indices)``: ``out`` ``(batch, num_q_heads, q_len, head_dim)`` in the query's
        dtype (zeros where no memory is attended); ``lse`` ``(batch, num_q_heads, q_len)``
        float32, the natural-log log-sum-exp of the scaled logits of the attended memories
        (``-inf`` where none); ``indices`` ``(batch, num_q_heads, q_len, topk_eff)`` int64,
        memory positions sorted by similarity, descending (``-1`` for dropped ones). All new
        tensors on the query's device. With ``mem_len == 0``: zeros, ``-inf`` and an empty last
        dim.

        With an empty query (batch or q_len 0): empty results of those shapes.

    Raises:
        InvalidInputError: wrong rank, dtype, device, head counts or sizes, ``topk < 1``,
            ``head_dim == 0``, NaN/inf in ``query`` or in the int8 row scales, or NaN/inf in
            ``mem_keys`` when ``mem_keys_normed`` is not given (a given ``mem_keys_normed`` and
            its keys are trusted to be finite: checking them would cost a pass over the memory).
        BackendUnavailableError: the requested backend cannot run here.
    """
    scale = _check_inputs(query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold)
    _check_scales(mem_keys, mem_key_scales, mem_value_scales)
    name = resolve_backend(backend, query.device, supported=_SUPPORTED)
    if mem_keys.shape[1] == 0 or query.numel() == 0:
        return _empty_result(query, min(topk, mem_keys.shape[1]))
    if mem_keys_normed is None:
        mem_keys_normed = normalize_keys(mem_keys)
        # A NaN/inf key would silently win or lose every selection (backends disagree on which).
        if not bool(torch.isfinite(mem_keys_normed).all()):
            raise InvalidInputError("mem_keys must be finite, got NaN or inf")
    args = (query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold)
    if name == "cpu":
        from kcore.ops import _memory_attention_cpu

        return _memory_attention_cpu.memory_attention_cpu(*args, mem_key_scales, mem_value_scales)
    if name == "triton":
        from kcore.kernels.memory_attention import memory_attention_triton

        return memory_attention_triton(*args, mem_key_scales, mem_value_scales)
    return _memory_attention_torch(*args, key_scales=mem_key_scales, value_scales=mem_value_scales)


def normalize_keys(mem_keys: torch.Tensor) -> torch.Tensor:
    """Unit-normalise ``mem_keys`` ``(num_kv_heads, mem_len, head_dim)`` along ``head_dim``
    (computed in float32, returned in the keys' dtype, float32 for int8 keys; zero rows stay
    zero). The per-row scales of an int8 bank do not change the direction and are ignored."""
    k = mem_keys.float()
    out_dtype = torch.float32 if mem_keys.dtype == torch.int8 else mem_keys.dtype
    return (k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(out_dtype)


def merge_attention_states(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge two attentions over disjoint key sets into the attention over their union.

    With ``w_x = exp(lse_x - lse)`` and ``lse = log(exp(lse_a) + exp(lse_b))``, the result is
    ``w_a * out_a + w_b * out_b``: exactly one softmax over the concatenated logits (FlashInfer's
    ``merge_state``, natural log). A side with ``lse = -inf`` (no keys) contributes nothing; both
    ``-inf`` give zeros and ``-inf``, never NaN.

    Args:
        out_a, out_b: ``(*batch_dims, head_dim)`` float tensors of the same shape (e.g.
            ``(batch, num_heads, q_len, head_dim)``), each normalised over its own keys.
        lse_a, lse_b: ``(*batch_dims)`` log-sum-exp of each side's scaled logits, any float dtype.

    Returns:
        ``(out, lse)``: new tensors, ``out`` in ``out_a``'s dtype, ``lse`` float32.

    Raises:
        InvalidInputError: mismatched shapes or devices, or an ``lse`` holding NaN or ``+inf``.
    """
    check_tensor("out_a", out_a, dtypes=_FLOAT_DTYPES)
    check_tensor("out_b", out_b, dtypes=_FLOAT_DTYPES, device=out_a.device)
    check_tensor("lse_a", lse_a, dtypes=_FLOAT_DTYPES, device=out_a.device)
    check_tensor("lse_b", lse_b, dtypes=_FLOAT_DTYPES, device=out_a.device)
    if out_a.dim() < 1:
        raise InvalidInputError(f"out_a must have a head_dim axis (*batch_dims, head_dim), got shape {tuple(out_a.shape)}")
    if out_a.shape != out_b.shape:
        raise InvalidInputError(f"out_b must have out_a's shape {tuple(out_a.shape)}, got {tuple(out_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != out_a.shape[:-1]:
            raise InvalidInputError(f"{name} must have shape {tuple(out_a.shape[:-1])}, got {tuple(lse.shape)}")
    tensors = (out_a, out_b, lse_a, lse_b)
    # The native pass has no backward: with autograd recording, the torch formula is used.
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if (
        out_a.device.type == "cpu" and out_a.shape[-1] > 0 and out_a.dim() <= 6 and not needs_grad
        and all(t.dtype == torch.float32 for t in tensors)
    ):
        return _merge_attention_states_cpu(out_a, lse_a, out_b, lse_b)
    return _merge_attention_states_torch(out_a, lse_a, out_b, lse_b)


def _merge_attention_states_cpu(out_a, lse_a, out_b, lse_b):
    """float32 CPU tensors: one native pass (C++), instead of ~20 small torch ops per call (the
    hook merges once per layer and decode step)."""
    from kcore._native import native, tensor_arg

    oa, ob, la, lb = (t.contiguous() for t in (out_a, out_b, lse_a, lse_b))
    out = torch.empty_like(oa)
    lse = torch.empty_like(la)
    bad = native().merge_attention_states_f32(
        tensor_arg(oa), tensor_arg(la), tensor_arg(ob), tensor_arg(lb), tensor_arg(out), tensor_arg(lse)
    )
    if bad:
        raise InvalidInputError(f"{('lse_a', 'lse_b')[bad - 1]} must be finite or -inf, got NaN or +inf")
    return out, lse


def _merge_attention_states_torch(out_a, lse_a, out_b, lse_b):
    la, lb = lse_a.float(), lse_b.float()
    for name, lse in (("lse_a", la), ("lse_b", lb)):
        # -inf means "no keys"; NaN or +inf is no log-sum-exp and would turn the result into NaN.
        if bool((torch.isnan(lse) | (lse == math.inf)).any()):
            raise InvalidInputError(f"{name} must be finite or -inf, got NaN or +inf")
    m = torch.maximum(la, lb)
    # Where both sides are empty, m = -inf; shifting by 0 keeps exp() at 0 instead of NaN.
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    out = (out_a.float() * (wa * inv).unsqueeze(-1) + out_b.float() * (wb * inv).unsqueeze(-1)).to(out_a.dtype)
    lse = m_safe + torch.log(total)
    return out, lse


def memory_attention_joint_reference(
    query: torch.Tensor,
    context_keys: torch.Tensor,
    context_values: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    *,
    topk: int,
    scale: Optional[float] = None,
    attention_mask: Optional[torch.Tensor] = None,
    is_causal: bool = False,
    mem_keys_normed: Optional[torch.Tensor] = None,
    similarity_threshold: Optional[float] = None,
    mem_key_scales: Optional[torch.Tensor] = None,
    mem_value_scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The anchor's semantics in one piece: context and top-k memory logits concatenated, one
    softmax (Extended Mind Transformers). A float32 reference for tests, not a fast path.

    Args:
        query: ``(batch, num_q_heads, q_len, head_dim)``.
        context_keys, context_values: ``(batch, num_kv_heads, ctx_len, head_dim)`` (the layer's
            KV cache after RoPE, as transformers passes it).
        mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold,
        mem_key_scales, mem_value_scales: as in :func:`memory_attention`.
        attention_mask: optional ``(batch, 1 or num_q_heads, q_len, ctx_len)``, bool (True =
            attend) or additive float, over the context only (memories are always visible).
        is_causal: mask context position ``j`` for query ``t`` when
            ``j > t + ctx_len - q_len`` (queries are the last ``q_len`` context positions).

    Returns:
        ``(batch, num_q_heads, q_len, head_dim)`` float32.
    """
    scale = _check_inputs(query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold)
    _check_scales(mem_keys, mem_key_scales, mem_value_scales)
    b, hq, lq, d = query.shape
    hkv = mem_keys.shape[0]
    g = hq // hkv
    q = query.float()
    kc = context_keys.float().repeat_interleave(g, dim=1)
    vc = context_values.float().repeat_interleave(g, dim=1)
    ctx_logits = torch.einsum("bhld,bhsd->bhls", q, kc) * scale
    s = kc.shape[2]
    if is_causal:
        pos_q = torch.arange(lq, device=q.device) + (s - lq)
        ctx_logits = ctx_logits.masked_fill(torch.arange(s, device=q.device)[None, :] > pos_q[:, None], -math.inf)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            ctx_logits = ctx_logits.masked_fill(~attention_mask, -math.inf)
        else:
            ctx_logits = ctx_logits + attention_mask.float()
    if mem_keys.shape[1] == 0:
        mem_logits = ctx_logits.new_empty((b, hq, lq, 0))
        v_sel = ctx_logits.new_empty((b, hq, lq, 0, d))
    else:
        if mem_keys_normed is None:
            mem_keys_normed = normalize_keys(mem_keys)
        idx, mem_logits = _select_and_score(
            q, mem_keys, mem_keys_normed, topk, scale, similarity_threshold, key_scales=mem_key_scales
        )
        v_sel = _gather_rows(mem_values, idx.clamp_min(0), g, row_scales=mem_value_scales)
    logits = torch.cat([ctx_logits, mem_logits], dim=-1)
    p = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhls,bhsd->bhld", p[..., :s], vc) + torch.einsum("bhlk,bhlkd->bhld", p[..., s:], v_sel)


def _check_inputs(query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold) -> float:
    check_tensor("query", query, ndim=4, dtypes=_FLOAT_DTYPES, dims="(batch, num_q_heads, q_len, head_dim)")
    dev = query.device
    check_tensor("mem_keys", mem_keys, ndim=3, dtypes=_FLOAT_DTYPES + (torch.int8,), device=dev, dims="(num_kv_heads, mem_len, head_dim)")
    check_tensor("mem_values", mem_values, ndim=3, dtypes=(mem_keys.dtype,), device=dev, dims="(num_kv_heads, mem_len, head_dim)")
    if mem_values.shape != mem_keys.shape:
        raise InvalidInputError(f"mem_values must have mem_keys' shape {tuple(mem_keys.shape)}, got {tuple(mem_values.shape)}")
    if mem_keys_normed is not None:
        check_tensor("mem_keys_normed", mem_keys_normed, ndim=3, dtypes=_FLOAT_DTYPES, device=dev)
        if mem_keys_normed.shape != mem_keys.shape:
            raise InvalidInputError(
                f"mem_keys_normed must have mem_keys' shape {tuple(mem_keys.shape)}, got {tuple(mem_keys_normed.shape)}"
            )
    hq, d = query.shape[1], query.shape[3]
    hkv = mem_keys.shape[0]
    if hkv < 1 or hq % hkv != 0:
        raise InvalidInputError(f"num_q_heads ({hq}) must be a multiple of mem_keys' num_kv_heads ({hkv})")
    if d < 1:
        raise InvalidInputError(f"head_dim must be >= 1, got query shape {tuple(query.shape)}")
    if mem_keys.shape[2] != d:
        raise InvalidInputError(f"mem_keys' head_dim must equal query's ({d}), got {mem_keys.shape[2]}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise InvalidInputError(f"topk must be an int >= 1, got {topk!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InvalidInputError(f"scale must be a finite positive number, got {scale!r}")
    scale = float(scale)
    if not (math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a finite positive number, got {scale}")
    if similarity_threshold is not None and not (-1.0 <= float(similarity_threshold) <= 1.0):
        raise InvalidInputError(f"similarity_threshold must be in [-1, 1], got {similarity_threshold}")
    # The queries are small next to the memory: checking them is cheap, and a NaN query would
    # otherwise give NaN (torch) or an arbitrary selection (cpu).
    if not bool(torch.isfinite(query).all()):
        raise InvalidInputError("query must be finite, got NaN or inf")
    return scale


def _check_scales(mem_keys, key_scales, value_scales) -> None:
    if mem_keys.dtype != torch.int8:
        if key_scales is not None or value_scales is not None:
            raise InvalidInputError(f"mem_key_scales/mem_value_scales are for int8 banks; mem_keys is {mem_keys.dtype}")
        return
    want = tuple(mem_keys.shape[:2])
    for name, t in (("mem_key_scales", key_scales), ("mem_value_scales", value_scales)):
        if t is None:
            raise InvalidInputError(f"{name} (num_kv_heads, mem_len) is required with int8 mem_keys/mem_values")
        check_tensor(name, t, ndim=2, dtypes=_FLOAT_DTYPES, device=mem_keys.device, dims="(num_kv_heads, mem_len)")
        if tuple(t.shape) != want:
            raise InvalidInputError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise InvalidInputError(f"{name} must be finite, got NaN or inf")


def _empty_result(query: torch.Tensor, k_eff: int = 0):
    b, h, lq, _ = query.shape
    out = torch.zeros_like(query, memory_format=torch.contiguous_format)
    lse = torch.full((b, h, lq), -math.inf, dtype=torch.float32, device=query.device)
    idx = torch.full((b, h, lq, k_eff), -1, dtype=torch.int64, device=query.device)
    return out, lse, idx


def _gather_rows(rows: torch.Tensor, idx: torch.Tensor, group: int, dtype=torch.float32, row_scales=None):
    """rows ``(num_kv_heads, mem_len, head_dim)``, idx ``(batch, num_q_heads, q_len, k)`` ->
    ``(batch, num_q_heads, q_len, k, head_dim)`` in ``dtype``; only the gathered rows are
    converted (and dequantised with ``row_scales`` ``(num_kv_heads, mem_len)`` for int8)."""
    hq = idx.shape[1]
    kv = (torch.arange(hq, device=idx.device) // group).view(1, hq, 1, 1)
    out = rows[kv, idx].to(dtype)
    if row_scales is not None:
        out = out * row_scales[kv, idx].to(dtype).unsqueeze(-1)
    return out


def _select_and_score(
    q, keys, keys_normed, topk, scale, similarity_threshold, compute_dtype=torch.float32, key_scales=None
):
    """Selection and memory logits shared by the torch backend and the joint reference.

    Returns ``indices`` ``(batch, num_q_heads, q_len, k)`` (-1 where dropped) and the scaled
    logits of the selected keys (``-inf`` where dropped), in ``compute_dtype``."""
    b, hq, lq, d = q.shape
    hkv, m, _ = keys.shape
    g = hq // hkv
    k_eff = min(topk, m)
    q = q.to(compute_dtype)
    qg = q.reshape(b, hkv, g, lq, d)
    kn = keys_normed.to(compute_dtype)
    chunk = max(1, _TORCH_SCORE_CHUNK // max(1, b * hq * m))
    sims, idxs = [], []
    for t0 in range(0, lq, chunk):
        s = torch.einsum("bkgld,kmd->bkglm", qg[:, :, :, t0 : t0 + chunk], kn)
        top_s, top_i = s.topk(k_eff, dim=-1, sorted=True)
        sims.append(top_s)
        idxs.append(top_i)
    top_sim = torch.cat(sims, dim=3).reshape(b, hq, lq, k_eff)
    idx = torch.cat(idxs, dim=3).reshape(b, hq, lq, k_eff)
    k_sel = _gather_rows(keys, idx, g, compute_dtype, key_scales)
    logits = (q.unsqueeze(-2) * k_sel).sum(-1) * scale
    if similarity_threshold is not None:
        q_norm = q.float().norm(dim=-1, keepdim=True)
        drop = top_sim.float() < float(similarity_threshold) * q_norm
        logits = logits.masked_fill(drop, -math.inf)
        idx = idx.masked_fill(drop, -1)
    return idx, logits


def _memory_attention_torch(
    query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold, compute_dtype=torch.float32,
    key_scales=None, value_scales=None,
):
    """The reference backend: selection, gather and softmax in plain torch, in ``compute_dtype``
    (float32 by default; tests also run it in the inputs' low precision to size tolerances)."""
    hq = query.shape[1]
    g = hq // mem_keys.shape[0]
    idx, logits = _select_and_score(
        query, mem_keys, mem_keys_normed, topk, scale, similarity_threshold, compute_dtype, key_scales
    )
    lse = torch.logsumexp(logits.float(), dim=-1)
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(logits.float() - lse_safe.unsqueeze(-1)).to(compute_dtype)
    v_sel = _gather_rows(mem_values, idx.clamp_min(0), g, compute_dtype, value_scales)
    out = (p.unsqueeze(-1) * v_sel).sum(-2)
    return out.to(query.dtype), lse, idx
