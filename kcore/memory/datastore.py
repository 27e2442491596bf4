"""kNN-LM datastore: (hidden state -> next token) pairs of a corpus, in memory-mapped files.

After Khandelwal et al., "Generalization through Memorization: Nearest Neighbor Language Models"
(ICLR 2020; urvashik/knnlm): the key of a position is the input of the last decoder layer's
feed-forward block after its layer norm, the value is the token that follows the position.

On-disk layout (a folder, written atomically: built in a temp folder beside it, then renamed)::

    meta.json     format name and version, model, key kind, layer, dim, count, dtypes,
                  vocab size, tokenizer fingerprint, SHA-256 of the two data files
    keys.bin      (count, dim) float16 | float32, C order, native little-endian
    values.bin    (count,) int32 next-token ids
    index.faiss   optional faiss IVF-PQ index over the keys (Datastore.build_index)
    index.json    its parameters and the datastore checksum it was built from
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kcore.errors import FileFormatError, InvalidInputError, TokenizerMismatchError

FORMAT_NAME = "kcore-datastore"
FORMAT_VERSION = 1
KEY_KINDS = ("mlp_input", "final_norm")
_KEY_DTYPES = {"float16": np.float16, "float32": np.float32}
_INDEX_FORMAT = "kcore-datastore-faiss-index"


# --------------------------------------------------------------------------------------------
# Where the key hidden state lives in a Hugging Face model


def decoder_layers(model) -> Sequence[torch.nn.Module]:
    """The decoder layers of a Hugging Face causal LM (Llama family: ``layers``; GPT-2: ``h``).

    Raises:
        InvalidInputError: the model has neither layout.
    """
    base = getattr(model, "base_model", model)
    for name in ("layers", "h"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return layers
    raise InvalidInputError(
        f"model {type(model).__name__} has no decoder layer list (expected base_model.layers as in the Llama "
        "family or base_model.h as in GPT-2)"
    )


def key_module(model, key: str = "mlp_input") -> Tuple[torch.nn.Module, int]:
    """The module whose output is the kNN-LM key, and the index of its decoder layer.

    ``key="mlp_input"``: the last decoder layer's norm in front of its MLP
    (``post_attention_layernorm`` in Llama/Mistral/Qwen2, ``pre_feedforward_layernorm`` in
    Gemma 2/3, ``ln_2`` in GPT-2): kNN-LM's choice. ``key="final_norm"``: the final norm before
    the LM head (``norm`` / ``ln_f``); its layer index is the number of layers.

    Raises:
        InvalidInputError: unknown ``key`` or a model layout without such a module.
    """
    if key not in KEY_KINDS:
        raise InvalidInputError(f"key must be one of {KEY_KINDS}, got {key!r}")
    layers = decoder_layers(model)
    if key == "mlp_input":
        last = layers[-1]
        for name in ("pre_feedforward_layernorm", "post_attention_layernorm", "ln_2"):
            module = getattr(last, name, None)
            if isinstance(module, torch.nn.Module):
                return module, len(layers) - 1
        raise InvalidInputError(f"last decoder layer {type(last).__name__} has no norm in front of its MLP")
    base = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layernorm"):
        module = getattr(base, name, None)
        if isinstance(module, torch.nn.Module):
            return module, len(layers)
    raise InvalidInputError(f"model {type(model).__name__} has no final norm (norm / ln_f)")


def _model_name(model) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or type(model).__name__)


def _vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise InvalidInputError(f"model {type(model).__name__} has no output embedding (LM head)")
    return int(head.weight.shape[0])


# --------------------------------------------------------------------------------------------
# Running a model over a corpus


@dataclass
class _Window:
    doc: int  # index of the text
    begin: int  # first token of the window in the text
    end: int  # one past the last token
    first: int  # first position (relative to begin) whose next token is recorded
    offset: int  # row of the first recorded position in the output


@dataclass
class StateBatch:
    """One batch of positions from :func:`extract_key_states`.

    Attributes:
        rows: ``(n,)`` int64, row of each position in corpus order (all texts, all windows).
        keys: ``(n, dim)`` float32 CPU, the key hidden states.
        targets: ``(n,)`` int64 CPU, the next token ids.
        lm_logprobs: ``(n,)`` float32 CPU, log p_LM(target) in nats (only with ``with_lm=True``).
        lm_entropy: ``(n,)`` float32 CPU, entropy of p_LM in nats (only with ``with_lm=True``).
    """

    rows: torch.Tensor
    keys: torch.Tensor
    targets: torch.Tensor
    lm_logprobs: Optional[torch.Tensor] = None
    lm_entropy: Optional[torch.Tensor] = None


def tokenize_texts(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """Token ids of each text with the tokenizer's default special tokens (one list per text).

    Raises:
        InvalidInputError: ``texts`` is a bare string or holds a non-string.
    """
    if isinstance(texts, str):
        raise InvalidInputError("texts must be a sequence of strings (one per document), got a single str")
    out = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInputError(f"texts[{i}] must be a str, got {type(text).__name__}")
        out.append(list(tokenizer(text)["input_ids"]))
    return out


def _plan_windows(docs: Sequence[Sequence[int]], max_length: int, stride: int) -> Tuple[List[_Window], int]:
    """Sliding windows over each document (as in HF's perplexity guide): each window of at most
    ``max_length`` tokens records only the positions whose next token no earlier window recorded,
    so every position is recorded once with up to ``max_length - stride`` tokens of left context."""
    windows, offset = [], 0
    for d, ids in enumerate(docs):
        n = len(ids)
        if n < 2:
            continue
        begin, recorded_end = 0, 1  # next-token targets ids[1:recorded_end] are done
        while True:
            end = min(begin + max_length, n)
            first = recorded_end - 1 - begin
            count = end - recorded_end
            if count > 0:
                windows.append(_Window(d, begin, end, first, offset))
                offset += count
                recorded_end = end
            if end == n:
                break
            begin += stride
    return windows, offset


def extract_key_states(
    model,
    tokenizer,
    texts: Sequence[str],
    *,
    key: str = "mlp_input",
    batch_size: int = 8,
    max_length: int = 512,
    stride: Optional[int] = None,
    with_lm: bool = False,
    progress: bool = False,
    docs: Optional[Sequence[Sequence[int]]] = None,
) -> Iterator[StateBatch]:
    """Run ``model`` over ``texts`` and yield the key hidden state of every position.

    Each text is tokenized alone (a document); position ``i`` of a document yields its key and the
    next token ``ids[i + 1]``. Documents longer than ``max_length`` are read in sliding windows
    advancing by ``stride`` tokens. Windows are batched with right padding. The key is captured by
    a forward hook on :func:`key_module` (no ``output_hidden_states``); the model's base runs
    without its LM head, which is applied only to recorded positions when ``with_lm`` is set.

    Args:
        model: Hugging Face causal LM (Llama family or GPT-2 family), any device, eval mode.
        tokenizer: its tokenizer (ignored when ``docs`` gives the token ids).
        texts: the documents.
        key: ``"mlp_input"`` (kNN-LM) or ``"final_norm"``.
        batch_size: windows per forward pass.
        max_length: tokens per window (>= 2).
        stride: window advance, ``1 <= stride <= max_length - 1`` (default ``max_length // 2``).
        with_lm: also return log p_LM(next token) and the LM entropy.
        progress: show a tqdm bar counting positions.
        docs: token ids per document, instead of tokenizing ``texts``.

    Yields:
        :class:`StateBatch`, in an order sorted by window length; ``rows`` place each position
        in corpus order.

    Raises:
        InvalidInputError: bad ``key``, ``batch_size``, ``max_length`` or ``stride``.
    """
    if batch_size < 1:
        raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
    if max_length < 2:
        raise InvalidInputError(f"max_length must be >= 2, got {max_length}")
    stride = max(1, max_length // 2) if stride is None else stride
    if not 1 <= stride <= max_length - 1:
        raise InvalidInputError(f"stride must be in [1, max_length - 1] = [1, {max_length - 1}], got {stride}")
    module, _ = key_module(model, key)
    if docs is None:
        docs = tokenize_texts(tokenizer, texts)
    windows, total = _plan_windows(docs, max_length, stride)
    # Longest windows first: batches of similar length waste little on padding.
    order = sorted(range(len(windows)), key=lambda w: windows[w].end - windows[w].begin, reverse=True)
    device = next(model.parameters()).device
    base = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if with_lm else None

    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    handle = module.register_forward_hook(hook)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, unit="tok", desc="key states")
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = [windows[w] for w in order[start : start + batch_size]]
                width = max(w.end - w.begin for w in batch)
                input_ids = torch.zeros((len(batch), width), dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                sel_b, sel_t, rows, targets = [], [], [], []
                for b, w in enumerate(batch):
                    ids = docs[w.doc][w.begin : w.end]
                    input_ids[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    mask[b, : len(ids)] = 1
                    n = len(ids) - 1 - w.first
                    sel_b.append(torch.full((n,), b, dtype=torch.long))
                    sel_t.append(torch.arange(w.first, len(ids) - 1))
                    rows.append(torch.arange(w.offset, w.offset + n))
                    targets.append(torch.tensor(ids[w.first + 1 :], dtype=torch.long))
                sel_b, sel_t = torch.cat(sel_b), torch.cat(sel_t)
                out = base(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False)
                keys = captured.pop("h")[sel_b.to(device), sel_t.to(device)].float()
                result = StateBatch(torch.cat(rows), keys.cpu(), torch.cat(targets))
                if with_lm:
                    final = out.last_hidden_state[sel_b.to(device), sel_t.to(device)]
                    logp = torch.log_softmax(head(final).float(), dim=-1)
                    result.lm_logprobs = logp.gather(1, result.targets.to(device)[:, None])[:, 0].cpu()
                    result.lm_entropy = -(logp.exp() * logp).sum(-1).cpu()
                if bar is not None:
                    bar.update(len(result.rows))
                yield result
    finally:
        handle.remove()
        if bar is not None:
            bar.close()


# --------------------------------------------------------------------------------------------
# Files


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_dir(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp folder to ``path`` (rename: readers see all or nothing)."""
    if path.exists():
        if not overwrite:
            raise InvalidInputError(f"path {str(path)!r} already exists; pass overwrite=True to replace it")
        trash = Path(tempfile.mkdtemp(prefix=f".{path.name}.old", dir=path.parent))
        os.rename(path, trash / "old")
        os.rename(tmp, path)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, path)
    _fsync_dir(path.parent)


class Datastore:
    """A kNN-LM datastore opened from disk: keys and values as read-only memory maps.

    Build one with :meth:`build`, open one with :meth:`load`. Attributes: ``keys`` (torch tensor
    ``(count, dim)`` float16/float32 over the memory map, CPU, read-only: do not write to it),
    ``values`` (torch tensor ``(count,)`` int32, next-token ids), ``meta`` (the JSON metadata),
    ``count``, ``dim``, ``vocab_size``, ``key``, ``layer``, ``path``.
    """

    def __init__(self, path: Path, meta: dict, keys: np.ndarray, values: np.ndarray):
        self.path = path
        self.meta = meta
        self._keys_np = keys
        self._values_np = values
        with warnings.catch_warnings():
            # The maps are read-only; torch warns that it cannot guard them against writes.
            warnings.simplefilter("ignore", UserWarning)
            self.keys = torch.from_numpy(keys)
            self.values = torch.from_numpy(values)
        self._index = None
        self._index_meta = None

    count = property(lambda self: int(self.meta["count"]))
    dim = property(lambda self: int(self.meta["dim"]))
    vocab_size = property(lambda self: int(self.meta["vocab_size"]))
    key = property(lambda self: self.meta["key"])
    layer = property(lambda self: int(self.meta["layer"]))

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return (
            f"Datastore({str(self.path)!r}, count={self.count}, dim={self.dim}, key={self.key!r}, "
            f"key_dtype={self.meta['key_dtype']}, model={self.meta['model']!r}, index={self.has_index})"
        )

    # ---------------------------------------------------------------- build

    @classmethod
    def build(
        cls,
        model,
        tokenizer,
        texts: Sequence[str],
        path,
        *,
        batch_size: int = 8,
        max_length: int = 512,
        stride: Optional[int] = None,
        key: str = "mlp_input",
        dtype=torch.float16,
        progress: bool = True,
        overwrite: bool = False,
    ) -> "Datastore":
        """Build a datastore from ``texts`` and open it.

        Runs ``model`` over every text (see :func:`extract_key_states` for windowing and
        batching) and stores one entry per position: key = hidden state of ``key`` kind
        (``"mlp_input"``: input of the last decoder layer's MLP after its norm, kNN-LM's choice;
        ``"final_norm"``: output of the final norm), value = next token id (int32). The folder is
        written in a temp folder beside ``path`` and renamed into place, so a crash never leaves a
        partial datastore at ``path``.

        Args:
            model: Hugging Face causal LM of the Llama family (or GPT-2 family).
            tokenizer: its tokenizer; its fingerprint is stored.
            texts: the documents (sequence of str).
            path: output folder.
            batch_size, max_length, stride: see :func:`extract_key_states`.
            key: ``"mlp_input"`` or ``"final_norm"``.
            dtype: key dtype, ``torch.float16`` (default) or ``torch.float32``.
            progress: show a progress bar.
            overwrite: replace an existing folder at ``path``.

        Returns:
            The opened :class:`Datastore`.

        Raises:
            InvalidInputError: bad arguments, ``path`` exists without ``overwrite``, or the
                corpus yields no position (every text shorter than two tokens).
        """
        from kcore.tokenizer import tokenizer_fingerprint

        dtype_name = {torch.float16: "float16", torch.float32: "float32"}.get(dtype)
        if dtype_name is None:
            raise InvalidInputError(f"dtype must be torch.float16 or torch.float32, got {dtype}")
        path = Path(path)
        if path.exists() and not overwrite:
            raise InvalidInputError(f"path {str(path)!r} already exists; pass overwrite=True to replace it")
        _, layer = key_module(model, key)
        docs = tokenize_texts(tokenizer, texts)
        stride = max(1, max_length // 2) if stride is None else stride
        if max_length < 2 or not 1 <= stride <= max_length - 1:
            raise InvalidInputError(f"need max_length >= 2 and 1 <= stride <= max_length - 1, got {max_length}, {stride}")
        _, count = _plan_windows(docs, max_length, stride)
        if count == 0:
            raise InvalidInputError("texts yield no position: every text is shorter than two tokens")
        vocab_size = _vocab_size(model)
        dim = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp", dir=path.parent))
        except OSError as e:
            raise InvalidInputError(f"path {str(path)!r}: cannot create a folder there ({e.strerror or e})") from None
        try:
            keys = values = None
            for batch in extract_key_states(
                model, tokenizer, texts, key=key, batch_size=batch_size, max_length=max_length, stride=stride,
                progress=progress, docs=docs,
            ):
                if keys is None:
                    dim = int(batch.keys.shape[1])
                    keys = np.memmap(tmp / "keys.bin", dtype=_KEY_DTYPES[dtype_name], mode="w+", shape=(count, dim))
                    values = np.memmap(tmp / "values.bin", dtype=np.int32, mode="w+", shape=(count,))
                rows = batch.rows.numpy()
                with np.errstate(over="ignore"):  # an overflow to inf is reported just below
                    batch_keys = batch.keys.numpy().astype(_KEY_DTYPES[dtype_name])
                # Every batch: an fp16 overflow anywhere would poison every search near it.
                if not np.isfinite(batch_keys).all():
                    raise InvalidInputError(
                        f"the model produced non-finite key states (in dtype {dtype_name}); "
                        + ("use dtype=torch.float32" if dtype_name == "float16" else "check the model")
                    )
                keys[rows] = batch_keys
                values[rows] = batch.targets.numpy().astype(np.int32)
            keys.flush()
            values.flush()
            del keys, values
            meta = {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "model": _model_name(model),
                "model_type": str(getattr(getattr(model, "config", None), "model_type", "")),
                "key": key,
                "layer": layer,
                "dim": dim,
                "count": count,
                "key_dtype": dtype_name,
                "value_dtype": "int32",
                "vocab_size": vocab_size,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                "num_texts": len(docs),
                "max_length": max_length,
                "stride": stride,
                "sha256": {"keys.bin": _sha256(tmp / "keys.bin"), "values.bin": _sha256(tmp / "values.bin")},
            }
            with open(tmp / "meta.json", "w", encoding="utf-8") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _replace_dir(tmp, path, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return cls.load(path, verify=False)

    # ---------------------------------------------------------------- load

    @classmethod
    def load(
        cls,
        path,
        *,
        tokenizer=None,
        hidden_size: Optional[int] = None,
        vocab_size: Optional[int] = None,
        verify: bool = True,
    ) -> "Datastore":
        """Open a datastore folder written by :meth:`build`, memory-mapped and validated.

        Checks the format name and version, the metadata fields, the file sizes against
        ``count * dim``, and with ``verify`` (default) the SHA-256 of both files (reads them once;
        pass ``verify=False`` for very large datastores). Loads ``index.faiss`` if present.

        Args:
            path: the folder.
            tokenizer: if given, its fingerprint must equal the stored one.
            hidden_size: if given, must equal the stored key dimension.
            vocab_size: if given, must equal the stored vocabulary size.
            verify: check the checksums.

        Raises:
            FileFormatError: missing, truncated or corrupted files, unknown format or version.
            TokenizerMismatchError: another tokenizer or vocabulary size.
            InvalidInputError: another hidden size.
        """
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileFormatError(f"{str(path)!r} is not a kcore datastore: {meta_path.name} is missing")
        try:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise FileFormatError(f"{str(meta_path)!r}: unreadable metadata ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise FileFormatError(f"{str(meta_path)!r}: not a kcore datastore (format {meta.get('format') if isinstance(meta, dict) else None!r})")
        if meta.get("version") != FORMAT_VERSION:
            raise FileFormatError(
                f"{str(meta_path)!r}: format version {meta.get('version')!r}, this kcore reads version {FORMAT_VERSION}"
            )
        try:
            count, dim, vs = int(meta["count"]), int(meta["dim"]), int(meta["vocab_size"])
            key_dtype = _KEY_DTYPES[meta["key_dtype"]]
            if meta["value_dtype"] != "int32" or meta["key"] not in KEY_KINDS:
                raise ValueError("value_dtype/key")
            checksums = dict(meta["sha256"])
            fingerprint = str(meta["tokenizer_fingerprint"])
        except (KeyError, TypeError, ValueError) as e:
            raise FileFormatError(f"{str(meta_path)!r}: invalid metadata field ({e})") from None
        if count < 1 or dim < 1 or vs < 1:
            raise FileFormatError(f"{str(meta_path)!r}: invalid sizes count={count} dim={dim} vocab_size={vs}")
        if tokenizer is not None:
            from kcore.tokenizer import tokenizer_fingerprint

            if tokenizer_fingerprint(tokenizer) != fingerprint:
                raise TokenizerMismatchError(
                    f"datastore {str(path)!r} was built for another tokenizer (model {meta.get('model')!r}); "
                    "rebuild it with this tokenizer"
                )
        if vocab_size is not None and int(vocab_size) != vs:
            raise TokenizerMismatchError(f"datastore {str(path)!r} has vocab_size {vs}, expected {vocab_size}")
        if hidden_size is not None and int(hidden_size) != dim:
            raise InvalidInputError(
                f"datastore {str(path)!r} has key dimension {dim}, expected hidden_size {hidden_size}"
            )
        expected = {"keys.bin": count * dim * np.dtype(key_dtype).itemsize, "values.bin": count * 4}
        for name, size in expected.items():
            f = path / name
            if not f.is_file():
                raise FileFormatError(f"datastore {str(path)!r}: {name} is missing")
            actual = f.stat().st_size
            if actual != size:
                raise FileFormatError(f"datastore {str(path)!r}: {name} has {actual} bytes, expected {size} (truncated or corrupted)")
            if verify and _sha256(f) != checksums.get(name):
                raise FileFormatError(f"datastore {str(path)!r}: {name} checksum mismatch (corrupted)")
        keys = np.memmap(path / "keys.bin", dtype=key_dtype, mode="r", shape=(count, dim))
        values = np.memmap(path / "values.bin", dtype=np.int32, mode="r", shape=(count,))
        store = cls(path, meta, keys, values)
        if verify:
            vmin, vmax = int(values.min()), int(values.max())
            if vmin < 0 or vmax >= vs:
                raise FileFormatError(f"datastore {str(path)!r}: values out of range [0, {vs}): min {vmin}, max {vmax}")
        if (path / "index.faiss").is_file():
            store._load_index()
        return store

    # ---------------------------------------------------------------- search

    def _check_queries(self, queries) -> torch.Tensor:
        if not isinstance(queries, torch.Tensor):
            raise InvalidInputError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise InvalidInputError(f"queries must have shape (num_queries, {self.dim}), got {tuple(queries.shape)}")
        if not queries.is_floating_point():
            raise InvalidInputError(f"queries must be floating point, got {queries.dtype}")
        return queries

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        *,
        metric: str = "l2",
        exact: Optional[bool] = None,
        nprobe: int = 32,
        rerank: bool = True,
        backend: str = "auto",
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Nearest keys of each query.

        Exact search with :func:`kcore.ops.knn_search` over the stored keys, or, when an index was
        built (:meth:`build_index`) and ``exact`` is not True, an approximate faiss IVF-PQ search
        probing ``nprobe`` lists whose candidates are, with ``rerank``, re-scored by their exact
        distance to the stored keys (kNN-LM's "exact distances recomputed").

        Args:
            queries: ``(num_queries, dim)`` float tensor on CPU.
            k: neighbours per query (>= 1); with fewer keys the rest is padding.
            metric: ``"l2"`` (squared L2, ascending) or ``"ip"`` (inner product, descending);
                an index search must use the index's metric.
            exact: force exact (True) or index (False) search; default: index if built.
            nprobe: IVF lists probed (index search).
            rerank: recompute exact distances of the index candidates (index search).
            backend: backend of :func:`kcore.ops.knn_search` (exact search).

        Returns:
            ``(dists, ids)``: ``(num_queries, k)`` float32 and int64 CPU tensors; padding has id -1
            and distance +inf (l2) / -inf (ip).

        Raises:
            InvalidInputError: bad shape/dtype, non-finite queries, bad ``k``/``metric``, or
                ``exact=False`` without an index.
        """
        from kcore.ops import knn_search

        queries = self._check_queries(queries)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
        use_index = self._index is not None if exact is None else not exact
        if not use_index:
            return knn_search(queries, self.keys, k, metric=metric, backend=backend)
        if self._index is None:
            raise InvalidInputError(f"exact=False needs an index: call build_index() on {str(self.path)!r} first")
        if metric != self._index_meta["metric"]:
            raise InvalidInputError(f"metric {metric!r} differs from the index's metric {self._index_meta['metric']!r}")
        if not torch.isfinite(queries).all():
            raise InvalidInputError("queries contain NaN or inf")
        q = queries.detach().to(torch.float32).contiguous().cpu()
        self._index.nprobe = int(nprobe)
        kk = min(k, self.count)
        dists, ids = self._index.search(q.numpy(), kk)
        dists = torch.from_numpy(dists).float()
        ids = torch.from_numpy(ids).long()
        if rerank:
            dists = self._exact_distances(q, ids, metric)
            order = torch.argsort(dists, dim=1, descending=(metric == "ip"), stable=True)
            dists, ids = dists.gather(1, order), ids.gather(1, order)
        pad_value = math.inf if metric == "l2" else -math.inf
        dists = torch.where(ids < 0, torch.full_like(dists, pad_value), dists)
        if kk < k:
            dists = torch.cat([dists, torch.full((q.shape[0], k - kk), pad_value)], 1)
            ids = torch.cat([ids, torch.full((q.shape[0], k - kk), -1, dtype=torch.long)], 1)
        return dists, ids

    def _exact_distances(self, queries: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
        """Exact distances from each query to its candidate keys ``ids`` (-1 -> pad value)."""
        valid = ids >= 0
        cand = self.keys[ids.clamp_min(0).reshape(-1)].float().reshape(*ids.shape, self.dim)
        if metric == "l2":
            d = ((cand - queries[:, None, :]) ** 2).sum(-1)
            return torch.where(valid, d, torch.full_like(d, math.inf))
        d = (cand * queries[:, None, :]).sum(-1)
        return torch.where(valid, d, torch.full_like(d, -math.inf))

    def neighbour_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (values) of neighbour ids from :meth:`search`: ``(..., k)`` int64, -1 kept."""
        tokens = self.values[ids.clamp_min(0)].long()
        return torch.where(ids < 0, torch.full_like(tokens, -1), tokens)

    # ---------------------------------------------------------------- faiss index

    @property
    def has_index(self) -> bool:
        return self._index is not None

    def build_index(
        self,
        *,
        nlist: Optional[int] = None,
        m: Optional[int] = None,
        nbits: int = 8,
        metric: str = "l2",
        train_size: int = 262144,
        seed: int = 1234,
        overwrite: bool = False,
    ) -> None:
        """Build a faiss IVF-PQ index over the keys and save it beside the datastore.

        kNN-LM's approximate search (Johnson et al., faiss; Khandelwal et al. use 4096 lists and
        64-byte codes). Afterwards :meth:`search` uses the index unless ``exact=True``. Needs the
        optional dependency ``faiss`` (``pip install kcore[faiss]``). Written atomically
        (``index.faiss`` and ``index.json`` through temp files and renames).

        Args:
            nlist: inverted lists (default ``clamp(4 * sqrt(count), 1, 4096)``, at most count/39).
            m: PQ sub-quantizers, must divide ``dim`` (default: the largest divisor of dim <= 64).
            nbits: bits per sub-quantizer code (default 8).
            metric: ``"l2"`` or ``"ip"``.
            train_size: at most this many keys (evenly spaced) train the quantizers.
            seed: k-means seed.
            overwrite: replace an existing index.

        Raises:
            BackendUnavailableError: faiss is not installed.
            InvalidInputError: bad ``nlist``, ``m``, ``nbits`` or ``metric``, or an index exists
                without ``overwrite``.
        """
        faiss = _import_faiss()
        if metric not in ("l2", "ip"):
            raise InvalidInputError(f"metric must be 'l2' or 'ip', got {metric!r}")
        if self._index is not None and not overwrite:
            raise InvalidInputError(f"datastore {str(self.path)!r} already has an index; pass overwrite=True")
        n, dim = self.count, self.dim
        if nlist is None:
            nlist = int(min(4096, max(1, 4 * math.isqrt(n)), max(1, n // 39)))
        if m is None:
            m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0)
        if not 1 <= nlist <= n:
            raise InvalidInputError(f"nlist must be in [1, count={n}], got {nlist}")
        if m < 1 or dim % m != 0:
            raise InvalidInputError(f"m (PQ sub-quantizers) must divide dim={dim}, got {m}")
        if not 1 <= nbits <= 16:
            raise InvalidInputError(f"nbits must be in [1, 16], got {nbits}")
        faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        index = faiss.index_factory(dim, f"IVF{nlist},PQ{m}x{nbits}", faiss_metric)
        step = max(1, n // train_size)
        train = np.ascontiguousarray(self._keys_np[::step][:train_size], dtype=np.float32)
        index.cp.seed = seed
        index.cp.min_points_per_centroid = 1  # small datastores: train anyway, quietly
        index.pq.cp.min_points_per_centroid = 1
        index.train(train)
        for start in range(0, n, 65536):
            index.add(np.ascontiguousarray(self._keys_np[start : start + 65536], dtype=np.float32))
        imeta = {
            "format": _INDEX_FORMAT,
            "version": FORMAT_VERSION,
            "factory": f"IVF{nlist},PQ{m}x{nbits}",
            "metric": metric,
            "count": n,
            "keys_sha256": self.meta["sha256"]["keys.bin"],
        }
        dest = self.path / "index.faiss"
        if dest.exists() and not overwrite:
            raise InvalidInputError(f"{str(dest)!r} already exists; pass overwrite=True")
        fd, tmp_index = tempfile.mkstemp(prefix=".index.faiss.", dir=self.path)
        os.close(fd)
        fd, tmp_meta = tempfile.mkstemp(prefix=".index.json.", dir=self.path)
        os.close(fd)
        try:
            faiss.write_index(index, tmp_index)
            imeta["sha256"] = _sha256(Path(tmp_index))
            with open(tmp_meta, "w", encoding="utf-8") as f:
                json.dump(imeta, f, indent=1)
            # index.json is renamed last: an index.faiss without a matching index.json is rejected.
            os.replace(tmp_index, dest)
            os.replace(tmp_meta, self.path / "index.json")
            _fsync_dir(self.path)
        finally:
            for t in (tmp_index, tmp_meta):
                if os.path.exists(t):
                    os.unlink(t)
        self._index, self._index_meta = index, imeta

    def drop_index(self) -> None:
        """Forget the loaded index (the files stay); :meth:`search` goes back to exact search."""
        self._index, self._index_meta = None, None

    def _load_index(self) -> None:
        faiss = _import_faiss()
        meta_path = self.path / "index.json"
        try:
            with open(meta_path, encoding="utf-8") as f:
                imeta = json.load(f)
        except (OSError, ValueError) as e:
            raise FileFormatError(f"{str(meta_path)!r}: missing or unreadable index metadata ({e})") from None
        if not isinstance(imeta, dict) or imeta.get("format") != _INDEX_FORMAT or imeta.get("version") != FORMAT_VERSION:
            raise FileFormatError(f"{str(meta_path)!r}: not a kcore datastore index of version {FORMAT_VERSION}")
        if imeta.get("count") != self.count or imeta.get("keys_sha256") != self.meta["sha256"]["keys.bin"]:
            raise FileFormatError(f"{str(meta_path)!r}: the index was built for other keys; rebuild it")
        if _sha256(self.path / "index.faiss") != imeta.get("sha256"):
            raise FileFormatError(f"{str(self.path / 'index.faiss')!r}: checksum mismatch (corrupted)")
        index = faiss.read_index(str(self.path / "index.faiss"))
        if index.ntotal != self.count or index.d != self.dim:
            raise FileFormatError(f"{str(self.path / 'index.faiss')!r}: holds {index.ntotal} x {index.d}, expected {self.count} x {self.dim}")
        self._index, self._index_meta = index, imeta


def _import_faiss():
    try:
        import faiss
    except ImportError:
        from kcore.errors import BackendUnavailableError

        raise BackendUnavailableError(
            "Datastore indexes need faiss: install it with `pip install kcore[faiss]` (or faiss-cpu)"
        ) from None
    return faiss
