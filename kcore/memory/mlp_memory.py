"""MLP Memory: an MLP trained to imitate the kNN-LM distribution, so no search runs at inference.

After "MLP Memory: A Retriever-Pretrained Memory for Large Language Models" (Binn0/MLPMemory): a
stack of pre-norm MLP blocks reads the same hidden state as kNN-LM and outputs next-token logits;
it is trained with ``alpha * KL(p_knn || p_mlp) + (1 - alpha) * cross-entropy(next token)`` where
``p_knn`` comes from a kNN search of each datastore key over the datastore with the key's own
entry dropped. At inference it is mixed with the LM like kNN-LM
(:class:`kcore.hf.MLPMemoryLogitsProcessor`).

kcore's variant can restrict the output layer to the tokens that occur as datastore values
(``vocab="datastore"``): the kNN distribution has no mass elsewhere, and the output layer, the
largest part of the cost, shrinks from the full vocabulary to those tokens.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from kcore.errors import FileFormatError, InvalidInputError, TokenizerMismatchError

FORMAT_NAME = "kcore-mlp-memory"
FORMAT_VERSION = 1


class _Block(nn.Module):
    """Pre-norm MLP block: ``x + W2 gelu(W1 rmsnorm(x))``."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return x + self.down(nn.functional.gelu(self.up(self.norm(x))))


