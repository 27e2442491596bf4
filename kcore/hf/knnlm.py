"""kNN-LM and MLP Memory as Hugging Face logits processors.

Both read the key hidden state of the last position from a forward hook on the model (the norm in
front of the last decoder layer's MLP, or the final norm, as the datastore / memory was built),
so no ``output_hidden_states`` is needed: in ``generate()`` the hook fires during the step's
forward pass, before the step's logits processors run. Both return mixed log-probabilities
``log((1 - lmbda) p_LM + lmbda p_mem)``; greedy search, sampling (``softmax(log p) = p``) and beam
search (``log_softmax(log p) = log p``) therefore all act on the mixed distribution. Put them
last in the processor list: processors applied after them (temperature, top-k) act on the mixture.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kcore._native import host_openmp_scope
from kcore.errors import InvalidInputError
from kcore.memory.datastore import key_module

try:  # transformers is an optional dependency of kcore, needed only for this module
    from transformers import LogitsProcessor as _Base
except ImportError:  # pragma: no cover
    _Base = object


class _LastPositionHook:
    """Forward hook keeping the last position's output of a module: ``(batch, hidden)``."""

    def __init__(self, model, key: str):
        module, _ = key_module(model, key)
        self.state: Optional[torch.Tensor] = None
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        self.state = out[:, -1, :].detach()

    def take(self, batch: int) -> torch.Tensor:
        """The state captured in this step's forward; consumed, so a stale one is never reused."""
        state, self.state = self.state, None
        if state is None:
            raise InvalidInputError(
                "no hidden state was captured for this step: the processor's model must run the forward "
                "pass that produced these scores (use it inside model.generate of the same model)"
            )
        if state.shape[0] != batch:
            raise InvalidInputError(f"captured hidden state has batch {state.shape[0]}, scores have batch {batch}")
        return state

    def remove(self) -> None:
        self._handle.remove()


def _check_lmbda(lmbda) -> float:
    if isinstance(lmbda, bool) or not isinstance(lmbda, (int, float)) or not 0.0 <= lmbda <= 1.0:
        raise InvalidInputError(f"lmbda must be a float in [0, 1], got {lmbda!r}")
    return float(lmbda)


def _model_vocab(model) -> int:
    return int(model.get_output_embeddings().weight.shape[0])


def mix_log_probs(lm_logprobs: torch.Tensor, mem_logprobs: torch.Tensor, lmbda: float) -> torch.Tensor:
    """``log((1 - lmbda) exp(lm_logprobs) + lmbda exp(mem_logprobs))``, exact where either side is
    ``-inf`` or ``lmbda`` is 0 or 1. Tensors of the same shape, float32; returns a new tensor."""
    if lmbda == 0.0:
        return lm_logprobs.clone()
    if lmbda == 1.0:
        return mem_logprobs.clone()
    return torch.logaddexp(lm_logprobs + math.log1p(-lmbda), mem_logprobs + math.log(lmbda))


