"""Attention over retrieved memories as one op family: the memory half, the context half, and the
exact merge of the two.

Method: Extended Mind Transformers (Klett & Ahle 2024, arXiv 2406.02332;
normal-computing/extended-mind-transformers). At every layer, each query token and each query
head retrieves the top-k memory keys by cosine similarity with its own query, and attends to them
jointly with its local context in one softmax; the memory logits are plain ``q.k * scale``, with
keys stored before RoPE and never rotated. kcore computes the two halves on their own, each with
its log-sum-exp -- :func:`memory_attention` (top-k memories) and :func:`context_attention` (the
KV cache) -- and joins them with :func:`merge_attention_states` (FlashInfer's ``merge_state``),
which is exactly the one-softmax result of the anchor (:func:`memory_attention_joint_reference`
computes that directly, as a test reference).

Backends of :func:`memory_attention`: ``"cpu"`` (C++, csrc/core/memory_attention.*),
``"triton"`` (one fused kernel, kernels/memory_attention.py), ``"torch"`` (the reference). Both
native backends share the grouped-query layout of ``_gqa_layout.py``. :func:`memory_attention` and
:func:`merge_attention_states` are registered as torch custom ops (``torch.ops.kcore.*``, with
fake implementations) for ``torch.compile``; eager calls skip the dispatcher.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from kcore.errors import InvalidInputError
from kcore.ops._dispatch import check_tensor, resolve_backend


__all__ = [
    "memory_attention",
    "context_attention",
    "merge_attention_states",
    "normalize_keys",
    "memory_attention_joint_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SUPPORTED = ("cpu", "triton", "torch")
_MERGE_BACKENDS = ("cpu", "torch")
_CONTEXT_BACKENDS = ("cpu", "torch")

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
            The NaN / inf scans read tensor values (a device sync on a GPU) and run in eager mode
            only; under ``torch.compile`` only the metadata is checked.
        BackendUnavailableError: the requested backend cannot run here.

    Registered as the torch custom op ``torch.ops.kcore.memory_attention`` (with a fake
    implementation) for ``torch.compile``; eager calls go straight to the kernels.
    """
    scale = _check_inputs(query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold)
    _check_scales(mem_keys, mem_key_scales, mem_value_scales)
    name = resolve_backend(backend, query.device, supported=_SUPPORTED)
    if mem_keys.shape[1] == 0 or query.numel() == 0:
        return _empty_result(query, min(topk, mem_keys.shape[1]))
    if mem_keys_normed is None:
        mem_keys_normed = normalize_keys(mem_keys)
        # A NaN/inf key would silently win or lose every selection (backends disagree on which).
        if _reads_values() and not bool(torch.isfinite(mem_keys_normed).all()):
            raise InvalidInputError("mem_keys must be finite, got NaN or inf")
    threshold = None if similarity_threshold is None else float(similarity_threshold)
    args = (query, mem_keys, mem_values, mem_keys_normed, mem_key_scales, mem_value_scales, topk, scale, threshold, name)
    if torch.compiler.is_compiling():
        return torch.ops.kcore.memory_attention(*args)
    return _memory_attention_impl(*args)


def _memory_attention_impl(
    query, mem_keys, mem_values, mem_keys_normed, key_scales, value_scales, topk, scale, similarity_threshold, backend
):
    """The op without its checks: arguments already validated (or trusted), ``mem_keys_normed``
    given, ``backend`` a concrete name. Reads no tensor value on the host."""
    if mem_keys.shape[1] == 0 or query.numel() == 0:
        return _empty_result(query, min(topk, mem_keys.shape[1]))
    args = (query, mem_keys, mem_values, mem_keys_normed, topk, scale, similarity_threshold)
    if backend == "cpu":
        from kcore.ops import _memory_attention_cpu

        return _memory_attention_cpu.memory_attention_cpu(*args, key_scales, value_scales)
    if backend == "triton":
        from kcore.kernels.memory_attention import memory_attention_triton

        return memory_attention_triton(*args, key_scales, value_scales)
    return _memory_attention_torch(*args, key_scales=key_scales, value_scales=value_scales)