class MLPMemory(nn.Module):
    """Stack of pre-norm MLP blocks mapping a key hidden state to next-token logits.

    ``h (batch, in_dim) -> rmsnorm -> Linear(in_dim, width) -> depth x [pre-norm MLP block of
    hidden width * expansion] -> rmsnorm -> Linear(width, num_outputs)``. The outputs are the
    tokens ``token_ids`` (a buffer, ``(num_outputs,)`` int64 sorted ids in ``[0, vocab_size)``; the
    whole vocabulary by default).

    Args:
        in_dim: hidden size of the LM (the key dimension).
        vocab_size: the LM's vocabulary size.
        width: block width. depth: number of blocks (>= 0). expansion: hidden width / width.
        token_ids: output tokens (None: all ``vocab_size``).
        key: the key kind it reads (``"mlp_input"`` or ``"final_norm"``), as in the datastore.
        meta: free-form provenance stored in the file (model, tokenizer fingerprint, ...).

    Raises:
        InvalidInputError: non-positive sizes or token ids out of range / unsorted / repeated.
    """

    def __init__(self, in_dim: int, vocab_size: int, *, width: int = 256, depth: int = 2, expansion: int = 4,
                 token_ids: Optional[torch.Tensor] = None, key: str = "mlp_input", meta: Optional[dict] = None):
        super().__init__()
        for name, v, lo in (("in_dim", in_dim, 1), ("vocab_size", vocab_size, 1), ("width", width, 1),
                            ("depth", depth, 0), ("expansion", expansion, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise InvalidInputError(f"{name} must be an int >= {lo}, got {v!r}")
        if token_ids is None:
            token_ids = torch.arange(vocab_size)
        token_ids = torch.as_tensor(token_ids, dtype=torch.int64).flatten()
        if token_ids.numel() == 0 or int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab_size:
            raise InvalidInputError(f"token_ids must be non-empty ids in [0, {vocab_size})")
        if token_ids.numel() > 1 and not bool((token_ids[1:] > token_ids[:-1]).all()):
            raise InvalidInputError("token_ids must be sorted and unique")
        self.config = {
            "in_dim": in_dim, "vocab_size": vocab_size, "width": width, "depth": depth, "expansion": expansion,
            "num_outputs": int(token_ids.numel()), "key": key, "meta": dict(meta or {}),
        }
        self.register_buffer("token_ids", token_ids)
        self.in_norm = nn.RMSNorm(in_dim, eps=1e-6)
        self.proj = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(_Block(width, width * expansion) for _ in range(depth))
        self.out_norm = nn.RMSNorm(width, eps=1e-6)
        self.out = nn.Linear(width, int(token_ids.numel()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(batch, in_dim)`` float -> ``(batch, num_outputs)`` logits over ``token_ids``."""
        x = self.proj(self.in_norm(hidden))
        for block in self.blocks:
            x = block(x)
        return self.out(self.out_norm(x))

    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(batch, in_dim)`` -> ``(batch, vocab_size)`` float32 log-probabilities over the full
        vocabulary (``-inf`` for tokens outside ``token_ids``)."""
        if hidden.dim() != 2 or hidden.shape[1] != self.config["in_dim"]:
            raise InvalidInputError(f"hidden must have shape (batch, {self.config['in_dim']}), got {tuple(hidden.shape)}")
        local = torch.log_softmax(self(hidden).float(), dim=-1)
        if self.config["num_outputs"] == self.config["vocab_size"]:
            return local
        full = torch.full((hidden.shape[0], self.config["vocab_size"]), -math.inf, device=local.device)
        full[:, self.token_ids] = local
        return full

    def flops_per_token(self) -> int:
        """Multiply-adds x 2 of one forward row (the linear layers; norms and GELU ignored)."""
        return 2 * sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))

    # ---------------------------------------------------------------- files

    def save(self, path) -> None:
        """Write weights and config to one safetensors file (config as JSON in its metadata),
        atomically (temp file + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.state_dict().items()}
        meta = {"format": FORMAT_NAME, "version": str(FORMAT_VERSION), "config": json.dumps(self.config),
                "sha256": _tensors_sha256(tensors)}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path, *, hidden_size: Optional[int] = None, vocab_size: Optional[int] = None,
             tokenizer=None, map_location="cpu") -> "MLPMemory":
        """Read a file written by :meth:`save`, validated.

        Raises:
            FileFormatError: not a kcore MLP Memory file, unknown version, tensor bytes that do not
                match the SHA-256 stored by :meth:`save` (files written before the checksum was
                stored are read without it), or tensors that do not match the stored config.
            InvalidInputError: ``hidden_size`` differs from the stored input dimension.
            TokenizerMismatchError: ``vocab_size`` or the tokenizer's fingerprint differs.
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            tensors = load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises several types for a bad header
            raise FileFormatError(f"{str(path)!r}: not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT_NAME:
            raise FileFormatError(f"{str(path)!r}: not a kcore MLP Memory file (format {meta.get('format')!r})")
        # safetensors checks the header, not the bytes: a flipped weight would load silently.
        if "sha256" in meta and meta["sha256"] != _tensors_sha256(tensors):
            raise FileFormatError(f"{str(path)!r}: tensor data checksum mismatch (corrupted)")
        if meta.get("version") != str(FORMAT_VERSION):
            raise FileFormatError(f"{str(path)!r}: format version {meta.get('version')!r}, this kcore reads {FORMAT_VERSION}")
        try:
            cfg = json.loads(meta["config"])
            model = cls(cfg["in_dim"], cfg["vocab_size"], width=cfg["width"], depth=cfg["depth"],
                        expansion=cfg["expansion"], token_ids=tensors.get("token_ids"), key=cfg["key"], meta=cfg["meta"])
            model.load_state_dict(tensors, strict=True)
        except (KeyError, TypeError, ValueError, RuntimeError, InvalidInputError) as e:
            raise FileFormatError(f"{str(path)!r}: tensors do not match the stored config ({e})") from None
        if hidden_size is not None and int(hidden_size) != cfg["in_dim"]:
            raise InvalidInputError(f"MLP Memory {str(path)!r} reads dimension {cfg['in_dim']}, expected hidden_size {hidden_size}")
        if vocab_size is not None and int(vocab_size) != cfg["vocab_size"]:
            raise TokenizerMismatchError(f"MLP Memory {str(path)!r} has vocab_size {cfg['vocab_size']}, expected {vocab_size}")
        if tokenizer is not None:
            from kcore.tokenizer import tokenizer_fingerprint

            stored = cfg["meta"].get("tokenizer_fingerprint")
            if stored is not None and stored != tokenizer_fingerprint(tokenizer):
                raise TokenizerMismatchError(f"MLP Memory {str(path)!r} was trained for another tokenizer")
        model.eval()
        return model


def _tensors_sha256(tensors: dict) -> str:
    """SHA-256 over the tensors' names and raw bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode("utf-8"))
        h.update(tensors[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------
# Training


def knn_targets(datastore, *, k: int, temperature: float, batch_size: int = 256, backend: str = "auto",
                progress: bool = False):
    """kNN distribution of every datastore entry over the datastore, its own entry dropped.

    Searches ``k + 1`` neighbours of each key, removes the entry itself (or, if an identical key
    displaced it from the result, the last neighbour) and returns ``(tokens, probs)``: ``(count,
    k)`` int32 neighbour token ids (-1 padding) and float32 ``softmax(-dist / temperature)``
    weights (0 for padding).
    """
    n = datastore.count
    tokens = torch.empty((n, k), dtype=torch.int32)
    probs = torch.empty((n, k), dtype=torch.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, unit="key", desc="kNN targets")
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(n, start + batch_size))
        dists, ids = datastore.search(datastore.keys[rows].float(), k + 1, exact=True, backend=backend)
        own = ids == rows[:, None]
        # Drop the own entry; rows where it is absent drop their last (farthest) neighbour.
        drop = torch.where(own.any(1), own.float().argmax(1), torch.full_like(rows, k))
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[torch.arange(len(rows)), drop] = False
        ids, dists = ids[keep].view(len(rows), k), dists[keep].view(len(rows), k)
        # Shifted by the nearest distance (softmax is shift-invariant): a tiny temperature would
        # otherwise turn every -dist / temperature into -inf and the target into zeros.
        nearest = dists.min(dim=1, keepdim=True).values
        logits = -(dists - torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))) / temperature
        p = torch.softmax(logits.masked_fill(ids < 0, -math.inf), dim=-1)
        tokens[rows] = datastore.neighbour_tokens(ids).to(torch.int32)
        probs[rows] = torch.nan_to_num(p, nan=0.0)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    return tokens, probs


def train_mlp_memory(
    datastore,
    *,
    k: int = 1024,
    temperature: float = 16.0,
    alpha: float = 0.5,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 512,
    width: int = 256,
    depth: int = 2,
    expansion: int = 4,
    vocab: str = "datastore",
    weight_decay: float = 0.01,
    seed: int = 0,
    backend: str = "auto",
    progress: bool = True,
    callback: Optional[Callable[[dict], None]] = None,
    validate: Optional[Callable[["MLPMemory"], float]] = None,
    targets=None,
):
    """Train an :class:`MLPMemory` on a datastore to imitate its kNN-LM distribution.

    For each entry the target is ``p_knn`` of its key over the datastore (``k`` neighbours,
    ``softmax(-squared L2 / temperature)``, own entry dropped; :func:`knn_targets`, searched with
    :func:`kcore.ops.knn_search`) and its stored next token; the loss is
    ``alpha * KL(p_knn || p_mlp) + (1 - alpha) * CE(next token)`` (MLP Memory's objective).
    AdamW with a cosine learning-rate schedule over ``epochs`` passes.

    Args:
        datastore: a :class:`kcore.memory.Datastore`.
        k, temperature: kNN target parameters (k >= 1, temperature > 0).
        alpha: KL weight in [0, 1].
        epochs, lr, batch_size, weight_decay, seed: optimisation.
        width, depth, expansion: MLP shape (see :class:`MLPMemory`).
        vocab: ``"datastore"`` (outputs = tokens occurring as values) or ``"full"``.
        backend: backend of the kNN search.
        progress: print one line per epoch (loss, KL, CE, seconds).
        callback: called with each epoch's stats dict.
        validate: called after each epoch with the model (eval mode, no grad); returns a held-out
            score, lower is better (e.g. dev perplexity of the mixture), recorded as ``val``; the
            weights of the best epoch are restored at the end (early stopping).
        targets: precomputed ``knn_targets(...)`` result (skips the search).

    Returns:
        ``(mlp_memory, history)``: the trained model (eval mode, CPU) and one stats dict per epoch
        (``epoch``, ``loss``, ``kl``, ``ce``, ``seconds``, with ``validate`` also ``val``) plus an
        initial ``epoch=0`` entry measured before training.

    Raises:
        InvalidInputError: bad arguments.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InvalidInputError(f"temperature must be a finite float > 0, got {temperature!r}")
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise InvalidInputError(f"alpha must be in [0, 1], got {alpha!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidInputError(f"epochs must be an int >= 1, got {epochs!r}")
    if vocab not in ("datastore", "full"):
        raise InvalidInputError(f"vocab must be 'datastore' or 'full', got {vocab!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InvalidInputError(f"lr must be a finite float > 0, got {lr!r}")
    torch.manual_seed(seed)
    if targets is None:
        targets = knn_targets(datastore, k=k, temperature=temperature, backend=backend, progress=progress)
    nb_tokens, nb_probs = targets
    if nb_tokens.shape != (datastore.count, k) or nb_probs.shape != (datastore.count, k):
        raise InvalidInputError(f"targets must be two ({datastore.count}, {k}) tensors, got {tuple(nb_tokens.shape)}")
    values = datastore.values.long()
    vs = datastore.vocab_size
    token_ids = torch.unique(values) if vocab == "datastore" else torch.arange(vs)
    local = torch.full((vs,), -1, dtype=torch.long)
    local[token_ids] = torch.arange(len(token_ids))
    meta = {k_: datastore.meta.get(k_) for k_ in ("model", "tokenizer_fingerprint", "layer")}
    meta.update(datastore=str(datastore.path), knn_k=k, knn_temperature=temperature, alpha=alpha)
    model = MLPMemory(datastore.dim, vs, width=width, depth=depth, expansion=expansion, token_ids=token_ids,
                      key=datastore.key, meta=meta)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    n = datastore.count
    steps = epochs * math.ceil(n / batch_size)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))

    def losses(rows):
        h = datastore.keys[rows].float()
        logq = torch.log_softmax(model(h), dim=-1)
        tok = nb_tokens[rows].long()
        p = nb_probs[rows]
        # Dense p_knn over the outputs (repeated tokens add up); padding (-1) has weight 0.
        # Padding maps to output 0 with weight 0 (its clamped token id may be no output: local -1).
        dense = torch.zeros_like(logq).scatter_add_(1, local[tok.clamp_min(0)].clamp_min(0), p * (tok >= 0))
        kl = (torch.xlogy(dense, dense) - dense * logq).sum(-1).mean()
        ce = -logq.gather(1, local[values[rows]][:, None]).mean()
        return alpha * kl + (1 - alpha) * ce, kl, ce

    def evaluate(sample):
        model.eval()
        with torch.no_grad():
            parts = [losses(sample[i : i + batch_size]) for i in range(0, len(sample), batch_size)]
        model.train()
        return [sum(float(p[j]) * min(batch_size, len(sample) - i * batch_size) for i, p in enumerate(parts)) / len(sample)
                for j in range(3)]

    sample = torch.randperm(n)[: min(n, 8192)]
    loss0, kl0, ce0 = evaluate(sample)
    history: List[Dict] = [{"epoch": 0, "loss": loss0, "kl": kl0, "ce": ce0, "seconds": 0.0}]
    if progress:
        print(f"MLP Memory: {sum(p.numel() for p in model.parameters())/1e6:.2f} M parameters, "
              f"{len(token_ids)} outputs; before training loss {loss0:.4f} (KL {kl0:.4f}, CE {ce0:.4f})", flush=True)
    model.train()
    best = None
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        total = kl_sum = ce_sum = 0.0
        order = torch.randperm(n)
        for i in range(0, n, batch_size):
            rows = order[i : i + batch_size]
            loss, kl, ce = losses(rows)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(rows)
            kl_sum += kl.item() * len(rows)
            ce_sum += ce.item() * len(rows)
        stats = {"epoch": epoch, "loss": total / n, "kl": kl_sum / n, "ce": ce_sum / n,
                 "seconds": time.perf_counter() - t0}
        history.append(stats)
        if validate is not None:
            model.eval()
            with torch.no_grad():
                stats["val"] = float(validate(model))
            model.train()
            if best is None or stats["val"] < best[0]:
                best = (stats["val"], epoch, {k_: v.detach().clone() for k_, v in model.state_dict().items()})
        if progress:
            print(f"MLP Memory epoch {epoch}/{epochs}: loss {stats['loss']:.4f} (KL {stats['kl']:.4f}, "
                  f"CE {stats['ce']:.4f})" + (f" val {stats['val']:.4f}" if "val" in stats else "")
                  + f" {stats['seconds']:.1f} s", flush=True)
        if callback is not None:
            callback(stats)
    if best is not None:
        model.load_state_dict(best[2])
        model.config["meta"]["best_epoch"] = best[1]
        if progress:
            print(f"MLP Memory: kept epoch {best[1]} (val {best[0]:.4f})", flush=True)
    model.eval()
    return model, history
