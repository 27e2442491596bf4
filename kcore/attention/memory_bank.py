"""A memory bank of keys and values precomputed by the model itself, for attention over retrieved
memories.

Method: Extended Mind Transformers (Klett & Ahle 2024, arXiv 2406.02332;
normal-computing/extended-mind-transformers). The model reads the memory documents once, in
overlapping windows so that every memory token keeps left context, and each attention layer keeps
every memory token's key *before* RoPE and its value. At generation time each layer retrieves, with
its own queries, the top-k of these keys by cosine similarity (:func:`kcore.ops.memory_attention`,
hooked in by :func:`kcore.hf.enable_memory_attention`).

The keys and values are read from the outputs of each attention layer's ``k_proj`` / ``v_proj``
with forward hooks, so any Hugging Face Llama-family model works without copying model code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import numbers
import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from kcore.errors import FileFormatError, InvalidInputError, TokenizerMismatchError

__all__ = ["MemoryBank", "MemorySpan"]

FORMAT_NAME = "kcore.memory_bank"
FORMAT_VERSION = 1
_QUANTIZATIONS = (None, "int8")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class MemorySpan:
    """Where a memory token comes from: ``documents[document][start:end]`` (character offsets)."""

    document: int
    start: int
    end: int


def attention_modules(model) -> Dict[int, torch.nn.Module]:
    """The self-attention modules of a Hugging Face decoder, by ``layer_idx``.

    Every module with a ``layer_idx`` and ``k_proj`` / ``v_proj`` linear children counts (Llama,
    Mistral, Qwen2, SmolLM, ... all name them so).

    Raises:
        InvalidInputError: the model has no such module.
    """
    found = {}
    for module in model.modules():
        idx = getattr(module, "layer_idx", None)
        if idx is not None and hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            found[int(idx)] = module
    if not found:
        raise InvalidInputError(
            f"model {type(model).__name__} has no attention modules with layer_idx, k_proj and v_proj "
            "(kcore supports Hugging Face Llama-family models)"
        )
    return dict(sorted(found.items()))


def _model_shape(model) -> Tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) from the model's config."""
    cfg = model.config
    num_kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(cfg.num_hidden_layers), int(num_kv), int(head_dim)


def _resolve_layers(modules: Dict[int, torch.nn.Module], layers: Optional[Iterable[int]]) -> List[int]:
    """``layers`` sorted and deduplicated (default: every attention layer), checked against
    ``modules`` (:func:`attention_modules`). Raises InvalidInputError if empty or unknown."""
    layers = sorted(modules) if layers is None else sorted(set(int(l) for l in layers))
    bad = [l for l in layers if l not in modules]
    if not layers or bad:
        raise InvalidInputError(f"layers must be a non-empty subset of {sorted(modules)}, got {layers}")
    return layers


def _model_name(model) -> str:
    return str(getattr(model.config, "name_or_path", "") or "")


def _quantize_int8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one float32 scale per row (last dim): ``x ~= q * scale``."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1).clamp_min(1e-12) / 127.0
    q = torch.round(xf / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def _normalize(keys: torch.Tensor) -> torch.Tensor:
    k = keys.float()
    return (k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)).to(keys.dtype)


