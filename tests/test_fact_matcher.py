"""kcore.FactMatcher (the native fact-decoding state machine, csrc/core/fact_matcher.cpp).

The property test drives the native matcher with random small KBs, random triggers and terminators
and random token streams (allowed tokens, refused tokens, lenient tokens, forks, rollbacks) and
compares every row's mask, mode and written facts after every operation with :class:`RefMatcher`,
a plain-Python reference written here from the protocol's definition: it keeps each row's whole
token history and recomputes trigger matches and allowed sets from sets of fact tuples, with no
trie and no automaton."""

from __future__ import annotations

import random
import threading
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kcore
from facts_helpers import FACTS, FakeTokenizer, make_trie
from kcore._native import native
from kcore.errors import InvalidInputError


# ----------------------------------------------------------------------------- reference matcher
class RefRow:
    def __init__(self):
        self.history: List[int] = []  # every token, prompt included (trigger matching)
        self.mode = "free"
        self.prefix: Optional[Tuple[int, ...]] = None  # inside a fact; None = off the trie
        self.k = 0
        self.start = 0
        self.pos = 0
        self.terminated = False
        self.facts: List[Tuple[int, int, int]] = []
        self.written: Set[int] = set()

    def copy(self) -> "RefRow":
        r = RefRow()
        r.__dict__.update({k: (list(v) if isinstance(v, list) else set(v) if isinstance(v, set) else v)
                           for k, v in self.__dict__.items()})
        return r


class RefMatcher:
    """The protocol from its definition. Fact ids: rank of the fact in the sorted list of distinct
    fact tuples (tuple order is the trie's lexicographic order, a prefix before its extensions)."""

    def __init__(self, facts, triggers, terminator, end_tokens, stop_tokens, avoid, batch, max_rollback):
        self.facts = sorted({tuple(f) for f in facts})
        self.ids = {f: i for i, f in enumerate(self.facts)}
        self.triggers = [tuple(t) for t in triggers]
        self.term = tuple(terminator)
        self.end = set(end_tokens) | {self.term[0]}
        self.stop = set(stop_tokens)
        self.avoid = avoid
        self.max_rollback = max_rollback
        self.rows = [RefRow() for _ in range(batch)]
        self.undo: List[List[RefRow]] = [[] for _ in range(batch)]

    def _unwritten_below(self, r: RefRow, prefix) -> List[Tuple[int, ...]]:
        return [f for f in self.facts if f[:len(prefix)] == prefix and not (self.avoid and self.ids[f] in r.written)]

    def _children(self, r: RefRow) -> Set[int]:
        return {f[len(r.prefix)] for f in self._unwritten_below(r, r.prefix) if len(f) > len(r.prefix)}

    def _term_allowed(self, i) -> bool:
        """Inside a fact: the fact is complete and not written yet, or nothing else is allowed."""
        r = self.rows[i]
        if r.prefix is None:
            return True
        complete = r.prefix in self.ids and not (self.avoid and self.ids[r.prefix] in r.written)
        return complete or not self._children(r)

    def allowed(self, i: int) -> Optional[Set[int]]:
        r = self.rows[i]
        if r.terminated or r.mode == "free":
            return None
        if r.mode == "term":
            return {self.term[r.k]}
        if r.prefix is None:
            return {self.term[0]}
        return self._children(r) | ({self.term[0]} if self._term_allowed(i) else set())

    def step(self, i: int, tok: int, strict: bool, prompt: bool = False) -> bool:
        r = self.rows[i]
        new = r.copy()
        new.history.append(tok)
        new.pos += 1

        def close(fid):
            new.facts.append((fid, r.start, r.pos))
            if self.avoid and fid >= 0:
                new.written.add(fid)
            multi = tok == self.term[0] and len(self.term) > 1
            new.mode, new.k, new.prefix = ("term", 1, None) if multi else ("free", 0, None)

        if r.terminated:
            if strict:
                return False
        elif r.mode == "free":
            if not prompt and tok in self.stop:
                new.terminated = True
            elif any(tuple(new.history[-len(t):]) == t for t in self.triggers if len(t) <= len(new.history)):
                new.mode, new.prefix, new.start = "fact", (), new.pos
        elif r.mode == "fact":
            if tok == self.term[0] and self._term_allowed(i):
                close(self.ids.get(r.prefix, -1) if r.prefix is not None else -1)
            elif r.prefix is not None and self._unwritten_below(r, r.prefix + (tok,)):
                new.prefix = r.prefix + (tok,)
            elif strict:
                return False
            elif tok in self.end or tok in self.stop:
                close(self.ids.get(r.prefix, -1) if r.prefix is not None else -1)
                if not prompt and tok in self.stop:
                    new.terminated = True
            else:
                new.prefix = None
        else:  # terminator
            if tok == self.term[r.k]:
                new.k = r.k + 1 if r.k + 1 < len(self.term) else 0
                if new.k == 0:
                    new.mode = "free"
            elif strict:
                return False
            else:
                new.mode, new.k = "free", 0
                if not prompt and tok in self.stop:
                    new.terminated = True
        if not prompt:
            self.undo[i] = (self.undo[i] + [r])[-self.max_rollback:] if self.max_rollback else []
        self.rows[i] = new
        return True

    def prefill(self, i, tokens):
        for t in tokens:
            self.step(i, t, strict=False, prompt=True)
        r = self.rows[i]
        r.facts, r.written = [], set()
        r.start -= r.pos
        r.pos = 0
        self.undo[i] = []

    def rollback(self, i, n):
        assert 0 < n <= len(self.undo[i])
        self.rows[i] = self.undo[i][-n]
        self.undo[i] = self.undo[i][:-n]

    def fork(self, src, dst):
        rows = [self.rows[s].copy() for s in src]
        undo = [list(self.undo[s]) for s in src]
        for d, r, u in zip(dst, rows, undo):
            self.rows[d], self.undo[d] = r, u


