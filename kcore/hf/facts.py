"""Fact-constrained generation inside Hugging Face ``generate()``: adapters over :class:`kcore.FactMatcher`.

The model writes free text until it writes the trigger (``"Fact:"``); from there only token
sequences of facts stored in a :class:`kcore.FactTrie` are allowed; when a fact is complete the
terminator (``"\\n"``) is forced, and free text resumes. Every fact the model writes therefore
exists in the knowledge base. Method: ReFactX (Pezzotti et al. 2025, arXiv 2508.16983); masking
with the int32 token bitmask of xgrammar (Dong et al. 2024).

The state machine is the native :class:`kcore.FactMatcher` (csrc/core/fact_matcher.cpp); this
module only maps HF's calling conventions onto it:

* :class:`FactLogitsProcessor`: HF never tells a logits processor how beam search reordered its
  rows. Each row's parent is found among the previous step's rows by the row's last
  ``_WINDOW`` tokens (one dictionary lookup per row); when several previous rows end alike and
  their matcher states differ, the whole rows are compared (rare). Then one native ``fork`` (only
  when rows moved), one lenient ``accept_tokens``, one ``fill_next_token_bitmask`` and one native
  masking call. O(batch) work per step, nothing proportional to the sequence length.
* :func:`prefix_allowed_tokens_fn`: one matcher row per distinct sequence of the current and the
  previous step, found by the row's bytes.
* :func:`extract_facts`: one lenient pass of a matcher row over each sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from kcore._native import dtype_code, host_openmp_scope, native, tensor_arg
from kcore.errors import InvalidInputError
from kcore.matcher import FactMatcher, _encode, trigger_token_sequences

__all__ = ["FactLogitsProcessor", "prefix_allowed_tokens_fn", "extract_facts", "WrittenFact", "trigger_token_sequences"]

try:  # the processor is a real transformers LogitsProcessor when transformers is installed
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover - kcore.hf is documented as needing transformers
    _LogitsProcessorBase = object

# Tokens of a row compared to find its parent row after beam re-ordering. Any length is correct
# (ties are broken by matcher state, then by whole rows); longer windows make ties rarer.
_WINDOW = 8
_HOST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class FactLogitsProcessor(_LogitsProcessorBase):
    """Hugging Face logits processor: every fact the model writes after the trigger exists in ``trie``.

    Free text until the row's own tokens end with ``trigger`` (any tokenization of it, see
    :func:`trigger_token_sequences`); then only continuations of facts in ``trie``; when the fact
    is complete the ``terminator`` is forced (both the terminator and the longer facts are allowed
    when the fact is also a prefix of others); then free text again. Method: ReFactX (Pezzotti
    et al. 2025), with the bitmask masking of xgrammar. The per-row state is a native
    :class:`kcore.FactMatcher`.

    Args:
        trie: a :class:`kcore.FactTrie` built for ``tokenizer`` (its fingerprint is checked when
            the trie records one). Facts are usually stored with a leading space
            (``FactTrie.from_facts(..., leading_space=True)``) since they follow ``"Fact:"``.
        tokenizer: the model's Hugging Face tokenizer.
        trigger: text that opens a fact.
        terminator: text forced after a complete fact; must not occur inside facts.
        avoid_duplicates: a sequence cannot write the same fact twice (ReFactX's leaf counts):
            branches whose facts are all written already are masked.

    Call: ``processor(input_ids, scores) -> scores``, with ``input_ids`` int64
    ``(batch, seq_len)`` (any device; left padding fine) and ``scores`` float32/float16/bfloat16
    ``(batch, vocab)`` on any device, ``vocab >= trie.vocab_size`` (extra columns of padded
    embeddings are masked in constrained rows). ``scores`` is modified in place and returned.

    Guarantees in constrained rows: only trie continuations (and the terminator where allowed)
    keep their scores, the rest become -inf. A dead end (no continuation left, e.g. every fact
    below the prefix written already) forces the terminator. If every allowed token's score was
    -inf already (another processor banned them), the allowed ones are set to 0 so the row keeps
    a finite, constrained choice: never NaN, never an unconstrained token.

    State: rows are matched to the previous step's rows by their own tokens (see module docs), so
    beam reordering is harmless. A new ``generate()`` call is recognised by a change of batch size
    or a sequence length that is not the previous one + 1; call :meth:`reset` to start over
    explicitly (e.g. when reusing the processor for a prompt exactly one token longer). Tokens the
    mask did not allow (another processor changed the choice) are accepted leniently
    (:meth:`kcore.FactMatcher.accept_tokens` with ``strict=False``).

    Raises (on call):
        InvalidInputError: ``input_ids``/``scores`` of the wrong rank, batch or dtype, or scores
            narrower than ``trie.vocab_size``.
        TokenizerMismatchError (at construction): the trie was built for another tokenizer.
    """

    def __init__(self, trie, tokenizer, *, trigger: str = "Fact:", terminator: str = "\n", avoid_duplicates: bool = True):
        self._kwargs = dict(trigger=trigger, terminator=terminator, avoid_duplicates=avoid_duplicates,
                            max_rollback_tokens=0, stop_token_ids=[])
        # Built now so bad arguments fail at construction; resized to each generation's batch.
        self.matcher = FactMatcher(trie, tokenizer, 0, **self._kwargs)
        self.trie = trie
        self.tokenizer = tokenizer
        self.trigger = trigger
        self.terminator = terminator
        self.terminator_ids = self.matcher.terminator_ids
        self.avoid_duplicates = avoid_duplicates
        self._native = native()
        # Host logits are masked by one native call; False takes the path used for logits on
        # another device (torch ops) also on the host (tests compare the two).
        self._host_apply = True
        self.reset()

    def reset(self) -> None:
        """Forget every sequence seen: the next call starts a new generation."""
        self._length = -1
        self._index: Dict[bytes, List[int]] = {}  # last _WINDOW tokens -> previous rows ending so
        self._ambiguous: Dict[bytes, bool] = {}  # those rows' states differ: compare whole rows
        self._prev_ids: Optional[torch.Tensor] = None
        self._bitmask: Optional[torch.Tensor] = None

    # Row bookkeeping ----------------------------------------------------------------------
    def _start(self, input_ids: torch.Tensor) -> None:
        m = self.matcher
        batch = input_ids.shape[0]
        if m.batch_size != batch:
            m.resize(batch)
        m.reset()
        self._all_rows = np.arange(batch, dtype=np.int64)
        rows = input_ids.detach().cpu().numpy()
        first: Dict[bytes, int] = {}
        src, dst = [], []
        for i, row in enumerate(rows):
            key = row.tobytes()
            g = first.get(key)
            if g is None:  # one prefill per distinct prompt, copied to its other rows
                first[key] = i
                m.prefill(i, row)
            else:
                src.append(g)
                dst.append(i)
        if dst:
            m.fork(src, dst)

    def _advance(self, input_ids: torch.Tensor, tail: np.ndarray) -> None:
        """Move each row to its parent's state plus its new token."""
        m = self.matcher
        batch = tail.shape[0]
        parents = list(range(batch))
        lost = []
        moved = False
        index, ambiguous = self._index, self._ambiguous
        for i, key in enumerate(tail[:, :-1]):
            k = key.tobytes()
            cands = index.get(k)
            if cands is None:
                lost.append(i)
                continue
            if ambiguous.get(k):
                p = self._compare_rows(input_ids, i, cands)
                if p is None:
                    lost.append(i)
                    continue
            else:
                p = i if i in cands else cands[0]
            if p != i:
                parents[i] = p
                moved = True
        if moved:
            m.fork(parents, self._all_rows)
        m.accept_tokens(self._all_rows, tail[:, -1], strict=False)
        for i in lost:  # not a continuation of any row seen: rebuild it from its tokens
            m.reset([i])
            m.prefill(i, input_ids[i].detach().cpu().numpy())

    def _compare_rows(self, input_ids: torch.Tensor, i: int, cands: List[int]) -> Optional[int]:
        prev = self._prev_ids
        if prev is None or prev.shape[1] != input_ids.shape[1] - 1:
            return None
        row = input_ids[i, :-1]
        for c in cands:
            if torch.equal(row, prev[c]):
                return c
        return None

    def _reindex(self, input_ids: torch.Tensor, tail: np.ndarray) -> None:
        index: Dict[bytes, List[int]] = {}
        # Key of a row: its last _WINDOW tokens (all of them when shorter), which is what the
        # next step finds as tail[:, :-1] of its children.
        for i, key in enumerate(tail[:, -_WINDOW:]):
            index.setdefault(key.tobytes(), []).append(i)
        same = self.matcher.same_state
        self._ambiguous = {k: True for k, rows in index.items()
                           if len(rows) > 1 and not all(same(rows[0], r) for r in rows[1:])}
        self._index = index
        self._prev_ids = input_ids if self._ambiguous else None

    # Call ---------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # Runs right after the model's forward pass: the native kernels use torch's OpenMP team.
        with host_openmp_scope():
            return self._call(input_ids, scores)

    def _call(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ishape, sshape = input_ids.shape, scores.shape
        if len(ishape) != 2 or len(sshape) != 2 or ishape[0] != sshape[0]:
            raise InvalidInputError(
                f"input_ids (batch, seq_len) and scores (batch, vocab) must be 2-D with the same batch, "
                f"got {tuple(ishape)} and {tuple(sshape)}"
            )
        batch, length = ishape
        vocab = sshape[1]
        m = self.matcher
        if vocab < m.vocab_size:
            raise InvalidInputError(f"scores must have >= trie.vocab_size={m.vocab_size} columns, got {vocab}")
        # CPU: a zero-copy view; other devices: one transfer of the last columns.
        tail = (input_ids[:, -_WINDOW - 1:] if input_ids.is_cpu else input_ids[:, -_WINDOW - 1:].cpu()).numpy()
        if batch != m.batch_size or length != self._length + 1 or length < 2:
            self._start(input_ids)
        else:
            self._advance(input_ids, tail)
        self._length = length
        self._reindex(input_ids, tail)
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.shape != (batch, words):
            self._bitmask = torch.zeros((batch, words), dtype=torch.int32)
            self._bitmask_np = self._bitmask.numpy()
            self._bitmask_arg = tensor_arg(self._bitmask)
            self._indices = torch.zeros(batch, dtype=torch.int64)
            self._indices_np = self._indices.numpy()
        constrained = m.fill_next_token_bitmask(self._bitmask_np)
        rows = np.flatnonzero(constrained)
        if len(rows):
            self._apply(scores, rows)
        return scores

    def _apply(self, scores: torch.Tensor, rows: np.ndarray) -> None:
        n = len(rows)
        all_rows = n == scores.shape[0]
        if self._host_apply and scores.is_cpu and scores.dtype in _HOST_DTYPES and (scores.stride(1) == 1 or scores.shape[1] == 1):
            # One native call: mask, then keep rows finite (csrc/core/fact_matcher.cpp).
            idx = None
            if not all_rows:
                self._indices_np[:n] = rows
                idx = (self._indices.data_ptr(), dtype_code(torch.int64), (n,), (1,), -1)
            self._native.apply_token_bitmask_keep_finite_cpu(tensor_arg(scores), self._bitmask_arg, idx)
            return
        from kcore.ops.bitmask import apply_token_bitmask_

        rows_list = rows.tolist()
        mask = self._bitmask.to(scores.device, non_blocking=False)
        idx_t = None if all_rows else torch.tensor(rows_list, dtype=torch.int64)
        apply_token_bitmask_(scores, mask, indices=None if all_rows else rows_list)
        # A row whose allowed tokens all had score -inf would sample NaN or an arbitrary token:
        # give its allowed tokens score 0 instead (rare; found by one max per constrained row).
        best = (scores if all_rows else scores[idx_t.to(scores.device)]).amax(dim=1).tolist()
        for b in [k for k, v in enumerate(best) if v == float("-inf")]:
            r = rows_list[b]
            allowed = torch.from_numpy(_unpack(self._bitmask_np[r], scores.shape[1])).to(scores.device)
            scores[r, allowed] = 0


def _unpack(words: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids whose bit is set in one bitmask row (int32 ``(words,)``), below ``vocab``."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def prefix_allowed_tokens_fn(trie, tokenizer, *, trigger: str = "Fact:", terminator: str = "\n",
                             avoid_duplicates: bool = True) -> Callable[[int, torch.Tensor], List[int]]:
    """A function for ``model.generate(prefix_allowed_tokens_fn=...)`` with the same constraint as
    :class:`FactLogitsProcessor` (same arguments).

    HF's ``PrefixConstrainedLogitsProcessor`` calls it once per row and step with
    ``(batch_id, input_ids_row)`` (int64 ``(seq_len,)``) and masks everything but the returned
    token ids; in free text it returns every id of the tokenizer. Each distinct sequence of the
    current and the previous step holds one row of a :class:`kcore.FactMatcher`, found by the
    row's bytes (one hash of the row per call); a new sequence is its parent's row forked plus
    one lenient ``accept_token``. Slower than the logits processor (HF builds the mask row by row
    in Python); offered for code built around ``prefix_allowed_tokens_fn``.
    """
    m = FactMatcher(trie, tokenizer, 16, trigger=trigger, terminator=terminator, avoid_duplicates=avoid_duplicates,
                    max_rollback_tokens=0, stop_token_ids=[])
    everything = list(range(len(tokenizer)))
    bitmask = np.zeros((1, m.bitmask_words), dtype=np.int32)
    # Matcher rows of the sequences seen at the current and the previous length, by their bytes.
    state = {"length": -1, "cur": {}, "prev": {}, "allowed": {}}
    free_rows: List[int] = list(range(m.batch_size))

    def new_row() -> int:
        if not free_rows:
            old = m.batch_size
            m.resize(2 * old)
            free_rows.extend(range(old, 2 * old))
        return free_rows.pop()

    def allowed(batch_id: int, sent: torch.Tensor) -> List[int]:
        row = sent.detach().cpu().numpy()
        if len(row) != state["length"]:
            keep = state["cur"] if len(row) == state["length"] + 1 else {}
            free_rows.extend(r for k, r in state["prev"].items())
            if not keep:
                free_rows.extend(state["cur"].values())
            state["prev"], state["cur"], state["allowed"] = keep, {}, {}
            state["length"] = len(row)
        key = row.tobytes()
        r = state["cur"].get(key)
        if r is None:
            r = new_row()
            parent = state["prev"].get(row[:-1].tobytes()) if len(row) > 1 else None
            if parent is None:
                m.reset([r])
                m.prefill(r, row)
            else:
                m.fork([parent], [r])
                m.accept_token(r, int(row[-1]), strict=False)
            state["cur"][key] = r
        result = state["allowed"].get(r)
        if result is None:
            if not m._m.fill_next_token_bitmask_row(bitmask, r, 0):
                result = everything
            else:
                result = _unpack(bitmask[0], m.vocab_size).tolist()
            state["allowed"][r] = result
        return result

    return allowed


@dataclass(frozen=True)
class WrittenFact:
    """A fact found in generated text: ``row`` (index of the sequence), ``text`` (stripped), its
    ``token_ids`` as generated, ``found`` (True when the fact exists in the trie) and
    ``terminated`` (False when the sequence ended inside the fact, e.g. at ``max_new_tokens``)."""

    row: int
    text: str
    token_ids: Tuple[int, ...]
    found: bool
    terminated: bool = True


def _normalize_fact(text: str) -> str:
    text = " ".join(text.split())
    if text.endswith(".") and not text.endswith(" ."):
        text = text[:-1].rstrip() + " ."
    return text


def extract_facts(sequences, tokenizer, trie, *, trigger: str = "Fact:", terminator: str = "\n",
                  prompt_length: int = 0, leading_space: bool = True) -> List[List[WrittenFact]]:
    """The facts written in generated sequences, each checked against ``trie``.

    A fact is the text between a trigger (any tokenization, as :class:`FactLogitsProcessor`
    detects it) and the next terminator (its token ids, or any token whose text holds it), special
    token or end of sequence; empty ones (a dead end's bare terminator) are skipped. It is
    ``found`` when its token ids are a complete fact of the trie, or when its text, normalized
    (spaces collapsed, a final ``"."`` written ``" ."``) and encoded like ``FactTrie.from_facts``
    does (with a leading space when ``leading_space``), is one: so facts written without the
    processor are judged by their text, not by how the model happened to tokenize them. Each
    sequence is one lenient pass of a :class:`kcore.FactMatcher` row (its prompt prefilled).

    Args:
        sequences: int64 ``(batch, seq_len)`` tensor or a list of token-id lists (``generate``'s
            output).
        prompt_length: number of leading tokens to skip (the prompt, with its few-shot facts); a
            trigger ending exactly where the prompt ends opens a generated fact, a fact opened
            inside the prompt is not reported.

    Returns:
        one list of :class:`WrittenFact` per sequence, in order.
    """
    m = FactMatcher(trie, tokenizer, 1, trigger=trigger, terminator=terminator, avoid_duplicates=False,
                    max_rollback_tokens=0, stop_token_ids=[])
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.detach().cpu().tolist()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    prompt_length = max(int(prompt_length), 0)
    out: List[List[WrittenFact]] = []
    for r, seq in enumerate(sequences):
        seq = [int(t) for t in seq]
        plen = min(prompt_length, len(seq))
        gen = seq[plen:]
        m.reset()
        m.prefill(0, seq[:plen])
        m.accept_token_sequence(0, gen, strict=False)
        spans = [(start, end, end < len(gen) and gen[end] not in special) for _, start, end in m.written_facts(0)]
        open_fact = m.open_fact(0)
        if open_fact is not None:
            spans.append((open_fact[0], open_fact[1], False))
        facts = [_check_fact(r, tuple(gen[s:e]), tokenizer, trie, leading_space, terminated)
                 for s, e, terminated in spans if s >= 0 and e > s]
        out.append(facts)
    return out


def _check_fact(row: int, ids: Tuple[int, ...], tokenizer, trie, leading_space: bool, terminated: bool) -> WrittenFact:
    text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    found = bool(ids) and bool(trie.contains(np.asarray(ids, dtype=np.int64)))
    if not found and text:
        norm = _normalize_fact(text)
        enc = _encode(tokenizer, (" " + norm) if leading_space else norm)
        found = bool(enc) and max(enc) < trie.vocab_size and bool(trie.contains(np.asarray(enc, dtype=np.int64)))
    return WrittenFact(row=row, text=text, token_ids=ids, found=found, terminated=terminated)
