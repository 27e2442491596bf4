"""The fact matcher: per-row state of fact-constrained decoding, in native code.

:class:`FactMatcher` holds, for each of ``batch_size`` row slots, where the row is in the
ReFactX protocol (Pezzotti et al. 2025, arXiv 2508.16983): free text until its tokens end with the
trigger (``"Fact:"``, any tokenization: :func:`trigger_token_sequences`), then only continuations
of facts stored in a :class:`kcore.FactTrie`, then the terminator (``"\\n"``) once the fact is
complete, then free text again; with ``avoid_duplicates`` a row cannot write a fact twice. The API
is the one of xgrammar's ``GrammarMatcher`` / ``BatchGrammarMatcher`` (Dong et al. 2024): accept
tokens, fill the next-token bitmask (int32 ``[rows, ceil(V / 32)]``, the format of xgrammar and
llguidance), fork, reset, rollback. The state machine is C++ (csrc/core/fact_matcher.cpp); every
call is one native call over the rows it names, and no call rescans a row's tokens.

:class:`kcore.hf.FactLogitsProcessor`, :func:`kcore.hf.prefix_allowed_tokens_fn` and
:func:`kcore.hf.extract_facts` are adapters over it; use it directly when you drive decoding
yourself (a serving engine, speculative decoding, a custom sampling loop).
"""

from __future__ import annotations

import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from kcore._native import native
from kcore.errors import InvalidInputError, TokenizerMismatchError

__all__ = ["FactMatcher", "trigger_token_sequences"]

# Per-tokenizer data that costs up to a second to compute (decoding every token, hashing the
# vocabulary, finding every spelling of the trigger), shared by every matcher built for the same
# tokenizer object; recomputed when the tokenizer grows.
_TOKENIZER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(tokenizer, key, compute):
    try:
        entry = _TOKENIZER_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable or not hashable: no caching
        return compute()
    if key not in entry or entry[key][0] != len(tokenizer):
        entry[key] = (len(tokenizer), compute())
    return entry[key][1]