def normalize_keys(mem_keys: torch.Tensor) -> torch.Tensor:
    """Unit-normalise ``mem_keys`` ``(num_kv_heads, mem_len, head_dim)`` along ``head_dim``
    (computed in float32, returned in the keys' dtype, float32 for int8 keys; zero rows stay
    zero). The per-row scales of an int8 bank do not change the direction and are ignored."""
    k = mem_keys.float()
    out_dtype = torch.float32 if mem_keys.dtype == torch.int8 else mem_keys.dtype
    return (k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(out_dtype)


def merge_attention_states(
    out_a: torch.Tensor,
    lse_a: torch.Tensor,
    out_b: torch.Tensor,
    lse_b: torch.Tensor,
    *,
    backend: str = "auto",
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
        backend: ``"auto"`` (``cpu`` for float32 CPU tensors, else ``torch``), ``"cpu"`` (one C++
            pass over the rows, computed in float32 whatever the inputs' dtype; CPU tensors only)
            or ``"torch"`` (about a dozen elementwise torch ops, any device). When autograd records
            (an input requires grad, grad mode on) the differentiable ``torch`` formula runs
            whatever ``backend`` says.

    Returns:
        ``(out, lse)``: new tensors, ``out`` in ``out_a``'s dtype, ``lse`` float32.

    Raises:
        InvalidInputError: mismatched shapes or devices, or an ``lse`` holding NaN or ``+inf``
            (a value check: one device sync on a GPU).
        BackendUnavailableError: ``backend="cpu"`` for tensors on a GPU.
    """
    name = _check_merge_args(out_a, lse_a, out_b, lse_b, backend)
    if torch.compiler.is_compiling():
        return torch.ops.kcore.merge_attention_states(out_a, lse_a, out_b, lse_b, name)
    return _merge_impl(out_a, lse_a, out_b, lse_b, name)


def _check_merge_args(out_a, lse_a, out_b, lse_b, backend) -> str:
    """Metadata checks of :func:`merge_attention_states`; returns the concrete backend."""
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
    name = resolve_backend(backend, out_a.device, supported=_MERGE_BACKENDS)
    tensors = (out_a, out_b, lse_a, lse_b)
    # The native pass has no backward: with autograd recording, the torch formula is used.
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "torch"
    if backend == "auto" and not all(t.dtype == torch.float32 for t in tensors):
        return "torch"  # auto converts nothing: low-precision inputs take the torch formula
    return name


def _merge_impl(out_a, lse_a, out_b, lse_b, backend):
    """Merge with the NaN / +inf check of ``lse`` (raises InvalidInputError)."""
    out, lse, bad = _merge_unchecked(out_a, lse_a, out_b, lse_b, backend)
    if isinstance(bad, int):
        side = bad
    elif bool(bad.any()):
        la = lse_a.float()
        side = 1 if bool((torch.isnan(la) | (la == math.inf)).any()) else 2
    else:
        side = 0
    if side:
        raise InvalidInputError(f"{('lse_a', 'lse_b')[side - 1]} must be finite or -inf, got NaN or +inf")
    return out, lse


def _merge_unchecked(out_a, lse_a, out_b, lse_b, backend):
    """``(out, lse, bad)`` without reading any value on the host: ``bad`` is ``0`` / ``1`` / ``2``
    from the native pass (1 / 2: lse_a / lse_b held NaN or +inf, nothing computed), or a bool
    tensor on the inputs' device from the torch formula (True: some lse held NaN or +inf)."""
    if backend == "cpu" and out_a.shape[-1] > 0 and out_a.dim() <= 6:
        return _merge_attention_states_cpu(out_a, lse_a, out_b, lse_b)
    return _merge_attention_states_torch(out_a, lse_a, out_b, lse_b)


def _merge_attention_states_cpu(out_a, lse_a, out_b, lse_b):
    """CPU tensors: one native float32 pass (C++), instead of ~20 small torch ops per call (the
    hook merges once per layer and decode step). Other dtypes are converted to float32 and back."""
    from kcore._native import native, tensor_arg

    oa, ob, la, lb = (t.float().contiguous() for t in (out_a, out_b, lse_a, lse_b))
    out = torch.empty_like(oa)
    lse = torch.empty_like(la)
    bad = native().merge_attention_states_f32(
        tensor_arg(oa), tensor_arg(la), tensor_arg(ob), tensor_arg(lb), tensor_arg(out), tensor_arg(lse)
    )
    return out.to(out_a.dtype), lse, bad


def _merge_attention_states_torch(out_a, lse_a, out_b, lse_b):
    la, lb = lse_a.float(), lse_b.float()
    # -inf means "no keys"; NaN or +inf is no log-sum-exp and turns the result into NaN.
    bad = torch.isnan(la) | (la == math.inf) | torch.isnan(lb) | (lb == math.inf)
    m = torch.maximum(la, lb)
    # Where both sides are empty, m = -inf; shifting by 0 keeps exp() at 0 instead of NaN.
    m_safe = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    out = (out_a.float() * (wa * inv).unsqueeze(-1) + out_b.float() * (wb * inv).unsqueeze(-1)).to(out_a.dtype)
    lse = m_safe + torch.log(total)
    return out, lse, bad


def context_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    *,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention over the context (the KV cache) that also returns its log-sum-exp: the context half
    of memory attention, joined to :func:`memory_attention`'s half by :func:`merge_attention_states`.

    Query head ``h`` reads KV head ``h // (num_q_heads // num_kv_heads)`` (grouped-query
    attention); the queries are the last ``q_len`` positions of the ``kv_len`` keys.

    Args:
        query: ``(batch, num_q_heads, q_len, head_dim)`` float32/float16/bfloat16 (after RoPE).
        key, value: ``(batch, num_kv_heads, kv_len, head_dim)``, the query's dtype and device.
        attention_mask: ``None`` (one query: every key; several: causal aligned top-left, as
            SDPA's ``is_causal``) or ``(batch or 1, 1, q_len, kv_len)`` bool (True = attend) or
            additive float, as transformers passes it to attention functions.
        scale: logit scale, default ``1 / sqrt(head_dim)``.
        backend: ``"auto"`` (``cpu`` on CPU, else ``torch``), ``"cpu"`` (PyTorch's fused
            ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns the log-sum-exp;
            the query heads of one KV group are stacked along the query axis, so the KV cache is
            never repeated) or ``"torch"`` (float32 matmul, softmax and matmul; any device).

    Returns:
        ``(out, lse)``: ``out`` ``(batch, num_q_heads, q_len, head_dim)`` in the query's dtype,
        ``lse`` ``(batch, num_q_heads, q_len)`` float32, natural log; rows with no visible key
        give zeros and ``-inf``. New tensors on the query's device.

    Raises:
        InvalidInputError: wrong rank, dtype, device or shape of an argument, a bad ``scale``.
        BackendUnavailableError: ``backend="cpu"`` for tensors on a GPU.
    """
    check_tensor("query", query, ndim=4, dtypes=_FLOAT_DTYPES, dims="(batch, num_q_heads, q_len, head_dim)")
    check_tensor("key", key, ndim=4, dtypes=(query.dtype,), device=query.device, dims="(batch, num_kv_heads, kv_len, head_dim)")
    check_tensor("value", value, ndim=4, dtypes=(query.dtype,), device=query.device, dims="(batch, num_kv_heads, kv_len, head_dim)")
    b, hq, q_len, d = query.shape
    if key.shape != value.shape or key.shape[0] != b or key.shape[3] != d:
        raise InvalidInputError(
            f"key and value must have shape (batch={b}, num_kv_heads, kv_len, head_dim={d}), got "
            f"{tuple(key.shape)} and {tuple(value.shape)}"
        )
    hkv, kv_len = key.shape[1], key.shape[2]
    if hkv < 1 or hq % hkv != 0:
        raise InvalidInputError(f"num_q_heads ({hq}) must be a multiple of key's num_kv_heads ({hkv})")
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, ndim=4, device=query.device, dims="(batch or 1, 1, q_len, kv_len)")
        if attention_mask.shape[0] not in (1, b) or tuple(attention_mask.shape[1:]) != (1, q_len, kv_len):
            raise InvalidInputError(
                f"attention_mask must have shape ({b} or 1, 1, {q_len}, {kv_len}), got {tuple(attention_mask.shape)}"
            )
    scale = _check_scale(scale, d)
    name = resolve_backend(backend, query.device, supported=_CONTEXT_BACKENDS)
    return _context_attention_impl(query, key, value, attention_mask, scale, name)


def _context_attention_impl(query, key, value, attention_mask, scale, backend):
    """:func:`context_attention` without its checks; reads no tensor value on the host."""
    b, hq, q_len, d = query.shape
    hkv, kv_len = key.shape[1], key.shape[2]
    g = hq // hkv
    if attention_mask is None:
        allowed = None
        if q_len > 1:
            # As transformers' sdpa path: no mask and several queries means SDPA's is_causal,
            # aligned top-left (query i sees keys 0..i). transformers passes no mask that way only
            # when the two alignments agree (q_len == kv_len) or for a prefill into an empty static
            # cache, whose unwritten slots must stay out of reach.
            pos = torch.arange(q_len, device=query.device)
            allowed = (torch.arange(kv_len, device=query.device)[None, :] <= pos[:, None]).view(1, 1, q_len, kv_len)
    elif attention_mask.dtype == torch.bool:
        allowed = attention_mask
    else:
        allowed = attention_mask > -math.inf
    if allowed is not None:
        mb = allowed.shape[0]
        if attention_mask is not None and attention_mask.dtype != torch.bool:
            bias = attention_mask.to(query.dtype)
        else:
            bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill_(~allowed, -math.inf)
        # One mask row per stacked (group member, query) row.
        bias = bias.expand(mb, 1, q_len, kv_len).unsqueeze(2).expand(mb, 1, g, q_len, kv_len).reshape(mb, 1, g * q_len, kv_len)
    else:
        bias = None
    qg = query.reshape(b, hkv, g * q_len, d)
    if backend == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qg, key, value, 0.0, False, attn_mask=bias, scale=scale
        )
    else:
        logits = torch.matmul(qg.float(), key.float().transpose(-1, -2)) * scale
        if bias is not None:
            logits = logits + bias.float()
        lse = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))
        out = torch.matmul(p, value.float()).to(query.dtype)
    out = out.reshape(b, hq, q_len, d)
    lse = lse.float().reshape(b, hq, q_len)
    if allowed is not None:
        visible = allowed.any(dim=-1).expand(allowed.shape[0], 1, q_len)  # (batch or 1, 1, q_len)
        lse = lse.masked_fill(~visible, -math.inf)
        out = out.masked_fill(~visible.unsqueeze(-1), 0.0)
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
    if isinstance(topk, bool) or not isinstance(topk, numbers.Integral) or topk < 1:
        raise InvalidInputError(f"topk must be an int >= 1, got {topk!r}")
    scale = _check_scale(scale, d)
    check_similarity_threshold(similarity_threshold)
    # The queries are small next to the memory: checking them is cheap, and a NaN query would
    # otherwise give NaN (torch) or an arbitrary selection (cpu).
    if _reads_values() and not bool(torch.isfinite(query).all()):
        raise InvalidInputError("query must be finite, got NaN or inf")
    return scale


def _reads_values() -> bool:
    """Value checks (NaN / inf scans) run in eager mode; under torch.compile they would break the
    graph (a data-dependent branch), so there only the metadata is checked."""
    return not torch.compiler.is_compiling()


def _check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
        raise InvalidInputError(f"scale must be a finite positive number, got {scale!r}")
    return float(scale)


def check_similarity_threshold(similarity_threshold) -> None:
    """Raise InvalidInputError unless ``similarity_threshold`` is None or a cosine in [-1, 1]."""
    if similarity_threshold is None:
        return
    if (
        isinstance(similarity_threshold, bool)
        or not isinstance(similarity_threshold, numbers.Real)
        or not -1.0 <= similarity_threshold <= 1.0  # False for NaN
    ):
        raise InvalidInputError(f"similarity_threshold must be None or a cosine in [-1, 1], got {similarity_threshold!r}")


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
        if _reads_values() and not bool(torch.isfinite(t).all()):
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


# ----------------------------------------------------------------------------------------------
# torch custom ops (for torch.compile); eager calls go straight to the implementations above.
# ----------------------------------------------------------------------------------------------


@torch.library.custom_op("kcore::memory_attention", mutates_args=())
def _memory_attention_op(
    query: torch.Tensor,
    mem_keys: torch.Tensor,
    mem_values: torch.Tensor,
    mem_keys_normed: torch.Tensor,
    mem_key_scales: Optional[torch.Tensor],
    mem_value_scales: Optional[torch.Tensor],
    topk: int,
    scale: float,
    similarity_threshold: Optional[float],
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _memory_attention_impl(
        query, mem_keys, mem_values, mem_keys_normed, mem_key_scales, mem_value_scales, topk, scale,
        similarity_threshold, backend,
    )


@_memory_attention_op.register_fake
def _(query, mem_keys, mem_values, mem_keys_normed, mem_key_scales, mem_value_scales, topk, scale, similarity_threshold, backend):
    b, h, lq, _ = query.shape
    k_eff = torch.sym_min(topk, mem_keys.shape[1])
    return (
        torch.empty_like(query, memory_format=torch.contiguous_format),
        query.new_empty((b, h, lq), dtype=torch.float32),
        query.new_empty((b, h, lq, k_eff), dtype=torch.int64),
    )


@torch.library.custom_op("kcore::merge_attention_states", mutates_args=())
def _merge_attention_states_op(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor, backend: str
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _merge_impl(out_a, lse_a, out_b, lse_b, backend)


@_merge_attention_states_op.register_fake
def _(out_a, lse_a, out_b, lse_b, backend):
    return torch.empty_like(out_a, memory_format=torch.contiguous_format), lse_a.new_empty(lse_a.shape, dtype=torch.float32)
