"""Attention over retrieved memories inside any Hugging Face Llama-family model, through
transformers' attention registry (no model code copied).

Method: Extended Mind Transformers (Klett & Ahle 2024, arXiv 2406.02332). In every chosen layer,
each query token and query head retrieves the top-k keys of a :class:`kcore.attention.MemoryBank`
by cosine similarity and attends to them jointly with its local context in one softmax. kcore
computes the two parts separately -- the context by a fused attention that also returns its
log-sum-exp, the memory by :func:`kcore.ops.memory_attention` -- and joins them exactly with
:func:`kcore.ops.merge_attention_states` (FlashInfer's ``merge_state``).

Memory keys are used as stored (before RoPE) and never rotated (``rope="none"``, the anchor's
default), so a memory has no position relative to the query.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Dict, List, Optional, Sequence

import torch

from kcore._native import host_openmp_scope
from kcore.errors import InvalidInputError

__all__ = ["enable_memory_attention", "MemoryAttentionHandle", "Citation"]

_ROPE_MODES = ("none",)
_names = itertools.count()
# Registered attention functions find their handle here by name, so that a disabled handle (and
# its bank) is not kept alive by transformers' global registry.
_ACTIVE: Dict[str, "MemoryAttentionHandle"] = {}


@dataclasses.dataclass(frozen=True)
class Citation:
    """One memory span a generated token drew on.

    Attributes:
        document: index of the memory document.
        start, end: character span in that document (the cited token, widened by
            ``context_tokens`` memory tokens on each side within the document).
        text: ``documents[document][start:end]``.
        weight: the attention probability mass on the cited token, averaged over the memory
            layers and query heads (joint softmax over context and memories; in ``[0, 1]``).
        index: the memory token's position in the bank.
    """

    document: int
    start: int
    end: int
    text: str
    weight: float
    index: int


class MemoryAttentionHandle:
    """Returned by :func:`enable_memory_attention`: records citations, restores the model.

    Attributes:
        name: the attention implementation name registered with transformers.
        topk, layers, similarity_threshold, backend: the settings in force.
    """

    def __init__(self, model, bank, *, topk, layers, similarity_threshold, backend, record_citations):
        self.model = model
        self.bank = bank
        self.topk = topk
        self.layers = layers
        self.similarity_threshold = similarity_threshold
        self.backend = backend
        self.record_citations = record_citations
        self.name = f"kcore_memory_{next(_names)}"
        self._first_layer = min(layers)
        self._previous = model.config._attn_implementation
        self._cache: Dict[tuple, tuple] = {}
        # steps[i][layer] = (indices (batch, num_q_heads, k), query (batch, num_q_heads, head_dim),
        # joint lse (batch, num_q_heads), scale) at the last query position of forward call i (the
        # one that predicts generated token i). The attention weights are computed from these only
        # when citations() is called: doing it at every layer and step cost ~3 ms per token.
        self._steps: List[Dict[int, tuple]] = []
        self._batch = 0
        self.enabled = True

    # -------------------------------------------------------------- public

    def citations(self, *, top: int = 3, context_tokens: int = 0, skip_leading: int = 0) -> List[List[List[Citation]]]:
        """Per batch row, per forward step (one per generated token in ``generate()``), the
        ``top`` most attended memory tokens, most attended first, mapped to their documents.

        Steps are counted since the last prefill (a forward pass whose queries cover the whole
        sequence), so after ``generate()`` step ``i`` is the step that chose new token ``i``.

        Args:
            top: memory tokens per step, ``>= 1``.
            context_tokens: widen each cited span by this many memory tokens on each side
                (within the same document) for readability.
            skip_leading: leave out the first tokens of each document. A document's first token
                has no left context and acts as an attention sink (Xiao et al. 2023,
                StreamingLLM): it draws attention whatever the query, so it cites nothing.

        Returns:
            ``citations[row][step]``: a list of :class:`Citation` (empty lists if the bank is
            empty). Rows are the model's batch rows at each step: with beam search or
            ``num_return_sequences`` that is ``batch * beams`` rows, and beam search reorders them
            between steps, so a row's steps need not follow one hypothesis.
        """
        if top < 1 or context_tokens < 0 or skip_leading < 0:
            raise InvalidInputError(
                f"top must be >= 1, context_tokens and skip_leading >= 0, got {top}, {context_tokens}, {skip_leading}"
            )
        if not self._steps:
            return []
        bank = self.bank
        batch = self._batch
        result: List[List[List[Citation]]] = [[] for _ in range(batch)]
        keys: Dict[int, torch.Tensor] = {}  # per layer, fetched once per call (int8: dequantised once)
        for step in self._steps:
            weighted = {}
            for layer, (i, q, lse, scale) in step.items():
                if layer not in keys:
                    keys[layer] = bank.keys(layer).to(q.device)
                weighted[layer] = (i, self._weights(q, keys[layer], i, lse, scale))
            for row in range(batch):
                result[row].append(self._step_citations(weighted, row, top, context_tokens, skip_leading) if bank.mem_len else [])
        return result

    def reset(self) -> None:
        """Forget the recorded steps (done automatically at every prefill)."""
        self._steps = []

    def disable(self) -> None:
        """Restore the model's previous attention implementation and unregister this one."""
        if not self.enabled:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        self.model.set_attn_implementation(self._previous)
        _ACTIVE.pop(self.name, None)
        # transformers has no unregister: drop the names from its global maps directly.
        AttentionInterface._global_mapping.pop(self.name, None)
        AttentionMaskInterface._global_mapping.pop(self.name, None)
        self._cache.clear()
        self.enabled = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.disable()

    # -------------------------------------------------------------- internals

    def _memory(self, layer: int, device: torch.device):
        """(keys, values, keys_normed, key_scales, value_scales) of ``layer`` on ``device``,
        prepared once. An int8 bank stays int8 (scales given; the op dequantises only the k
        selected rows), so it holds 4 bytes per element with the normalised keys, not 6."""
        key = (layer, device)
        if key not in self._cache:
            b = self.bank
            if b.quantization == "int8":
                parts = b.quantized(layer) + (b.keys_normed(layer),)
                k8, v8, ks, vs, kn = (t.to(device) for t in parts)
                self._cache[key] = (k8, v8, kn, ks, vs)
            else:
                self._cache[key] = tuple(t.to(device) for t in (b.keys(layer), b.values(layer), b.keys_normed(layer))) + (None, None)
        return self._cache[key]

    def _leading_mask(self, skip_leading: int) -> torch.Tensor:
        """(mem_len,) bool: True for the first ``skip_leading`` tokens of each document."""
        doc = self.bank.token_map[:, 0]
        starts = torch.ones_like(doc, dtype=torch.bool)
        starts[1:] = doc[1:] != doc[:-1]
        start_pos = torch.cummax(torch.where(starts, torch.arange(len(doc)), torch.zeros_like(doc)), dim=0).values
        return (torch.arange(len(doc)) - start_pos) < skip_leading

    def _step_citations(self, step, row, top, context_tokens, skip_leading) -> List[Citation]:
        bank = self.bank
        idx = torch.cat([step[l][0][row].reshape(-1) for l in step]).cpu()
        w = torch.cat([step[l][1][row].reshape(-1) for l in step]).float().cpu()
        keep = idx >= 0
        idx, w = idx[keep], w[keep]
        if idx.numel() == 0:
            return []
        num_heads = step[next(iter(step))][0].shape[1]
        score = torch.zeros(bank.mem_len, dtype=torch.float32).index_add_(0, idx, w) / (len(step) * num_heads)
        if skip_leading:
            score.masked_fill_(self._leading_mask(skip_leading), 0.0)
        n = min(top, int((score > 0).sum()))
        vals, order = score.topk(n)
        out = []
        for v, i in zip(vals.tolist(), order.tolist()):
            d, s, e = (int(x) for x in bank.token_map[i])
            lo, hi = i, i
            for _ in range(context_tokens):
                if lo > 0 and int(bank.token_map[lo - 1, 0]) == d:
                    lo -= 1
                if hi + 1 < bank.mem_len and int(bank.token_map[hi + 1, 0]) == d:
                    hi += 1
            s, e = int(bank.token_map[lo, 1]), int(bank.token_map[hi, 2])
            text = bank.documents[d][s:e] if d < len(bank.documents) else ""
            out.append(Citation(document=d, start=s, end=e, text=text, weight=v, index=i))
        return out

    def attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """The function registered with transformers' ``AttentionInterface``.

        query ``(batch, num_q_heads, q_len, head_dim)`` after RoPE; key / value
        ``(batch, num_kv_heads, kv_len, head_dim)`` (the whole cache); attention_mask ``None`` or
        ``(batch, 1, q_len, >= kv_len)`` bool (True = attend) or additive float. Returns
        ``(out (batch, q_len, num_q_heads, head_dim), None)``. Inference only (no dropout).
        """
        with host_openmp_scope():
            return self._attention(module, query, key, value, attention_mask, scaling)

    def _attention(self, module, query, key, value, attention_mask, scaling):
        from kcore.ops.memory_attention import context_attention, memory_attention, merge_attention_states

        layer = int(module.layer_idx)
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q_len, kv_len = query.shape[2], key.shape[2]
        if attention_mask is not None and attention_mask.shape[-1] > kv_len:
            attention_mask = attention_mask[..., :kv_len]
        out_c, lse_c = context_attention(query, key, value, attention_mask, scale)
        if layer not in self.layers:
            return out_c.transpose(1, 2).contiguous(), None
        if layer == self._first_layer and self.record_citations:
            if _is_prefill(q_len, kv_len, attention_mask):
                self._steps = []
            self._steps.append({})
            self._batch = query.shape[0]
        mk, mv, mkn, k_scales, v_scales = self._memory(layer, query.device)
        out_m, lse_m, idx = memory_attention(
            query, mk, mv, topk=self.topk, scale=scale, mem_keys_normed=mkn,
            similarity_threshold=self.similarity_threshold, mem_key_scales=k_scales, mem_value_scales=v_scales,
            backend=self.backend,
        )
        out, lse = merge_attention_states(out_c, lse_c, out_m, lse_m)
        if self.record_citations and self._steps and idx.shape[-1] > 0:
            # Copies of the last position only (views would keep the whole prefill alive).
            self._steps[-1][layer] = (idx[:, :, -1].clone(), query[:, :, -1].clone(), lse[:, :, -1].clone(), scale)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _weights(q, mem_keys, i, lse, scale):
        """Joint-softmax probabilities ``(batch, num_q_heads, k)`` of the selected memories ``i``
        for queries ``q`` ``(batch, num_q_heads, head_dim)`` with joint log-sum-exp ``lse``."""
        q = q.float()
        hq, hkv = q.shape[1], mem_keys.shape[0]
        kv_head = (torch.arange(hq, device=q.device) // (hq // hkv)).view(1, hq, 1)
        k_sel = mem_keys[kv_head, i.clamp_min(0)].float()  # (batch, num_q_heads, k, head_dim)
        logits = (k_sel * q.unsqueeze(2)).sum(-1) * scale
        return torch.exp(logits - lse.float().unsqueeze(-1)).masked_fill(i < 0, 0.0)


def _is_prefill(q_len: int, kv_len: int, attention_mask) -> bool:
    """True for a forward call that starts a sequence (``generate()``'s prefill): the queries see
    only themselves. With a dynamic cache that is ``q_len == kv_len``; a static cache is longer
    than what is written, so there the mask tells: the last query sees at most ``q_len`` keys."""
    if q_len == kv_len:
        return True
    if q_len == 1:
        return False
    if attention_mask is None:  # several queries and no mask: a prefill into an empty static cache
        return True
    last = attention_mask[:, :, -1, :kv_len]
    allowed = last if last.dtype == torch.bool else last > -math.inf
    return int(allowed.sum(dim=-1).max()) <= q_len


def enable_memory_attention(
    model,
    bank,
    *,
    topk: int = 10,
    layers: Optional[Sequence[int]] = None,
    rope: str = "none",
    similarity_threshold: Optional[float] = None,
    backend: str = "auto",
    record_citations: bool = True,
) -> MemoryAttentionHandle:
    """Give ``model`` a memory: every chosen layer attends to the top-k memories of ``bank``.

    Registers an attention function with ``transformers.AttentionInterface`` and ``sdpa_mask``
    under the same name with ``AttentionMaskInterface`` (without it the padding mask would be
    dropped), then switches the model to it with ``model.set_attn_implementation``. Works with
    ``generate()`` (greedy, sampling, left-padded batches) and plain forward calls; inference only.

    Args:
        model: a Hugging Face Llama-family causal LM (the one ``bank`` was built with).
        bank: a :class:`kcore.attention.MemoryBank` (may be empty: the model is then unchanged).
        topk: memories per query token and query head, ``>= 1`` (anchor default 10; 2-12 used).
        layers: layers that use the memory (default: every layer of the bank); the others run
            plain attention.
        rope: how memory keys meet RoPE; only ``"none"`` (never rotated, the anchor's default).
        similarity_threshold: optional cosine similarity below which a selected memory is dropped.
        backend: backend of :func:`kcore.ops.memory_attention`.
        record_citations: keep, per step, the chosen memories and their weights for
            :meth:`MemoryAttentionHandle.citations` (a small cost per layer and step).

    Returns:
        A :class:`MemoryAttentionHandle`; call ``handle.disable()`` (or use it as a context
        manager) to restore the model's previous attention implementation.

    Raises:
        InvalidInputError: the bank does not fit the model (KV heads, head dim, layers), bad
            ``topk``, ``rope``, ``layers`` or ``backend``, or memory attention already enabled on
            this model (one handle at a time: disable it first).
        BackendUnavailableError: ``backend`` cannot run on the model's device.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from kcore.attention.memory_bank import _model_shape, attention_modules

    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise InvalidInputError(f"topk must be an int >= 1, got {topk!r}")
    if rope not in _ROPE_MODES:
        raise InvalidInputError(f"rope must be one of {_ROPE_MODES}, got {rope!r}")
    if similarity_threshold is not None and not -1.0 <= float(similarity_threshold) <= 1.0:
        raise InvalidInputError(f"similarity_threshold must be in [-1, 1], got {similarity_threshold}")
    current = getattr(model.config, "_attn_implementation", None)
    if current in _ACTIVE:
        raise InvalidInputError(
            f"memory attention is already enabled on this model ({current}); call that handle's disable() first"
        )
    from kcore.ops._dispatch import resolve_backend
    from kcore.ops.memory_attention import _SUPPORTED

    resolve_backend(backend, next(model.parameters()).device, supported=_SUPPORTED)  # fail now, not mid-generate
    modules = attention_modules(model)
    _, num_kv, head_dim = _model_shape(model)
    if (bank.num_kv_heads, bank.head_dim) != (num_kv, head_dim):
        raise InvalidInputError(
            f"bank has {bank.num_kv_heads} KV heads of dim {bank.head_dim}; the model has {num_kv} of dim {head_dim}"
        )
    layers = list(bank.layers) if layers is None else sorted(set(int(l) for l in layers))
    bad = [l for l in layers if l not in bank.layers or l not in modules]
    if not layers or bad:
        raise InvalidInputError(f"layers must be a non-empty subset of the bank's layers {bank.layers}, got {layers}")

    handle = MemoryAttentionHandle(
        model, bank, topk=topk, layers=frozenset(layers), similarity_threshold=similarity_threshold,
        backend=backend, record_citations=record_citations,
    )
    name = handle.name
    _ACTIVE[name] = handle

    def attention(module, query, key, value, attention_mask, **kwargs):
        return _ACTIVE[name].attention(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        handle.disable()
        raise InvalidInputError(f"model {type(model).__name__} does not accept a custom attention implementation")
    return handle
