"""Fact-constrained generation inside Hugging Face ``generate()``.

The model writes free text until it writes the trigger (``"Fact:"``); from there only token
sequences of facts stored in a :class:`kcore.FactTrie` are allowed; when a fact is complete the
terminator (``"\\n"``) is forced, and free text resumes. Every fact the model writes therefore
exists in the knowledge base. Method: ReFactX (Pezzotti et al. 2025, arXiv 2508.16983); masking
with the int32 token bitmask of xgrammar (Dong et al. 2024).

What differs from ReFactX and from HF's ``PrefixConstrainedLogitsProcessor``:

* **State from each row's own tokens.** HF never tells a logits processor how beam search
  reordered its rows. The processor keeps a tree of the sequences it has seen (one node per
  sequence, children keyed by token id) and finds each row's parent among the previous step's
  nodes of the same prompt by the row's last tokens, so greedy search, sampling, beam search and
  ``num_return_sequences`` all work on the unpatched transformers, at O(1) amortised work per row
  and step (the look-back is as long as the suffix two live beams share, typically 1 token).
* **One native call per step** (``kcore._C.fact_step``, csrc/core/fact_step.cpp) advances the
  trie states of every row that moved inside a fact, fills every constrained row's bitmask (with
  duplicate avoidance), sets the terminator bits, applies the mask to CPU logits in place and
  keeps rows finite; its inputs and outputs are numpy arrays preallocated per batch size. The
  Python work per row is dictionary bookkeeping. (Logits on another device: the same call fills
  the bitmask and :func:`kcore.ops.apply_token_bitmask_` applies it there.)
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from kcore._native import host_openmp_scope
from kcore.errors import InvalidInputError, TokenizerMismatchError

__all__ = ["FactLogitsProcessor", "prefix_allowed_tokens_fn", "extract_facts", "WrittenFact", "trigger_token_sequences"]

try:  # the processor is a real transformers LogitsProcessor when transformers is installed
    from transformers import LogitsProcessor as _LogitsProcessorBase
except ImportError:  # pragma: no cover - kcore.hf is documented as needing transformers
    _LogitsProcessorBase = object

_FREE, _FACT, _TERM = 0, 1, 2
_MATCH = -1  # key marking "a trigger ends here" in the reversed trigger tree


class _Node:
    """One generated sequence (prompt + generated tokens), shared by every row holding it.

    ``mode``: free text, inside a fact (``state`` = trie state, -1 = dead), or forcing the
    terminator (``state`` = index of the next terminator token). ``written``: fact ids this
    sequence completed (for ``avoid_duplicates``). ``term_ok`` / ``dead_end`` are filled when the
    node's mask is computed and decide what the terminator token means in the next step.
    """

    __slots__ = ("parent", "token", "mode", "state", "written", "children", "first", "term_ok", "dead_end")

    def __init__(self, parent, token, mode, state, written):
        self.parent = parent
        self.token = token
        self.mode = mode
        self.state = state
        self.written = written
        self.children: Dict[int, "_Node"] = {}
        self.first = -1
        self.term_ok = False
        self.dead_end = False


# Per-tokenizer data that costs about a second to compute (decoding every token, hashing the
# vocabulary), shared by every processor built for the same tokenizer object.
_TOKENIZER_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cached(tokenizer, key: str, compute):
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


def _encode(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _FactTracker:
    """The per-sequence state machine shared by the logits processor, the prefix function and
    :func:`extract_facts`: triggers, fact states, terminators, facts written."""

    def __init__(self, trie, tokenizer, *, trigger: str, terminator: str, avoid_duplicates: bool):
        for attr in ("step", "fill_bitmask", "is_complete", "fact_range", "root_state", "vocab_size"):
            if not hasattr(trie, attr):
                raise InvalidInputError(f"trie must be a kcore.FactTrie, got {type(trie).__name__} without {attr!r}")
        fingerprint = getattr(trie, "tokenizer_fingerprint", "")
        if fingerprint and _fingerprint(tokenizer) != fingerprint:
            raise TokenizerMismatchError(
                "tokenizer does not match the trie: the trie was built for tokenizer fingerprint "
                f"{fingerprint[:12]}..., this tokenizer's is {_fingerprint(tokenizer)[:12]}..."
            )
        self.trie = trie
        self.vocab_size = int(trie.vocab_size)
        self.avoid_duplicates = bool(avoid_duplicates)
        if not isinstance(terminator, str) or not terminator:
            raise InvalidInputError(f"terminator must be a non-empty string, got {terminator!r}")
        self.term = tuple(_encode(tokenizer, terminator))
        if not self.term or max(self.term) >= self.vocab_size:
            raise InvalidInputError(
                f"terminator {terminator!r} encodes to {list(self.term)}, which must be non-empty ids < trie.vocab_size={self.vocab_size}"
            )
        strings = _token_strings(tokenizer)
        self.trigger_seqs = trigger_token_sequences(tokenizer, trigger, token_strings=strings)
        # Tokens whose text holds the whole terminator (e.g. "\nFact"): they end a fact in text
        # that was not generated under the processor.
        self.term_tokens = frozenset(i for i, s in enumerate(strings) if terminator in s)
        # Reversed tree of trigger sequences: walk it from a row's last token backwards.
        self.rev: dict = {}
        for seq in self.trigger_seqs:
            node = self.rev
            for tok in reversed(seq):
                node = node.setdefault(tok, {})
            node[_MATCH] = True
        self.max_trigger_len = max(len(s) for s in self.trigger_seqs)
        self.root_state = int(trie.root_state)

    # -- transitions -------------------------------------------------------------------------
    def trigger_ends_at(self, row, end: int) -> bool:
        """True when ``row[:end]`` ends with one of the trigger's token sequences."""
        node = self.rev
        k = end - 1
        while k >= 0:
            node = node.get(int(row[k]))
            if node is None:
                return False
            if _MATCH in node:
                return True
            k -= 1
        return False

    def child(self, parent: _Node, tok: int, row, end: int, pending: list) -> _Node:
        """The node of ``parent``'s sequence + ``tok`` (``row[:end]``), cached in ``parent.children``.
        A fact-mode child whose trie state is still to compute is appended to ``pending``."""
        node = parent.children.get(tok)
        if node is not None:
            return node
        mode, written = parent.mode, parent.written
        if mode == _FREE:
            if self.trigger_ends_at(row, end):
                node = _Node(parent, tok, _FACT, self.root_state, written)
            else:
                node = _Node(parent, tok, _FREE, 0, written)
        elif mode == _FACT:
            if tok == self.term[0] and (parent.term_ok or parent.dead_end or parent.state < 0):
                if parent.term_ok and self.avoid_duplicates:
                    written = written | {parent.first}
                node = _Node(parent, tok, _FREE if len(self.term) == 1 else _TERM, 1, written)
            elif parent.state < 0:
                # Left a fact that is not in the trie (only possible in a prompt, or if another
                # processor overrode the mask): back to free text, which may start a new fact.
                mode = _FACT if self.trigger_ends_at(row, end) else _FREE
                node = _Node(parent, tok, mode, self.root_state if mode == _FACT else 0, written)
            elif tok >= self.vocab_size:
                node = _Node(parent, tok, _FACT, -1, written)
            else:
                node = _Node(parent, tok, _FACT, parent.state, written)
                pending.append(node)  # state = trie.step(parent.state, tok), batched by the caller
        else:  # _TERM
            k = parent.state
            if tok == self.term[k] and k + 1 < len(self.term):
                node = _Node(parent, tok, _TERM, k + 1, written)
            else:
                node = _Node(parent, tok, _FREE, 0, written)
        parent.children[tok] = node
        return node

    def step_pending(self, pending: list) -> None:
        """Advance the trie state of every pending fact-mode node in one native call."""
        if not pending:
            return
        states = np.fromiter((nd.state for nd in pending), dtype=np.int64, count=len(pending))
        tokens = np.fromiter((nd.token for nd in pending), dtype=np.int64, count=len(pending))
        new = self.trie.step(states, tokens)
        for nd, s in zip(pending, new.tolist()):
            nd.state = s

    def scan(self, row) -> _Node:
        """The node of a whole token sequence, computed from scratch (prompts, lost rows). Facts
        written inside it do not count as written: only what is generated after it does."""
        row = np.asarray(row)
        node = _Node(None, int(row[-1]) if len(row) else -1, _FREE, 0, frozenset())
        for end in range(1, len(row) + 1):
            pending: list = []
            node = self.child(node, int(row[end - 1]), row, end, pending)
            self.step_pending(pending)
            if node.mode == _FACT:
                self.describe([node])
        root = _Node(None, int(row[-1]) if len(row) else -1, node.mode, node.state, frozenset())
        if root.mode == _FACT:
            self.describe([root])
        return root

    # -- masks -------------------------------------------------------------------------------
    def describe(self, nodes: List[_Node], bitmask: Optional[np.ndarray] = None) -> Optional[np.ndarray]:
        """Compute each fact-mode node's ``first``/``term_ok``/``dead_end`` and, when ``bitmask``
        (int32 ``(len(nodes), words)``) is given, fill its rows: the trie's allowed tokens plus
        the terminator where a fact may end here or nothing else is allowed; terminator-mode rows
        get their next terminator token; free-mode rows are left as filled (all zero) and are not
        meant to be applied."""
        n = len(nodes)
        states = np.fromiter((nd.state if nd.mode == _FACT else -1 for nd in nodes), dtype=np.int64, count=n)
        written_ids = written_offsets = None
        if self.avoid_duplicates and any(nd.written for nd in nodes):
            offsets = [0]
            ids: List[int] = []
            for nd in nodes:
                if nd.mode == _FACT and nd.written:
                    ids.extend(sorted(nd.written))
                offsets.append(len(ids))
            written_offsets = np.asarray(offsets, dtype=np.int64)
            written_ids = np.asarray(ids, dtype=np.int64)
        complete = self.trie.is_complete(states).tolist()
        # A complete state's own fact id is only needed to track written facts: ask for the ids
        # of the complete rows only (usually none).
        first = [-1] * n
        done = [i for i in range(n) if complete[i]] if self.avoid_duplicates else []
        if done:
            for i, f in zip(done, self.trie.fact_range(states[done])[0].tolist()):
                first[i] = f
        if bitmask is not None:
            self.trie.fill_bitmask(states, bitmask, written_offsets=written_offsets, written_ids=written_ids)
        w0, b0 = self.term[0] >> 5, np.uint32(1 << (self.term[0] & 31))
        words = bitmask.view(np.uint32) if bitmask is not None else None
        for i, nd in enumerate(nodes):
            if nd.mode == _FACT:
                nd.first = first[i]
                nd.term_ok = complete[i] and nd.state >= 0 and not (self.avoid_duplicates and first[i] in nd.written)
                if words is not None:
                    # A live trie state always has a continuation or is a whole fact, so only a
                    # dead state, or written facts masking every branch, leave nothing allowed.
                    nd.dead_end = not nd.term_ok and (
                        nd.state < 0 or (self.avoid_duplicates and bool(nd.written) and not bitmask[i].any())
                    )
                    if nd.term_ok or nd.dead_end:
                        words[i, w0] |= b0
            elif nd.mode == _TERM and words is not None:
                tok = self.term[nd.state]
                words[i, :] = 0
                words[i, tok >> 5] |= np.uint32(1 << (tok & 31))
        return bitmask