def _bits(words: np.ndarray, vocab: int) -> Set[int]:
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    return set(np.flatnonzero(bits[:vocab]).tolist())


def _check(native_m, ref: RefMatcher, vocab: int, words: int):
    n = len(ref.rows)
    bm = np.full((n, words), 0x5A5A5A5A, dtype=np.int32)
    constrained = native_m.fill_next_token_bitmask(bm)
    for i in range(n):
        expected = ref.allowed(i)
        assert bool(constrained[i]) == (expected is not None), f"row {i}: constrained {constrained[i]} != {expected}"
        if expected is not None:
            assert _bits(bm[i], 32 * words) == expected, f"row {i}: mask {_bits(bm[i], 32 * words)} != {expected}"
        else:
            assert (bm[i] == 0x5A5A5A5A).all(), "free rows are not written"
        r = ref.rows[i]
        assert native_m.mode(i) == {"free": 0, "fact": 1, "term": 2}[r.mode]
        assert native_m.written_facts(i) == r.facts
        assert bool(native_m.is_terminated([i])[0]) == r.terminated
        assert native_m.rollback_available(i) == len(ref.undo[i])
        assert native_m.open_fact(i) == ((r.start, r.pos) if r.mode == "fact" else None)


# ----------------------------------------------------------------------------- property test
@st.composite
def scenarios(draw):
    vocab = draw(st.integers(6, 40))
    tok = st.integers(0, vocab - 1)
    facts = draw(st.lists(st.lists(tok, min_size=1, max_size=5), min_size=1, max_size=10))
    triggers = draw(st.lists(st.lists(tok, min_size=1, max_size=3), min_size=1, max_size=3))
    terminator = draw(st.lists(tok, min_size=1, max_size=2))
    end_tokens = draw(st.lists(tok, max_size=2))
    stop_tokens = draw(st.lists(tok, max_size=1))
    avoid = draw(st.booleans())
    max_rollback = draw(st.integers(0, 6))
    prompt = draw(st.lists(tok, max_size=8))
    seed = draw(st.integers(0, 2**32 - 1))
    return vocab, facts, triggers, terminator, end_tokens, stop_tokens, avoid, max_rollback, prompt, seed


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenarios())
def test_matcher_matches_reference(tmp_path_factory, scenario):
    vocab, facts, triggers, terminator, end_tokens, stop_tokens, avoid, max_rollback, prompt, seed = scenario
    batch = 3
    path = tmp_path_factory.mktemp("prop") / "t.ktrie"
    trie = kcore.FactTrie.build(facts, str(path), vocab_size=vocab, progress=False)
    m = native().FactMatcher(trie._t, triggers, terminator, end_tokens, stop_tokens, avoid, max_rollback, batch)
    ref = RefMatcher(facts, triggers, terminator, end_tokens, stop_tokens, avoid, batch, max_rollback)
    words = (vocab + 31) // 32 + 1  # a wider bitmask than needed is fine
    rng = random.Random(seed)
    m.prefill(0, prompt)
    ref.prefill(0, prompt)
    _check(m, ref, vocab, words)
    queue: Dict[int, List[int]] = {i: [] for i in range(batch)}
    for _ in range(60):
        op = rng.random()
        i = rng.randrange(batch)
        if op < 0.55:  # a token the mask allows (or a trigger token / random token in free text)
            allowed = ref.allowed(i)
            if allowed is not None:
                t = rng.choice(sorted(allowed))
            elif queue[i]:
                t = queue[i].pop(0)
            elif rng.random() < 0.5:
                queue[i] = list(rng.choice(triggers))
                t = queue[i].pop(0)
            else:
                t = rng.randrange(vocab + 3)  # ids past the trie's vocab are plain free text
            expected = ref.step(i, t, strict=True)
            if expected:
                m.accept_token(i, t)
            else:
                with pytest.raises(InvalidInputError, match="refused"):
                    m.accept_token(i, t)
        elif op < 0.7:  # any token, strict: refused exactly when the reference refuses
            t = rng.randrange(vocab + 3)
            assert m.is_allowed(i, t) == (ref.allowed(i) is None and not ref.rows[i].terminated
                                          or ref.allowed(i) is not None and t in ref.allowed(i))
            ok = ref.step(i, t, strict=True)
            if ok:
                m.accept_tokens([i], [t])
            else:
                with pytest.raises(InvalidInputError, match=f"row {i}, token {t}"):
                    m.accept_tokens([i], [t])
        elif op < 0.8:  # lenient batch accept over every row
            toks = [rng.randrange(vocab) for _ in range(batch)]
            m.accept_tokens(list(range(batch)), toks, strict=False)
            for r, t in enumerate(toks):
                ref.step(r, t, strict=False)
        elif op < 0.9:  # beam-style re-ordering
            src = [rng.randrange(batch) for _ in range(batch)]
            dst = list(range(batch))
            rng.shuffle(dst)
            m.fork(src, dst)
            ref.fork(src, dst)
            queue = {d: list(queue[s]) for s, d in zip(src, dst)}
        else:
            avail = len(ref.undo[i])
            if avail:
                n = rng.randint(1, avail)
                m.rollback(i, n)
                ref.rollback(i, n)
                queue[i] = []
            with pytest.raises(InvalidInputError, match="rollback"):
                m.rollback(i, len(ref.undo[i]) + 1)
        _check(m, ref, vocab, words)