def _token_strings(tokenizer) -> List[str]:
    def compute():
        return tokenizer.batch_decode([[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False)

    return _cached(tokenizer, "strings", compute)


def _fingerprint(tokenizer) -> str:
    from kcore.tokenizer import tokenizer_fingerprint

    return _cached(tokenizer, "fingerprint", lambda: tokenizer_fingerprint(tokenizer))


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def trigger_token_sequences(tokenizer, trigger: str, *, token_strings: Optional[Sequence[str]] = None) -> List[Tuple[int, ...]]:
    """Every token-id sequence by which ``tokenizer``'s tokens can spell ``trigger``.

    A sequence matches when its first token's text ends with a non-empty prefix of ``trigger``
    (preceded, inside that token, by nothing or by a character that is not a letter or digit, so
    ``" Fact"`` and ``"\\nFact"`` count but ``"Artifact"`` does not), the following tokens spell the
    rest exactly, and the trigger ends at a token boundary. This covers ``"Fact:"``,
    ``" Fact:"``, ``"\\nFact:"`` and split forms such as ``"F" "act" ":"``.

    Returns:
        sorted list of token-id tuples (length 1 .. ``len(trigger)``).

    Raises:
        InvalidInputError: empty trigger, or no way to spell it with this tokenizer.
    """
    if not isinstance(trigger, str) or not trigger:
        raise InvalidInputError(f"trigger must be a non-empty string, got {trigger!r}")
    strings = list(token_strings) if token_strings is not None else _token_strings(tokenizer)
    n = len(trigger)
    exact: Dict[str, List[int]] = {}
    starts: List[Tuple[int, int]] = []  # (token id, length j of the trigger prefix it ends with)
    for tid, s in enumerate(strings):
        if not s:
            continue
        if s in trigger:
            exact.setdefault(s, []).append(tid)
        for j in range(1, n + 1):
            if s.endswith(trigger[:j]) and (len(s) == j or not s[-j - 1].isalnum()):
                starts.append((tid, j))
    # ways[p]: every token sequence spelling exactly trigger[p:].
    ways: Dict[int, List[Tuple[int, ...]]] = {n: [()]}
    for p in range(n - 1, 0, -1):
        ways[p] = [(tid,) + rest for q in range(p + 1, n + 1) for tid in exact.get(trigger[p:q], ()) for rest in ways[q]]
    seqs = sorted({(tid,) + rest for tid, j in starts for rest in ways[j]})
    if not seqs:
        raise InvalidInputError(f"trigger {trigger!r} cannot be spelled with this tokenizer's tokens")
    return seqs


def _end_tokens(tokenizer, terminator: str) -> List[int]:
    """Tokens that close a fact in text written without the mask: every token whose text holds
    the terminator (``"\\nFact"``, ``".\\n"``) and every special token (EOS, chat markers)."""

    def compute():
        strings = _token_strings(tokenizer)
        special = [int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None]
        return sorted({i for i, s in enumerate(strings) if terminator in s} | set(special))

    return _cached(tokenizer, ("end", terminator), compute)


def _is_torch(x) -> bool:
    return type(x).__module__.startswith("torch")


def _ids(x, name: str):
    """Row or token ids as something the binding converts to int64 without a Python loop."""
    if isinstance(x, np.ndarray) or isinstance(x, (list, tuple)):
        return x
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        return [int(x)]
    if _is_torch(x):
        return x.detach().cpu().numpy()
    if isinstance(x, range):
        return np.arange(x.start, x.stop, x.step, dtype=np.int64)
    raise InvalidInputError(f"{name} must be a list, range, numpy array or tensor of ints, got {type(x).__name__}")


class FactMatcher:
    """Native state of fact-constrained decoding for ``batch_size`` rows over one trie.

    Args:
        trie: a :class:`kcore.FactTrie` built for ``tokenizer`` (its tokenizer fingerprint, when
            recorded, is checked). One trie may be shared by any number of matchers and threads.
        tokenizer: the model's Hugging Face tokenizer (or any object with ``__len__``,
            ``batch_decode`` and ``__call__(text, add_special_tokens=False)``).
        batch_size: row slots, numbered ``0 .. batch_size - 1``.
        trigger: text that opens a fact (every tokenization of it, including one whose first token
            also holds the text before it, e.g. ``" Fact"`` or ``"\\nFact"``).
        terminator: text forced after a complete fact (its token ids as the tokenizer encodes it).
        avoid_duplicates: a row cannot write the same fact twice (ReFactX's leaf counts): branches
            whose facts are all written are masked; a dead end allows only the terminator.
        max_rollback_tokens: how many of its last tokens each row can undo with :meth:`rollback`
            (history kept per row; :meth:`fork` copies it, so keep it small).
        stop_token_ids: tokens that terminate a row when accepted in free text (default: the
            tokenizer's ``eos_token_id``); a terminated row refuses further tokens (strict
            accepts) and is not constrained. Prompts (:meth:`prefill`) never terminate a row.

    Attributes:
        batch_size, vocab_size (token ids the bitmask covers: ``trie.vocab_size``),
        bitmask_words (``ceil(vocab_size / 32)``), trie, trigger, terminator, terminator_ids,
        avoid_duplicates, max_rollback_tokens.

    Token positions: each row counts the tokens accepted since its last :meth:`reset` /
    :meth:`prefill`; :meth:`written_facts` spans use these positions.

    Thread safety: the trie is immutable and shared; a matcher must be driven by one thread at a
    time (calls do not lock). Calls hold the GIL unless their work is large (>= 2^23 rows x words).

    Raises (construction):
        InvalidInputError: a trie that is not a :class:`kcore.FactTrie`, a bad ``batch_size``,
            empty trigger or terminator, a trigger the tokenizer cannot spell, terminator ids
            outside the trie's vocabulary.
        TokenizerMismatchError: the trie was built for another tokenizer.

    Sources: ReFactX (Pezzotti et al. 2025) for the protocol; xgrammar (Dong et al. 2024,
    mlc-ai/xgrammar ``GrammarMatcher``) for the matcher API and bitmask format.
    """

    def __init__(self, trie, tokenizer, batch_size: int, *, trigger: str = "Fact:", terminator: str = "\n",
                 avoid_duplicates: bool = True, max_rollback_tokens: int = 16,
                 stop_token_ids: Optional[Sequence[int]] = None):
        handle = getattr(trie, "_t", None)
        if handle is None or not isinstance(handle, native().Trie):
            raise InvalidInputError(f"trie must be a kcore.FactTrie, got {type(trie).__name__}")
        for name, v in (("batch_size", batch_size), ("max_rollback_tokens", max_rollback_tokens)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise InvalidInputError(f"{name} must be an int >= 0, got {v!r}")
        fingerprint = trie.tokenizer_fingerprint
        if fingerprint and _fingerprint(tokenizer) != fingerprint:
            raise TokenizerMismatchError(
                "tokenizer does not match the trie: the trie was built for tokenizer fingerprint "
                f"{fingerprint[:12]}..., this tokenizer's is {_fingerprint(tokenizer)[:12]}..."
            )
        if not isinstance(terminator, str) or not terminator:
            raise InvalidInputError(f"terminator must be a non-empty string, got {terminator!r}")
        term = _encode(tokenizer, terminator)
        vocab = int(trie.vocab_size)
        if not term or max(term) >= vocab or min(term) < 0:
            raise InvalidInputError(
                f"terminator {terminator!r} encodes to {term}, which must be non-empty ids < trie.vocab_size={vocab}"
            )
        triggers = _cached(tokenizer, ("trigger", trigger), lambda: trigger_token_sequences(tokenizer, trigger))
        if stop_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            stop_token_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        stop = [int(t) for t in stop_token_ids]
        self._m = native().FactMatcher(trie._t, [list(s) for s in triggers], term, _end_tokens(tokenizer, terminator),
                                       stop, bool(avoid_duplicates), int(max_rollback_tokens), int(batch_size))
        self.trie = trie
        self.trigger = trigger
        self.terminator = terminator
        self.terminator_ids: Tuple[int, ...] = tuple(term)
        self.trigger_sequences: List[Tuple[int, ...]] = triggers
        self.batch_size = int(batch_size)
        self.vocab_size = vocab
        self.bitmask_words = (vocab + 31) // 32
        self.avoid_duplicates = bool(avoid_duplicates)
        self.max_rollback_tokens = int(max_rollback_tokens)
        self._bitmask_tensor = None  # the last torch bitmask seen and its numpy view (see _bitmask)
        self._bitmask_view = None
        self._bitmask_ptr = 0

    def __repr__(self) -> str:
        return (f"FactMatcher(batch_size={self.batch_size}, vocab_size={self.vocab_size}, trigger={self.trigger!r}, "
                f"terminator={self.terminator!r}, avoid_duplicates={self.avoid_duplicates})")

    # -- bitmask -------------------------------------------------------------------------------
    def allocate_bitmask(self, n: Optional[int] = None):
        """An int32 CPU torch tensor ``[n or batch_size, bitmask_words]`` with every bit set (all
        tokens allowed), for :meth:`fill_next_token_bitmask`."""
        import torch

        rows = self.batch_size if n is None else n
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 0:
            raise InvalidInputError(f"n must be an int >= 0, got {n!r}")
        return torch.full((int(rows), self.bitmask_words), -1, dtype=torch.int32)

    def _bitmask(self, bitmask):
        if isinstance(bitmask, np.ndarray):
            return bitmask
        if bitmask is self._bitmask_tensor and bitmask.data_ptr() == self._bitmask_ptr:
            return self._bitmask_view  # the common case: the same tensor every step
        if not _is_torch(bitmask):
            raise InvalidInputError(f"bitmask must be an int32 torch tensor or numpy array, got {type(bitmask).__name__}")
        import torch

        if bitmask.device.type != "cpu" or bitmask.dtype != torch.int32:
            raise InvalidInputError(
                f"bitmask must be an int32 tensor in CPU memory (copy it to the GPU after filling), got "
                f"{bitmask.dtype} on {bitmask.device}"
            )
        view = bitmask.numpy()  # shares memory; the binding checks shape and layout
        self._bitmask_tensor, self._bitmask_view, self._bitmask_ptr = bitmask, view, bitmask.data_ptr()
        return view

    def fill_next_token_bitmask(self, bitmask, rows=None) -> np.ndarray:
        """Write the allowed next tokens of each constrained row into ``bitmask``.

        Args:
            bitmask: int32 ``[>= n, >= bitmask_words]``, a CPU torch tensor or numpy array,
                C-contiguous, written in place: row ``i`` of the call at ``bitmask[i]`` (bit
                ``t % 32`` of word ``t // 32`` set = token ``t`` allowed).
            rows: the matcher rows (ints, ``[n]``), or None for ``0 .. batch_size - 1``.

        Returns:
            bool numpy array ``[n]``: True where the row is constrained (inside a fact or forcing
            the terminator) and its bitmask row was written. Free-text and terminated rows are
            not written (their bitmask rows keep what they held): mask only the constrained rows
            (``kcore.ops.apply_token_bitmask_(logits, bitmask, indices=...)``).

        Raises:
            InvalidInputError: bitmask of the wrong dtype, rank, layout, device or size; a row out
                of range.
        """
        return self._m.fill_next_token_bitmask(self._bitmask(bitmask), None if rows is None else _ids(rows, "rows"))

    # -- tokens ----------------------------------------------------------------------------------
    def accept_tokens(self, rows, tokens, *, strict: bool = True) -> None:
        """Advance ``rows[i]`` by ``tokens[i]`` (ints ``[n]``, rows distinct), in one native call.

        With ``strict`` (default), a token the row's mask forbids (or any token after the row
        terminated) raises :class:`kcore.InvalidInputError` naming row and token, and no row of
        the call changes (all tokens are checked before any row moves). ``strict=False`` never
        refuses (text written without the mask, e.g. after another processor changed the
        choice): a forbidden token inside a fact leaves only the terminator allowed, unless it is
        an end token (the terminator's first token, a token whose text holds the terminator, a
        special token), which closes the fact.

        Raises:
            InvalidInputError: refused token, negative token id, row out of range or repeated,
                ``rows`` and ``tokens`` of different lengths.
        """
        self._m.accept_tokens(_ids(rows, "rows"), _ids(tokens, "tokens"), strict)

    def accept_token(self, row: int, token: int, *, strict: bool = True) -> None:
        """:meth:`accept_tokens` for one row."""
        self._m.accept_token(row, token, strict)

    def accept_token_sequence(self, row: int, tokens, *, strict: bool = True) -> None:
        """Advance one row by a run of tokens (ints ``[L]``) in one native call (a draft to verify,
        text written earlier). With ``strict``, all or nothing: a refused token raises
        :class:`kcore.InvalidInputError` naming its index and leaves the row as it was."""
        self._m.accept_token_sequence(row, _ids(tokens, "tokens"), strict)

    def is_allowed(self, row: int, token: int) -> bool:
        """Whether the row's mask allows ``token`` now (without filling a bitmask)."""
        return self._m.is_allowed(row, token)

    def prefill(self, row: int, token_ids) -> None:
        """Feed prompt tokens (ints ``[L]``) to ``row``: trigger detection and any fact the prompt
        opens (a prompt ending with the trigger puts the row inside a fact). Never refuses a
        token. Facts written inside the prompt are forgotten (they do not count as written), and
        so is the rollback history; positions restart at 0. Call :meth:`reset` first for a new
        sequence; prefilling twice continues from the first prompt (chunked prefill)."""
        self._m.prefill(row, _ids(token_ids, "token_ids"))

    # -- rows ------------------------------------------------------------------------------------
    def fork(self, src_rows, dst_rows) -> None:
        """``dst_rows[i]`` takes the state of ``src_rows[i]`` (as it was before the call: a gather,
        so any re-ordering of the rows onto themselves works; beam search, ``num_return_sequences``).
        ``dst_rows`` must be distinct. O(rows x (facts written + max_rollback_tokens))."""
        self._m.fork(_ids(src_rows, "src_rows"), _ids(dst_rows, "dst_rows"))

    def resize(self, batch_size: int) -> None:
        """Change the number of row slots: rows below ``min(old, new)`` keep their state, new rows
        start in free text (a serving engine's growing batch)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise InvalidInputError(f"batch_size must be an int >= 0, got {batch_size!r}")
        self._m.resize(int(batch_size))
        self.batch_size = int(batch_size)

    def reset(self, rows=None) -> None:
        """Back to free text with nothing written, position 0 (``rows=None``: every row)."""
        self._m.reset(None if rows is None else _ids(rows, "rows"))

    def rollback(self, row: int, n: int) -> None:
        """Undo the last ``n`` tokens accepted by ``row`` (speculative decoding), facts they closed
        included. Raises InvalidInputError when ``n`` exceeds :meth:`rollback_available`."""
        self._m.rollback(row, n)

    def rollback_available(self, row: int) -> int:
        """How many tokens :meth:`rollback` can undo now (<= ``max_rollback_tokens``)."""
        return self._m.rollback_available(row)

    def is_in_fact(self, rows=None) -> np.ndarray:
        """bool ``[n]``: rows inside a fact (constrained by the trie)."""
        return self._m.is_in_fact(None if rows is None else _ids(rows, "rows"))

    def is_terminated(self, rows=None) -> np.ndarray:
        """bool ``[n]``: rows that accepted a stop token in free text."""
        return self._m.is_terminated(None if rows is None else _ids(rows, "rows"))

    def written_facts(self, row: int) -> List[Tuple[int, int, int]]:
        """The facts ``row`` closed since its last reset / prefill, in order, as ``(fact_id,
        start, end)``: ``fact_id`` the trie's id of the fact (its rank in lexicographic token
        order; -1 when the span is not a complete fact, e.g. a dead end) and the token span
        ``[start, end)`` in row positions (the fact's tokens, without trigger and terminator). A
        fact opened inside the prompt has a negative ``start``."""
        return self._m.written_facts(row)

    def open_fact(self, row: int) -> Optional[Tuple[int, int]]:
        """``(start, end)`` of the fact ``row`` is writing (inside a fact), else None."""
        return self._m.open_fact(row)

    def same_state(self, a: int, b: int) -> bool:
        """True when rows ``a`` and ``b`` will treat every future token alike."""
        return self._m.same_state(a, b)