def entropy(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each row of ``(batch, vocab)`` log-probabilities: ``(batch,)`` float32."""
    p = log_probs.exp()
    return -(p * log_probs.masked_fill(p == 0, 0.0)).sum(-1)


class KNNLMLogitsProcessor(_Base):
    """kNN-LM (Khandelwal et al., ICLR 2020) inside ``model.generate()``.

    At every step the last position's key hidden state ``(batch, dim)`` is searched in the
    datastore (``k`` nearest by squared L2), the neighbours' distribution
    ``p_knn = softmax(-dist / temperature)`` summed per token is mixed with the model's:
    ``log p = log((1 - lmbda) p_LM + lmbda p_knn)`` (:func:`kcore.ops.knn_interpolate`). The
    returned scores ``(batch, vocab)`` float32 are these log-probabilities.

    Adaptive retrieval (after He, Neubig & Berg-Kirkpatrick, "Efficient Nearest Neighbor Language
    Models", EMNLP 2021, who learn when to retrieve; here the LM entropy is the signal): with
    ``adaptive_entropy`` set, rows whose LM entropy (nats) is below it keep ``log_softmax`` of the
    model's scores and skip the search. ``searched_rows`` / ``total_rows`` count rows and
    ``skipped_share`` is the share skipped so far (:meth:`reset_stats` zeroes them).

    Args:
        model: the Hugging Face causal LM that will generate (Llama or GPT-2 family).
        datastore: a :class:`kcore.memory.Datastore` built with this model (same key kind,
            hidden size and vocabulary size).
        k: neighbours per step (>= 1).
        lmbda: weight of the kNN distribution in [0, 1].
        temperature: softmax temperature of the negative squared distances (> 0).
        adaptive_entropy: entropy threshold in nats (>= 0) or None (always search).
        search_kwargs: extra arguments of :meth:`Datastore.search`, only ``exact``, ``nprobe``,
            ``rerank`` and ``backend`` (the metric is squared L2, ``k`` is the argument above).

    Raises:
        InvalidInputError: bad arguments, or a datastore whose dimension / vocabulary differs from
            the model's.

    Call :meth:`remove` to detach the hook.
    """

    def __init__(self, model, datastore, *, k: int = 1024, lmbda: float = 0.25, temperature: float = 1.0,
                 adaptive_entropy: Optional[float] = None, search_kwargs: Optional[dict] = None):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError(f"k must be an int >= 1, got {k!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise InvalidInputError(f"temperature must be a finite float > 0, got {temperature!r}")
        if adaptive_entropy is not None and not (isinstance(adaptive_entropy, (int, float)) and adaptive_entropy >= 0):
            raise InvalidInputError(f"adaptive_entropy must be None or a float >= 0 (nats), got {adaptive_entropy!r}")
        hidden = int(getattr(model.config, "hidden_size", getattr(model.config, "n_embd", -1)))
        if datastore.dim != hidden:
            raise InvalidInputError(f"datastore key dimension {datastore.dim} differs from the model's hidden size {hidden}")
        if datastore.vocab_size != _model_vocab(model):
            raise InvalidInputError(
                f"datastore vocab_size {datastore.vocab_size} differs from the model's {_model_vocab(model)}"
            )
        self.datastore = datastore
        self.k, self.lmbda, self.temperature = k, _check_lmbda(lmbda), float(temperature)
        self.adaptive_entropy = None if adaptive_entropy is None else float(adaptive_entropy)
        self.search_kwargs = dict(search_kwargs or {})
        # kNN-LM's p_knn = softmax(-dist / T) needs squared L2 distances: an "ip" metric would
        # weight the farthest neighbours most.
        unknown = set(self.search_kwargs) - {"exact", "nprobe", "rerank", "backend"}
        if unknown:
            raise InvalidInputError(
                f"search_kwargs may hold exact, nprobe, rerank and backend, got {sorted(unknown)}"
            )
        self._hook = _LastPositionHook(model, datastore.key)
        self.reset_stats()

    def reset_stats(self) -> None:
        self.total_rows = 0
        self.searched_rows = 0

    @property
    def skipped_share(self) -> float:
        """Share of rows (steps x batch) that skipped the search; 0.0 before any step."""
        return 0.0 if self.total_rows == 0 else 1.0 - self.searched_rows / self.total_rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # Runs right after the model's forward pass: the native kernels use torch's OpenMP team.
        with host_openmp_scope():
            return self._call(input_ids, scores)

    def _call(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        from kcore.ops import knn_interpolate

        batch = scores.shape[0]
        state = self._hook.take(batch)
        self.total_rows += batch
        rows = torch.arange(batch, device=scores.device)
        if self.adaptive_entropy is not None:
            lm_logp = torch.log_softmax(scores.float(), dim=-1)
            out = lm_logp
            rows = rows[entropy(lm_logp) >= self.adaptive_entropy]
            if rows.numel() == 0:
                return out
        else:
            out = None
        self.searched_rows += int(rows.numel())
        queries = state[rows.to(state.device)].float().cpu()
        dists, ids = self.datastore.search(queries, self.k, **self.search_kwargs)
        tokens = self.datastore.neighbour_tokens(ids)
        # softmax(-dist / T) is unchanged by a per-row shift; without it a small temperature
        # overflows -dist / T to -inf for every neighbour and the mixture becomes NaN.
        nearest = dists.min(dim=-1, keepdim=True).values
        dists = dists - torch.where(torch.isfinite(nearest), nearest, torch.zeros_like(nearest))
        mixed = knn_interpolate(
            scores[rows].float().cpu(), dists, tokens, lmbda=self.lmbda, temperature=self.temperature
        ).to(scores.device)
        if out is None:
            return mixed
        out = out.clone()
        out[rows] = mixed
        return out

    def remove(self) -> None:
        """Detach the forward hook from the model (the processor is unusable afterwards)."""
        self._hook.remove()


class MLPMemoryLogitsProcessor(_Base):
    """MLP Memory (an MLP trained to imitate the kNN-LM distribution) inside ``model.generate()``.

    At every step the last position's key hidden state goes through ``mlp_memory``
    (:class:`kcore.memory.MLPMemory`) and its distribution is mixed with the model's like kNN-LM:
    ``log p = log((1 - lmbda) p_LM + lmbda p_MLP)``; returns ``(batch, vocab)`` float32
    log-probabilities. The MLP runs on its own device (move it next to the model for speed).

    Args:
        model: the Hugging Face causal LM (the MLP Memory's hidden and vocabulary sizes).
        mlp_memory: a trained :class:`kcore.memory.MLPMemory`.
        lmbda: weight of the MLP distribution in [0, 1].

    Raises:
        InvalidInputError: bad ``lmbda`` or sizes that differ from the model's.

    Call :meth:`remove` to detach the hook.
    """

    def __init__(self, model, mlp_memory, *, lmbda: float = 0.25):
        cfg = mlp_memory.config
        hidden = int(getattr(model.config, "hidden_size", getattr(model.config, "n_embd", -1)))
        if cfg["in_dim"] != hidden:
            raise InvalidInputError(f"MLP Memory input dimension {cfg['in_dim']} differs from the model's hidden size {hidden}")
        if cfg["vocab_size"] != _model_vocab(model):
            raise InvalidInputError(f"MLP Memory vocab_size {cfg['vocab_size']} differs from the model's {_model_vocab(model)}")
        self.mlp_memory = mlp_memory
        self.lmbda = _check_lmbda(lmbda)
        self._hook = _LastPositionHook(model, cfg["key"])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = self._hook.take(scores.shape[0])
        lm_logp = torch.log_softmax(scores.float(), dim=-1)
        if self.lmbda == 0.0:
            return lm_logp
        device = next(self.mlp_memory.parameters()).device
        with torch.no_grad():
            mem_logp = self.mlp_memory.log_probs(state.to(device).float()).to(scores.device)
        return mix_log_probs(lm_logp, mem_logp, self.lmbda)

    def remove(self) -> None:
        """Detach the forward hook from the model."""
        self._hook.remove()