class MemoryBank:
    """Per-layer memory keys (before RoPE), values and unit-normalised keys, with citations.

    Attributes:
        layers: the layer indices the bank holds (sorted).
        num_kv_heads, head_dim: the model's attention shape.
        mem_len: number of memory tokens (the same in every layer).
        dtype: the dtype :meth:`keys` / :meth:`values` return (the storage dtype, or the
            dequantisation dtype for an int8 bank).
        quantization: ``None`` or ``"int8"`` (per-row symmetric int8 with float32 scales).
        token_map: ``(mem_len, 3)`` int64 on CPU: ``(document, char_start, char_end)`` per token.
        documents: the memory documents' texts.
        model_name, tokenizer_fingerprint, window, stride: provenance.
        sink_token: the token id read before every window at build time and not stored (``None``:
            none, or unknown for a bank that mixes settings).

    Build with :meth:`build`, persist with :meth:`save` / :meth:`load`.
    """

    def __init__(
        self,
        *,
        keys: Dict[int, torch.Tensor],
        values: Dict[int, torch.Tensor],
        token_map: torch.Tensor,
        documents: Sequence[str],
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        model_name: str = "",
        tokenizer_fingerprint: str = "",
        window: int = 0,
        stride: int = 0,
        sink_token: Optional[int] = None,
        quantization: Optional[str] = None,
        key_scales: Optional[Dict[int, torch.Tensor]] = None,
        value_scales: Optional[Dict[int, torch.Tensor]] = None,
    ):
        if quantization not in _QUANTIZATIONS:
            raise InvalidInputError(f"quantization must be one of {_QUANTIZATIONS}, got {quantization!r}")
        if dtype not in _DTYPES.values():
            raise InvalidInputError(f"dtype must be one of {tuple(_DTYPES.values())}, got {dtype}")
        if sorted(keys) != sorted(values) or not keys:
            raise InvalidInputError(f"keys and values must cover the same non-empty set of layers, got {sorted(keys)} and {sorted(values)}")
        self.layers: List[int] = sorted(int(l) for l in keys)
        self.num_kv_heads = int(num_kv_heads)
        self.head_dim = int(head_dim)
        self.dtype = dtype
        self.quantization = quantization
        self.model_name = model_name
        self.tokenizer_fingerprint = tokenizer_fingerprint
        self.window, self.stride = int(window), int(stride)
        self.sink_token = None if sink_token is None else int(sink_token)
        self.documents = list(documents)
        self.token_map = token_map.to(torch.int64).contiguous()
        self.mem_len = int(self.token_map.shape[0])
        want = (self.num_kv_heads, self.mem_len, self.head_dim)
        for layer in self.layers:
            for name, t in (("keys", keys[layer]), ("values", values[layer])):
                if tuple(t.shape) != want:
                    raise InvalidInputError(f"{name}[{layer}] must have shape {want} (num_kv_heads, mem_len, head_dim), got {tuple(t.shape)}")
        self._keys = {l: keys[l].contiguous() for l in self.layers}
        self._values = {l: values[l].contiguous() for l in self.layers}
        if quantization == "int8":
            if key_scales is None or value_scales is None:
                raise InvalidInputError("an int8 bank needs key_scales and value_scales")
            self._key_scales = {l: key_scales[l].float().contiguous() for l in self.layers}
            self._value_scales = {l: value_scales[l].float().contiguous() for l in self.layers}
        else:
            self._key_scales = self._value_scales = None
        self._normed: Dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ access

    def keys(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s memory keys before RoPE, ``(num_kv_heads, mem_len, head_dim)`` in
        :attr:`dtype` (dequantised on each call for an int8 bank)."""
        self._check_layer(layer)
        if self._key_scales is not None:
            return _dequantize_int8(self._keys[layer], self._key_scales[layer], self.dtype)
        return self._keys[layer]

    def values(self, layer: int) -> torch.Tensor:
        """Layer ``layer``'s memory values, ``(num_kv_heads, mem_len, head_dim)`` in :attr:`dtype`."""
        self._check_layer(layer)
        if self._value_scales is not None:
            return _dequantize_int8(self._values[layer], self._value_scales[layer], self.dtype)
        return self._values[layer]

    def quantized(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """An int8 bank's stored layer ``layer``: ``(keys, values)`` int8 ``(num_kv_heads,
        mem_len, head_dim)`` and ``(key_scales, value_scales)`` float32 ``(num_kv_heads,
        mem_len)``, row = int8 row * scale (what :func:`kcore.ops.memory_attention` takes as
        ``mem_key_scales`` / ``mem_value_scales``).

        Raises:
            InvalidInputError: the bank is not int8, or ``layer`` is not in it.
        """
        self._check_layer(layer)
        if self._key_scales is None:
            raise InvalidInputError(f"quantized() is for int8 banks; this bank stores {self.dtype}")
        return self._keys[layer], self._values[layer], self._key_scales[layer], self._value_scales[layer]

    def keys_normed(self, layer: int) -> torch.Tensor:
        """Unit-normalised keys of layer ``layer`` for the cosine top-k selection, same shape and
        dtype as :meth:`keys`; computed once per layer and kept (not stored in the file)."""
        self._check_layer(layer)
        if layer not in self._normed:
            self._normed[layer] = _normalize(self.keys(layer))
        return self._normed[layer]

    def span(self, index: int) -> MemorySpan:
        """The document and character span of memory token ``index``."""
        if not 0 <= index < self.mem_len:
            raise InvalidInputError(f"memory index must be in [0, {self.mem_len}), got {index}")
        d, s, e = (int(x) for x in self.token_map[index])
        return MemorySpan(d, s, e)

    def text(self, index: int) -> str:
        """The text of memory token ``index`` in its document."""
        sp = self.span(index)
        return self.documents[sp.document][sp.start : sp.end]

    @property
    def nbytes(self) -> int:
        """Bytes held by keys, values and scales (not counting the normalised-key cache)."""
        total = 0
        for store in (self._keys, self._values, self._key_scales or {}, self._value_scales or {}):
            total += sum(t.numel() * t.element_size() for t in store.values())
        return total

    def to(self, device) -> "MemoryBank":
        """Move the tensors to ``device`` (in place, returns ``self``); the token map stays on CPU.
        Only the device changes: the storage dtype is set at :meth:`build`."""
        if isinstance(device, torch.dtype):
            raise InvalidInputError(f"MemoryBank.to() takes a device, got the dtype {device}; the dtype is chosen at build()")
        for store in (self._keys, self._values, self._key_scales, self._value_scales, self._normed):
            if store:
                for k in list(store):
                    store[k] = store[k].to(device)
        return self

    def __repr__(self) -> str:
        return (
            f"MemoryBank(mem_len={self.mem_len}, layers={len(self.layers)}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, dtype={self.dtype}, quantization={self.quantization}, "
            f"documents={len(self.documents)})"
        )

    def _check_layer(self, layer: int) -> None:
        if layer not in self._keys:
            raise InvalidInputError(f"layer {layer} is not in this bank (layers {self.layers})")

    # ------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        documents: Sequence[str],
        *,
        window: int,
        stride: int,
        layers: Optional[Iterable[int]] = None,
        dtype: torch.dtype = torch.float16,
        quantization: Optional[str] = None,
        batch_size: int = 4,
        progress: bool = True,
        sink_token: Union[str, int, None] = None,
    ) -> "MemoryBank":
        """Run ``model`` over ``documents`` and keep every token's per-layer key and value.

        Each document is tokenized on its own (no special tokens) and read in windows of
        ``window`` tokens starting every ``stride`` tokens, each window read from position 0 after
        the sink token (see ``sink_token``). A token
        is taken from the window where it has the most left context (the first window holding
        it): the first window gives its ``window`` tokens, each later one its last ``stride``.
        Extended Mind Transformers use window 3072, stride 512. Keys are the ``k_proj`` outputs
        (before RoPE), values the ``v_proj`` outputs, both reshaped to
        ``(num_kv_heads, mem_len, head_dim)``; documents are concatenated along ``mem_len``.

        Args:
            model: a Hugging Face causal LM (Llama family: attention modules with ``layer_idx``,
                ``k_proj``, ``v_proj``), on any device; run under ``torch.no_grad``.
            tokenizer: its fast tokenizer (character offsets are needed for citations).
            documents: the memory texts (each non-empty after tokenization).
            window: tokens per window, ``>= 1``.
            stride: tokens between window starts, ``1 <= stride <= window``.
            layers: layer indices to keep (default: all).
            dtype: storage dtype of keys and values (float16, bfloat16 or float32).
            quantization: ``None`` or ``"int8"`` (keys and values as int8 with a float32 scale
                per (head, token) row; ``dtype`` is then the dequantisation dtype).
            batch_size: windows per forward pass.
            progress: print progress to stderr.
            sink_token: a token id read before every window but not stored; ``None`` (the
                default) reads windows bare, ``"auto"`` uses the tokenizer's BOS token, else its
                EOS token, else none. Why it exists: the first token a model reads is an
                attention sink (Xiao et al. 2023, StreamingLLM), so each stored document's first
                token draws attention whatever the query; Extended Mind Transformers read memories
                after a BOS and drop it. Why it is off by default: on SmolLM2-135M it lowered
                single-fact counterfactual recall from 19/20 to 13/20 and did not rescue recall
                among distractors (benchmarks/RESULTS.md, issue 5); measure before enabling.
        Returns:
            A :class:`MemoryBank` on the model's device.

        Raises:
            InvalidInputError: bad window / stride / layers / documents / sink_token, or a slow
                tokenizer.
        """
        import sys

        from kcore.tokenizer import tokenizer_fingerprint

        for name, v in (("window", window), ("stride", stride), ("batch_size", batch_size)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                raise InvalidInputError(f"{name} must be an int >= 1, got {v!r}")
        window, stride, batch_size = int(window), int(stride), int(batch_size)
        if stride > window:
            raise InvalidInputError(f"stride must be <= window ({window}), got {stride}")
        if quantization not in _QUANTIZATIONS:
            raise InvalidInputError(f"quantization must be one of {_QUANTIZATIONS}, got {quantization!r}")
        if dtype not in _DTYPES.values():
            raise InvalidInputError(f"dtype must be one of {tuple(_DTYPES.values())}, got {dtype}")
        sink = _sink_token_id(tokenizer, sink_token)
        vocab = model.get_input_embeddings().num_embeddings
        if sink is not None and sink >= vocab:
            raise InvalidInputError(f"sink_token {sink} is outside the model's vocabulary ({vocab} tokens)")
        lead = [] if sink is None else [sink]
        if isinstance(documents, str):
            raise InvalidInputError("documents must be a sequence of strings, got one str (wrap it in a list)")
        documents = list(documents)
        if not documents or not all(isinstance(d, str) for d in documents):
            raise InvalidInputError("documents must be a non-empty sequence of strings")
        if not getattr(tokenizer, "is_fast", False):
            raise InvalidInputError("tokenizer must be a fast tokenizer (character offsets are needed for citations)")
        modules = attention_modules(model)
        num_layers, num_kv, head_dim = _model_shape(model)
        layers = _resolve_layers(modules, layers)

        device = next(model.parameters()).device
        captured: Dict[Tuple[str, int], torch.Tensor] = {}
        handles = []

        def hook(kind, layer):
            def fn(_module, _inputs, output):
                captured[(kind, layer)] = output.detach()

            return fn

        for l in layers:
            handles.append(modules[l].k_proj.register_forward_hook(hook("k", l)))
            handles.append(modules[l].v_proj.register_forward_hook(hook("v", l)))

        k_parts = {l: [] for l in layers}
        v_parts = {l: [] for l in layers}
        maps = []
        try:
            for d, text in enumerate(documents):
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ids = list(enc["input_ids"])
                if not ids:
                    raise InvalidInputError(f"documents[{d}] has no tokens")
                offsets = torch.tensor(enc["offset_mapping"], dtype=torch.int64).reshape(-1, 2)
                maps.append(torch.cat([torch.full((len(ids), 1), d, dtype=torch.int64), offsets], dim=1))
                # (window start, first kept token, end) per window: the kept tokens of each window
                # are those no earlier window holds.
                plan = [(0, 0, min(window, len(ids)))]
                start = stride
                while plan[-1][2] < len(ids):
                    end = min(start + window, len(ids))
                    plan.append((start, plan[-1][2], end))
                    start += stride
                for b0 in range(0, len(plan), batch_size):
                    group = plan[b0 : b0 + batch_size]
                    # Group windows of equal length into one batch (only the last may be shorter).
                    for same in _split_by_length(group):
                        batch = torch.tensor([lead + ids[s:e] for s, _, e in same], dtype=torch.long, device=device)
                        with torch.no_grad():
                            model(input_ids=batch, use_cache=False)
                        for l in layers:
                            for kind, parts in (("k", k_parts), ("v", v_parts)):
                                out = captured.pop((kind, l))
                                for row, (s, keep, e) in enumerate(same):
                                    x = out[row, len(lead) + keep - s : len(lead) + e - s].reshape(e - keep, num_kv, head_dim)
                                    parts[l].append(x.transpose(0, 1).to(dtype))
                    if progress:
                        done = group[-1][2]
                        print(f"\rmemory bank: document {d + 1}/{len(documents)}, token {done}/{len(ids)}", end="", file=sys.stderr)
            if progress:
                print(file=sys.stderr)
        finally:
            for h in handles:
                h.remove()

        keys = {l: torch.cat(k_parts[l], dim=1) for l in layers}
        values = {l: torch.cat(v_parts[l], dim=1) for l in layers}
        key_scales = value_scales = None
        if quantization == "int8":
            key_scales, value_scales = {}, {}
            for l in layers:
                keys[l], key_scales[l] = _quantize_int8(keys[l])
                values[l], value_scales[l] = _quantize_int8(values[l])
        elif quantization is not None:
            raise InvalidInputError(f"quantization must be one of {_QUANTIZATIONS}, got {quantization!r}")
        return cls(
            keys=keys,
            values=values,
            token_map=torch.cat(maps, dim=0),
            documents=documents,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            dtype=dtype,
            model_name=_model_name(model),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            window=window,
            stride=stride,
            sink_token=sink,
            quantization=quantization,
            key_scales=key_scales,
            value_scales=value_scales,
        )

    @classmethod
    def empty(
        cls,
        model,
        *,
        dtype: torch.dtype = torch.float16,
        layers: Optional[Iterable[int]] = None,
        tokenizer=None,
        quantization: Optional[str] = None,
    ) -> "MemoryBank":
        """A bank with no memory tokens for ``model`` (memory attention then equals plain
        attention). ``tokenizer`` records its fingerprint; ``quantization="int8"`` makes an int8
        bank (both only matter to :meth:`concatenate` and :meth:`load`, which also accept an empty
        bank without a fingerprint)."""
        if quantization not in _QUANTIZATIONS:
            raise InvalidInputError(f"quantization must be one of {_QUANTIZATIONS}, got {quantization!r}")
        modules = attention_modules(model)
        _, num_kv, head_dim = _model_shape(model)
        layers = _resolve_layers(modules, layers)
        device = next(model.parameters()).device
        store = torch.int8 if quantization == "int8" else dtype
        z = {l: torch.zeros(num_kv, 0, head_dim, dtype=store, device=device) for l in layers}
        scales = {l: torch.zeros(num_kv, 0, dtype=torch.float32, device=device) for l in layers} if quantization else None
        fingerprint = ""
        if tokenizer is not None:
            from kcore.tokenizer import tokenizer_fingerprint

            fingerprint = tokenizer_fingerprint(tokenizer)
        return cls(
            keys=z, values=dict(z), token_map=torch.zeros(0, 3, dtype=torch.int64), documents=[],
            num_kv_heads=num_kv, head_dim=head_dim, dtype=dtype,
            model_name=_model_name(model),
            tokenizer_fingerprint=fingerprint, quantization=quantization,
            key_scales=scales, value_scales=dict(scales) if scales else None,
        )

    @classmethod
    def concatenate(cls, banks: Sequence["MemoryBank"]) -> "MemoryBank":
        """One bank holding the memory tokens of ``banks`` in order (documents renumbered), like
        ``torch.cat`` along ``mem_len`` or faiss ``merge_from``.

        Documents are read independently by :meth:`build` (windows never cross documents), so
        concatenating banks built from separate document lists gives the same keys and values as
        one :meth:`build` over all the documents: memory can be grown by building only the new
        documents. The banks must agree on layers, KV heads, head dim, dtype, quantization and
        tokenizer fingerprint; window, stride and sink token are kept when equal (else 0, 0, None:
        mixed). The result is on the first bank's device; the inputs are not modified.

        Raises:
            InvalidInputError: no banks, or banks that disagree on any of the above.
        """
        banks = list(banks)
        if not banks or not all(isinstance(b, MemoryBank) for b in banks):
            raise InvalidInputError("concatenate needs a non-empty sequence of MemoryBank")
        first = banks[0]
        # An empty bank made without a tokenizer holds no token to mismatch.
        fingerprints = {b.tokenizer_fingerprint for b in banks if b.mem_len or b.tokenizer_fingerprint}
        if len(fingerprints) > 1:
            raise InvalidInputError(
                "the banks were built with different tokenizers (fingerprints differ): "
                "only banks built for the same model and settings can be concatenated"
            )
        for i, b in enumerate(banks[1:], 1):
            for attr in ("layers", "num_kv_heads", "head_dim", "dtype", "quantization"):
                if getattr(b, attr) != getattr(first, attr):
                    raise InvalidInputError(
                        f"banks[{i}].{attr} is {getattr(b, attr)!r}, banks[0].{attr} is {getattr(first, attr)!r}: "
                        "only banks built for the same model and settings can be concatenated"
                    )
        device = first._keys[first.layers[0]].device

        def cat(stores):
            return {l: torch.cat([s[l].to(device) for s in stores], dim=1) for l in first.layers}

        maps, offset = [], 0
        for b in banks:
            m = b.token_map.clone()
            m[:, 0] += offset
            maps.append(m)
            offset += len(b.documents)
        def same(attr, mixed):
            return getattr(first, attr) if all(getattr(b, attr) == getattr(first, attr) for b in banks) else mixed

        int8 = first.quantization == "int8"
        return cls(
            keys=cat([b._keys for b in banks]),
            values=cat([b._values for b in banks]),
            token_map=torch.cat(maps, dim=0),
            documents=[d for b in banks for d in b.documents],
            num_kv_heads=first.num_kv_heads,
            head_dim=first.head_dim,
            dtype=first.dtype,
            model_name=same("model_name", ""),
            tokenizer_fingerprint=next(iter(fingerprints), ""),
            window=same("window", 0),
            stride=same("stride", 0),
            sink_token=same("sink_token", None),
            quantization=first.quantization,
            # Scales are (num_kv_heads, mem_len): concatenated along the same axis as the rows.
            key_scales=cat([b._key_scales for b in banks]) if int8 else None,
            value_scales=cat([b._value_scales for b in banks]) if int8 else None,
        )

    # ------------------------------------------------------------------ files

    def save(self, path) -> None:
        """Write the bank to ``path`` (safetensors; the JSON metadata under the header key
        ``"kcore"``: format, version, model, layers, heads, head dim, dtype, quantization,
        tokenizer fingerprint, window, stride, documents, and a SHA-256 of the tensor bytes).
        Written to a temporary file and renamed, so a reader never sees a partial file."""
        from safetensors.torch import save_file

        tensors = self._tensors_for_file()
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "model": self.model_name,
            "layers": self.layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "mem_len": self.mem_len,
            "dtype": _dtype_name(self.dtype),
            "quantization": self.quantization,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
            "window": self.window,
            "stride": self.stride,
            "sink_token": self.sink_token,
            "documents": self.documents,
            "sha256": _digest(tensors),
        }
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        try:
            save_file(tensors, tmp, metadata={"kcore": json.dumps(meta)})
            # mkstemp (and safetensors, which recreates the file) make it 0600: give the bank the
            # permissions of an ordinary new file.
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path, *, tokenizer=None, model=None, device="cpu") -> "MemoryBank":
        """Read a bank written by :meth:`save`, validating it.

        Args:
            path: the file.
            tokenizer: if given, its fingerprint must equal the bank's.
            model: if given, its layer count, KV heads and head dim must fit the bank.
            device: where to put the tensors.

        Raises:
            FileFormatError: missing, truncated, corrupted (checksum), not a kcore memory bank,
                an unknown format version, or inconsistent shapes; also a model that does not fit.
            TokenizerMismatchError: built with another tokenizer.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileFormatError(f"memory bank {path}: no such file")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types on bad headers / sizes
            raise FileFormatError(f"memory bank {path}: not a readable safetensors file ({e})") from None
        try:
            meta = json.loads(header["kcore"])
            if meta.get("format") != FORMAT_NAME:
                raise FileFormatError(f"memory bank {path}: not a kcore memory bank (format {meta.get('format')!r})")
            if meta.get("version") != FORMAT_VERSION:
                raise FileFormatError(f"memory bank {path}: format version {meta.get('version')!r}, this kcore reads {FORMAT_VERSION}")
            layers = [int(l) for l in meta["layers"]]
            num_kv, head_dim, mem_len = int(meta["num_kv_heads"]), int(meta["head_dim"]), int(meta["mem_len"])
            dtype = _DTYPES[meta["dtype"]]
            quant = meta["quantization"]
        except FileFormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"memory bank {path}: missing or bad kcore metadata ({e!r})") from None
        if _digest(tensors) != meta.get("sha256"):
            raise FileFormatError(f"memory bank {path}: checksum mismatch (corrupted file)")
        if tokenizer is not None:
            from kcore.tokenizer import tokenizer_fingerprint

            no_tokens = mem_len == 0 and not meta["tokenizer_fingerprint"]
            if not no_tokens and tokenizer_fingerprint(tokenizer) != meta["tokenizer_fingerprint"]:
                raise TokenizerMismatchError(f"memory bank {path} was built with another tokenizer (fingerprint differs)")
        if model is not None:
            n_layers, m_kv, m_hd = _model_shape(model)
            if (m_kv, m_hd) != (num_kv, head_dim) or max(layers) >= n_layers:
                raise FileFormatError(
                    f"memory bank {path} has layers up to {max(layers)}, {num_kv} KV heads, head dim {head_dim}; "
                    f"the model has {n_layers} layers, {m_kv} KV heads, head dim {m_hd}"
                )
        try:
            suffix = ["keys", "values"] + (["key_scales", "value_scales"] if quant == "int8" else [])
            parts = {s: {l: tensors[f"{s}.{l}"] for l in layers} for s in suffix}
            token_map = tensors["token_map"]
            if tuple(token_map.shape) != (mem_len, 3):
                raise FileFormatError(f"memory bank {path}: token_map has shape {tuple(token_map.shape)}, expected ({mem_len}, 3)")
            bank = cls(
                keys=parts["keys"], values=parts["values"], token_map=token_map, documents=meta["documents"],
                num_kv_heads=num_kv, head_dim=head_dim, dtype=dtype, model_name=meta["model"],
                tokenizer_fingerprint=meta["tokenizer_fingerprint"], window=meta["window"], stride=meta["stride"],
                sink_token=meta.get("sink_token"),
                quantization=quant, key_scales=parts.get("key_scales"), value_scales=parts.get("value_scales"),
            )
        except KeyError as e:
            raise FileFormatError(f"memory bank {path}: missing tensor {e}") from None
        except InvalidInputError as e:
            raise FileFormatError(f"memory bank {path}: {e}") from None
        return bank.to(device)

    def _tensors_for_file(self) -> Dict[str, torch.Tensor]:
        out = {"token_map": self.token_map.cpu().contiguous()}
        for l in self.layers:
            out[f"keys.{l}"] = self._keys[l].cpu().contiguous()
            out[f"values.{l}"] = self._values[l].cpu().contiguous()
            if self._key_scales is not None:
                out[f"key_scales.{l}"] = self._key_scales[l].cpu().contiguous()
                out[f"value_scales.{l}"] = self._value_scales[l].cpu().contiguous()
        return out


def _sink_token_id(tokenizer, sink_token) -> Optional[int]:
    """The token id :meth:`MemoryBank.build` reads before each window (``None``: no sink token)."""
    if sink_token is None:
        return None
    if sink_token == "auto":
        for tid in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if isinstance(tid, int):
                return tid
        return None
    if isinstance(sink_token, bool) or not isinstance(sink_token, numbers.Integral) or sink_token < 0:
        raise InvalidInputError(f'sink_token must be "auto", None or a token id >= 0, got {sink_token!r}')
    return int(sink_token)


def _split_by_length(windows):
    groups: List[list] = []
    for w in windows:
        if groups and groups[-1][0][2] - groups[-1][0][0] == w[2] - w[0]:
            groups[-1].append(w)
        else:
            groups.append([w])
    return groups


def _dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise InvalidInputError(f"unsupported dtype {dtype}")


def _digest(tensors: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()