# ----------------------------------------------------------------------------- with a tokenizer
@pytest.fixture(scope="module")
def tok():
    return FakeTokenizer()


@pytest.fixture(scope="module")
def trie_and_seqs(tok, tmp_path_factory):
    return make_trie(tok, FACTS, tmp_path_factory.mktemp("trie") / "facts.ktrie")


def _allowed(m, row, vocab):
    bm = m.allocate_bitmask(1)
    assert m.fill_next_token_bitmask(bm, [row])[0]
    return _bits(bm[0].numpy(), vocab)


def test_exported_lazily_with_docs():
    assert kcore.FactMatcher is kcore.matcher.FactMatcher
    for name in ("accept_tokens", "fill_next_token_bitmask", "fork", "rollback", "written_facts", "prefill"):
        assert getattr(kcore.FactMatcher, name).__doc__


def test_fact_written_then_duplicate_masked(tok, trie_and_seqs):
    trie, seqs = trie_and_seqs
    m = kcore.FactMatcher(trie, tok, 1)
    ids = tok.ids
    m.prefill(0, tok.encode("Q? Fact:"))
    assert m.is_in_fact().tolist() == [True]
    assert _allowed(m, 0, len(tok)) == {ids[" Japan"], ids[" France"], ids[" Spain"], ids[" New York"]}
    fact = tok.encode(" Spain capital Madrid .")
    m.accept_tokens([0] * 0, [])  # an empty call is fine
    for t in fact:
        m.accept_token(0, t)
    assert _allowed(m, 0, len(tok)) == {ids["\n"]}
    m.accept_token(0, ids["\n"])
    fid = sorted(tuple(s) for s in seqs).index(tuple(fact))
    assert m.written_facts(0) == [(fid, 0, len(fact))]
    # again: Spain's only fact is written, so " Spain" is masked after the next trigger
    for t in tok.encode("Fact:"):
        m.accept_token(0, t)
    assert ids[" Spain"] not in _allowed(m, 0, len(tok))
    assert ids[" Japan"] in _allowed(m, 0, len(tok))