class FactLogitsProcessor(_LogitsProcessorBase):
    """Hugging Face logits processor: every fact the model writes after the trigger exists in ``trie``.

    Free text until the row's own tokens end with ``trigger`` (any tokenization of it, see
    :func:`trigger_token_sequences`); then only continuations of facts in ``trie``; when the fact
    is complete the ``terminator`` is forced (both the terminator and the longer facts are allowed
    when the fact is also a prefix of others); then free text again. Method: ReFactX (Pezzotti
    et al. 2025), with the bitmask masking of xgrammar.

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

    State: rows are matched to the previous step's sequences by their own tokens (see module
    docs), so beam reordering is harmless. A new ``generate()`` call is recognised by a change of
    batch size or a sequence length that is not the previous one + 1; call :meth:`reset` to start
    over explicitly (e.g. when reusing the processor for a prompt exactly one token longer).

    Raises (on call):
        InvalidInputError: ``input_ids``/``scores`` of the wrong rank, batch or dtype, or scores
            narrower than ``trie.vocab_size``.
        TokenizerMismatchError (at construction): the trie was built for another tokenizer.
    """

    def __init__(self, trie, tokenizer, *, trigger: str = "Fact:", terminator: str = "\n", avoid_duplicates: bool = True):
        self._tracker = _FactTracker(trie, tokenizer, trigger=trigger, terminator=terminator, avoid_duplicates=avoid_duplicates)
        self.trie = trie
        self.trigger = trigger
        self.terminator = terminator
        self.avoid_duplicates = avoid_duplicates
        self._tail = self._tracker.max_trigger_len + 2
        self._bitmask: Optional[np.ndarray] = None
        # The fused native step needs the trie's native handle (any kcore.FactTrie has one); a
        # trie-like object without it takes the path of separate calls.
        from kcore._native import native

        self._native = native()
        handle = getattr(trie, "_t", None)
        self._trie_handle = handle if isinstance(handle, self._native.Trie) else None
        self._fact_step = self._native.fact_step
        self._term = np.asarray(self._tracker.term, dtype=np.int64)
        self._written_ids = np.zeros(64, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        """Forget every sequence seen: the next call starts a new generation."""
        self._nodes: List[_Node] = []
        self._groups: List[int] = []
        self._index: Dict[Tuple[int, int], List[_Node]] = {}
        self._length = -1
        self._sorted_written: Dict[frozenset, Tuple[int, ...]] = {}

    # Row bookkeeping ----------------------------------------------------------------------
    def _start(self, input_ids: torch.Tensor) -> None:
        rows = input_ids.detach().cpu().numpy()
        roots: Dict[bytes, int] = {}
        root_nodes: List[_Node] = []
        self._groups = []
        nodes = []
        for row in rows:
            key = row.tobytes()
            g = roots.get(key)
            if g is None:
                g = roots[key] = len(root_nodes)
                root_nodes.append(self._tracker.scan(row))
            self._groups.append(g)
            nodes.append(root_nodes[g])
        self._nodes = nodes

    def _find_parent(self, i: int, prev: int, rows, input_ids: torch.Tensor) -> Optional[_Node]:
        cands = self._index.get((self._groups[i], prev))
        if not cands:
            return None
        if len(cands) == 1:
            return cands[0]
        row = rows[i]
        # Several live sequences of this prompt end with the same token: look further back
        # until one is left (nodes are unique per sequence, so this ends before the roots).
        level = [(c, c) for c in cands]
        k = 3
        full = row
        while len(level) > 1:
            if k > len(full):
                if len(full) < input_ids.shape[1]:
                    full = input_ids[i].detach().cpu().numpy()
                    continue
                return level[0][0]
            tok = int(full[-k])
            level = [(c, a.parent) for c, a in level if a.parent is not None and a.parent.token == tok]
            k += 1
        return level[0][0] if level else None

    def _advance(self, input_ids: torch.Tensor) -> list:
        """Move every row to its node; returns the new fact-mode nodes whose trie state is still
        to advance by their token (their ``state`` is the parent's)."""
        tr = self._tracker
        # CPU: a zero-copy numpy view of the whole tensor (rows are read from the end only);
        # other devices: one transfer of the last few columns.
        # Each row's last two tokens as Python ints in one call; whole rows are read only when a
        # new node is made or several candidate parents share the previous token (few calls
        # per step: the processor runs right after the forward pass, with cold caches).
        rows = input_ids.numpy() if input_ids.is_cpu else input_ids[:, -self._tail:].cpu().numpy()
        end = rows.shape[1]
        pending: list = []
        nodes = []
        for i, (prev, tok) in enumerate(rows[:, -2:].tolist()):
            parent = self._find_parent(i, prev, rows, input_ids)
            if parent is None:  # not a continuation of a row we saw: rebuild it from its tokens
                nodes.append(tr.scan(input_ids[i].detach().cpu().numpy()))
                continue
            node = parent.children.get(tok)
            nodes.append(node if node is not None else tr.child(parent, tok, rows[i], end, pending))
        self._nodes = nodes
        return pending

    def _reindex(self) -> None:
        index: Dict[Tuple[int, int], List[_Node]] = {}
        for g, nd in zip(self._groups, self._nodes):
            lst = index.setdefault((g, nd.token), [])
            if nd not in lst:
                lst.append(nd)
        self._index = index

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
        if vocab < self._tracker.vocab_size:
            raise InvalidInputError(f"scores must have >= trie.vocab_size={self._tracker.vocab_size} columns, got {vocab}")
        pending: list = []
        if batch != len(self._nodes) or length != self._length + 1 or length < 2:
            self._start(input_ids)
        else:
            pending = self._advance(input_ids)
        self._length = length
        self._reindex()
        nodes = self._nodes
        words = (vocab + 31) // 32
        if self._bitmask is None or self._bitmask.shape != (batch, words):
            self._allocate(batch, words)
        if self._trie_handle is None:
            self._tracker.step_pending(pending)
            constrained = [i for i, nd in enumerate(nodes) if nd.mode != _FREE]
            if constrained:
                bitmask = self._tracker.describe(nodes, self._bitmask)
                self._apply(scores, bitmask, self._bitmask_t, constrained)
            return scores
        self._fused_step(nodes, pending, scores)
        return scores

    def _allocate(self, batch: int, words: int) -> None:
        """The per-row arrays of the fused step, reused by every step at this batch size."""
        self._bitmask = np.zeros((batch, words), dtype=np.int32)
        self._bitmask_t = torch.from_numpy(self._bitmask)  # shares memory: filled in place
        self._mode = np.zeros(batch, dtype=np.int8)
        self._state = np.zeros(batch, dtype=np.int64)
        self._step_token = np.full(batch, -1, dtype=np.int64)
        self._first = np.zeros(batch, dtype=np.int64)
        self._flags = np.zeros(batch, dtype=np.uint8)
        self._constrained = np.zeros(batch, dtype=np.int64)
        self._written_offsets = np.zeros(batch + 1, dtype=np.int64)

    def _fused_step(self, nodes: List[_Node], pending: list, scores: torch.Tensor) -> None:
        """One ``kcore._C.fact_step`` call for every row, then the nodes' outputs copied back."""
        mode, state, step_token = self._mode, self._state, self._step_token
        fresh = {id(nd) for nd in pending} if pending else ()
        any_constrained = any_written = False
        for i, nd in enumerate(nodes):
            m = nd.mode
            mode[i] = m
            if m == _FREE:
                continue
            any_constrained = True
            state[i] = nd.state
            step_token[i] = nd.token if id(nd) in fresh else -1
            if nd.written and m == _FACT:
                any_written = True
        if not any_constrained:
            return
        offsets = ids = None
        if any_written and self.avoid_duplicates:
            offsets, ids = self._written_csr(nodes)
        dtype_code = _DTYPE_CODES.get(scores.dtype)
        vocab = scores.shape[1]
        strides = scores.stride()
        fused_apply = scores.is_cpu and dtype_code is not None and (strides[1] == 1 or vocab == 1)
        n = self._fact_step(
            self._trie_handle, len(nodes), mode, state, step_token, offsets, ids, self.avoid_duplicates, self._term,
            self._bitmask, self._first, self._flags, self._constrained,
            scores.data_ptr() if fused_apply else 0, dtype_code or 0, vocab, strides[0],
        )
        states, firsts, flags = state.tolist(), self._first.tolist(), self._flags.tolist()
        for i, nd in enumerate(nodes):
            if nd.mode == _FACT:
                if id(nd) in fresh:
                    nd.state = states[i]
                nd.first = firsts[i]
                nd.term_ok = bool(flags[i] & 1)
                nd.dead_end = bool(flags[i] & 2)
        if not fused_apply:
            self._apply(scores, self._bitmask, self._bitmask_t, self._constrained[:n].tolist())

    def _written_csr(self, nodes: List[_Node]) -> Tuple[np.ndarray, np.ndarray]:
        """The facts each fact-mode row wrote, as CSR in the preallocated buffers (sorted ids per
        row; the sorted tuple of each ``written`` set is computed once)."""
        offsets, ids = self._written_offsets, self._written_ids
        pos = 0
        for i, nd in enumerate(nodes):
            if nd.written and nd.mode == _FACT:
                key = self._sorted_written.get(nd.written)
                if key is None:
                    key = self._sorted_written[nd.written] = tuple(sorted(nd.written))
                if pos + len(key) > len(ids):
                    grown = np.zeros(max(2 * len(ids), pos + len(key)), dtype=np.int64)
                    grown[:pos] = ids[:pos]
                    ids = self._written_ids = grown
                ids[pos:pos + len(key)] = key
                pos += len(key)
            offsets[i + 1] = pos
        return offsets, ids

    def _apply(self, scores: torch.Tensor, bitmask: np.ndarray, mask: torch.Tensor, rows: List[int]) -> None:
        from kcore.ops.bitmask import apply_token_bitmask_

        if scores.device.type != "cpu":
            mask = mask.to(scores.device, non_blocking=False)
        all_rows = len(rows) == scores.shape[0]
        idx = None if all_rows else torch.tensor(rows, dtype=torch.int64)
        apply_token_bitmask_(scores, mask, indices=idx)
        # A row whose allowed tokens all had score -inf would sample NaN or an arbitrary token:
        # give its allowed tokens score 0 instead (rare; found by one max per constrained row).
        if scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.stride(1) == 1:
            view = scores.numpy()
            best = (view.max(axis=1) if all_rows else view[rows].max(axis=1)).tolist()
        else:
            best = (scores if all_rows else scores[idx.to(scores.device)]).amax(dim=1).tolist()
        for b in [k for k, v in enumerate(best) if v == float("-inf")]:
            r = rows[b]
            allowed = torch.from_numpy(_unpack(bitmask[r], scores.shape[1])).to(scores.device)
            scores[r, allowed] = 0


_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # codes of csrc/core/bitmask.h


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
    token ids; in free text it returns every id of the tokenizer. Each row's state is cached by
    its token sequence, so a call costs one hash of the row plus O(1) trie work. Slower than the
    logits processor (HF builds the mask row by row in Python); offered for code built around
    ``prefix_allowed_tokens_fn``.
    """
    tracker = _FactTracker(trie, tokenizer, trigger=trigger, terminator=terminator, avoid_duplicates=avoid_duplicates)
    everything = list(range(len(tokenizer)))
    words = (tracker.vocab_size + 31) // 32
    # Nodes of the sequences seen at the current and the previous length, keyed by their tokens.
    cache: Dict[bytes, _Node] = {}
    previous: Dict[bytes, _Node] = {}
    allowed_of: Dict[_Node, List[int]] = {}
    length = [-1]

    def allowed(batch_id: int, sent: torch.Tensor) -> List[int]:
        nonlocal cache, previous, allowed_of
        row = sent.detach().cpu().numpy()
        if len(row) != length[0]:
            previous, cache = (cache if len(row) == length[0] + 1 else {}), {}
            allowed_of = {}
            length[0] = len(row)
        key = row.tobytes()
        node = cache.get(key)
        if node is None:
            parent = previous.get(row[:-1].tobytes()) if len(row) > 1 else None
            if parent is None:
                node = tracker.scan(row)
            else:
                pending: list = []
                node = tracker.child(parent, int(row[-1]), row, len(row), pending)
                tracker.step_pending(pending)
            cache[key] = node
        if node.mode == _FREE:
            return everything
        result = allowed_of.get(node)
        if result is None:
            mask = tracker.describe([node], np.zeros((1, words), dtype=np.int32))
            result = allowed_of[node] = _unpack(mask[0], tracker.vocab_size).tolist()
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
    detects it) and the next terminator (its token ids, or any token whose text holds it), end of
    sequence or special token; empty ones (a dead
    end's bare terminator) are skipped. It is ``found`` when
    its token ids are a complete fact of the trie, or when its text, normalized (spaces collapsed,
    a final ``"."`` written ``" ."``) and encoded like ``FactTrie.from_facts`` does (with a leading
    space when ``leading_space``), is one: so facts written without the processor are judged by
    their text, not by how the model happened to tokenize them.

    Args:
        sequences: int64 ``(batch, seq_len)`` tensor or a list of token-id lists (``generate``'s
            output).
        prompt_length: number of leading tokens to skip (the prompt, with its few-shot facts).

    Returns:
        one list of :class:`WrittenFact` per sequence, in order.
    """
    tracker = _FactTracker(trie, tokenizer, trigger=trigger, terminator=terminator, avoid_duplicates=False)
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.detach().cpu().tolist()
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    term = list(tracker.term)
    prompt_length = max(int(prompt_length), 0)
    out: List[List[WrittenFact]] = []
    for r, seq in enumerate(sequences):
        seq = [int(t) for t in seq]
        facts: List[WrittenFact] = []
        # A trigger ending exactly where the prompt ends opens a generated fact too.
        i = max(prompt_length - 1, 0)
        while i < len(seq):
            if seq[i] in special or not tracker.trigger_ends_at(seq, i + 1):
                i += 1
                continue
            start = j = i + 1
            while j < len(seq) and seq[j] not in special and seq[j:j + len(term)] != term and seq[j] not in tracker.term_tokens:
                j += 1
            exact = seq[j:j + len(term)] == term
            terminated = exact or (j < len(seq) and seq[j] in tracker.term_tokens)
            if j > start:
                facts.append(_check_fact(r, tuple(seq[start:j]), tokenizer, trie, leading_space, terminated))
            # A token holding the terminator may also start the next trigger ("\nFact"): rescan it.
            i = j + len(term) if exact else j
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