def test_refused_token_leaves_every_row_unchanged(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    m = kcore.FactMatcher(trie, tok, 3)
    for r in range(3):
        m.prefill(r, tok.encode("Fact: Japan"))
    before = [m._m.trie_state(r) for r in range(3)]
    good, bad = tok.ids[" capital"], tok.ids[" Paris"]
    with pytest.raises(InvalidInputError, match=f"row 1, token {bad}.*no row of the call was changed"):
        m.accept_tokens([0, 1, 2], [good, bad, good])
    assert [m._m.trie_state(r) for r in range(3)] == before
    assert [m._m.position(r) for r in range(3)] == [0, 0, 0]
    m.accept_tokens(np.array([0, 1, 2]), np.array([good, good, good]))
    assert [m._m.position(r) for r in range(3)] == [1, 1, 1]
    with pytest.raises(InvalidInputError, match="distinct"):
        m.accept_tokens([0, 0], [good, good])
    with pytest.raises(InvalidInputError, match="out of range"):
        m.accept_tokens([5], [good])
    with pytest.raises(InvalidInputError, match=">= 0"):
        m.accept_tokens([0], [-3])
    with pytest.raises(InvalidInputError, match="same length"):
        m.accept_tokens([0, 1], [good])
    # lenient: never refuses; a foreign token makes the fact dead (only the terminator left)
    m.accept_tokens([1], [bad], strict=False)
    assert _allowed(m, 1, len(tok)) == {tok.ids["\n"]}


def test_fork_reset_rollback(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    m = kcore.FactMatcher(trie, tok, 4, max_rollback_tokens=8)
    fact = tok.encode(" France capital Paris .") + [tok.ids["\n"]]
    m.prefill(0, tok.encode("Fact:"))
    for t in fact:
        m.accept_token(0, t)
    m.fork([0, 0, 0], [1, 2, 3])
    assert all(m.written_facts(r) == m.written_facts(0) for r in range(4))
    assert m.same_state(0, 3)
    # rollback into the fact: the written fact is undone, the row is inside the fact again
    m.rollback(2, 2)
    assert m.written_facts(2) == [] and m.is_in_fact([2]).tolist() == [True]
    assert m.open_fact(2) == (0, 3)
    assert _allowed(m, 2, len(tok)) == {tok.ids[" ."]}
    assert not m.same_state(0, 2)
    # permutation onto themselves (a gather)
    m.fork([2, 0], [0, 2])
    assert m.is_in_fact([0, 2]).tolist() == [True, False]
    m.reset([1])
    assert m.written_facts(1) == [] and m.rollback_available(1) == 0 and not m.is_in_fact([1])[0]
    with pytest.raises(InvalidInputError, match="rollback"):
        m.rollback(1, 1)
    m.reset()
    assert not m.is_in_fact().any()
    with pytest.raises(InvalidInputError, match="distinct"):
        m.fork([0, 1], [2, 2])


def test_trigger_merged_with_preceding_text_and_split(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    m = kcore.FactMatcher(trie, tok, 1)
    i = tok.ids
    for spelling in ([i["\nFact"], i[":"]], [i["F"], i["act"], i[":"]], [i["x"], i[" Fact"], i[":"]]):
        m.reset()
        for t in spelling:
            assert not m.is_in_fact()[0]
            m.accept_token(0, t)
        assert m.is_in_fact()[0], spelling
    m.reset()
    for t in [i["Artifact"], i[":"]]:
        m.accept_token(0, t)
    assert not m.is_in_fact()[0]


def test_stop_token_terminates(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    m = kcore.FactMatcher(trie, tok, 1)
    m.prefill(0, [tok.eos_token_id] + tok.encode("Hi"))  # EOS in a prompt: not terminated
    assert not m.is_terminated()[0]
    m.accept_token(0, tok.eos_token_id)
    assert m.is_terminated()[0]
    bm = m.allocate_bitmask()
    assert not m.fill_next_token_bitmask(bm)[0]
    with pytest.raises(InvalidInputError, match="terminated"):
        m.accept_token(0, tok.ids["x"])


def test_bad_arguments(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    with pytest.raises(InvalidInputError, match="kcore.FactTrie"):
        kcore.FactMatcher(object(), tok, 1)
    with pytest.raises(InvalidInputError, match="batch_size"):
        kcore.FactMatcher(trie, tok, -1)
    with pytest.raises(InvalidInputError, match="terminator"):
        kcore.FactMatcher(trie, tok, 1, terminator="")
    with pytest.raises(InvalidInputError, match="trigger"):
        kcore.FactMatcher(trie, tok, 1, trigger="")
    m = kcore.FactMatcher(trie, tok, 2)
    import torch

    with pytest.raises(InvalidInputError, match="int32"):
        m.fill_next_token_bitmask(torch.zeros(2, m.bitmask_words, dtype=torch.int64))
    with pytest.raises(InvalidInputError, match="words per row"):
        m.fill_next_token_bitmask(np.zeros((2, m.bitmask_words - 1), np.int32))
    with pytest.raises(InvalidInputError, match="at least 2 rows"):
        m.fill_next_token_bitmask(np.zeros((1, m.bitmask_words), np.int32))
    with pytest.raises(InvalidInputError, match="C-contiguous"):
        m.fill_next_token_bitmask(np.zeros((2, 2 * m.bitmask_words), np.int32)[:, ::2])
    with pytest.raises(InvalidInputError, match="rows"):
        m.fill_next_token_bitmask(m.allocate_bitmask(), "0")


def test_eight_threads_same_results_as_one(tok, trie_and_seqs):
    """One trie shared by 8 matchers, each driven by its own thread with its own seeded stream:
    every thread's trace (masks and written facts) equals the trace of the same stream run alone."""
    trie, _ = trie_and_seqs

    def run(seed: int) -> list:
        rng = random.Random(seed)
        m = kcore.FactMatcher(trie, tok, 4)
        bm = m.allocate_bitmask()
        triggers = m.trigger_sequences
        queues: List[List[int]] = [[] for _ in range(4)]
        trace = []
        for _ in range(300):
            constrained = m.fill_next_token_bitmask(bm)
            tokens = []
            for r in range(4):
                if constrained[r]:
                    tokens.append(rng.choice(sorted(_bits(bm[r].numpy(), len(tok)))))
                elif queues[r]:
                    tokens.append(queues[r].pop(0))
                elif rng.random() < 0.4:
                    queues[r] = list(rng.choice(triggers))
                    tokens.append(queues[r].pop(0))
                else:
                    tokens.append(rng.randrange(2, len(tok)))
            m.accept_tokens(range(4), tokens)
            trace.append((constrained.tobytes(), bm.numpy().tobytes()))
        trace.append([m.written_facts(r) for r in range(4)])
        return trace

    alone = [run(s) for s in range(8)]
    assert any(len(t[-1][r]) > 2 for t in alone for r in range(4)), "the streams write facts"
    results: Dict[int, list] = {}
    barrier = threading.Barrier(8)

    def worker(s):
        barrier.wait()
        results[s] = run(s)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[s] for s in range(8)] == alone


def test_accept_token_sequence_and_resize(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    m = kcore.FactMatcher(trie, tok, 2)
    good = tok.encode("Fact: Japan capital Tokyo .\n")
    m.accept_token_sequence(0, good)
    assert len(m.written_facts(0)) == 1 and m._m.position(0) == len(good)
    # strict, all or nothing: the refused token's index is named and the row is unchanged
    bad = tok.encode("Fact: Japan capital Paris")
    with pytest.raises(InvalidInputError, match=f"at index {len(bad) - 1}.*left unchanged"):
        m.accept_token_sequence(1, bad)
    assert m._m.position(1) == 0 and not m.is_in_fact([1])[0]
    m.accept_token_sequence(1, bad, strict=False)
    assert m.is_in_fact([1])[0] and _allowed(m, 1, len(tok)) == {tok.ids["\n"]}
    # resize: rows below min(old, new) keep their state, new rows start free
    m.resize(5)
    assert m.batch_size == 5 and m.written_facts(0) and m.is_in_fact().tolist() == [False, True, False, False, False]
    m.resize(1)
    assert m.batch_size == 1 and m.written_facts(0)
    with pytest.raises(InvalidInputError, match="out of range"):
        m.is_in_fact([1])
