"""FactTrie against a plain dict-of-dicts oracle (hypothesis), plus edge cases and bad input."""

from __future__ import annotations

import bisect
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kcore
from kcore.trie import FactTrie

END = "<end>"
VOCABS = [32001, 49152, 128256, 151936]


# ---------------------------------------------------------------- oracle


class Oracle:
    """GENRE-style nested dicts; fact ids = positions in the sorted list of distinct facts."""

    def __init__(self, facts):
        self.facts = sorted(set(tuple(int(t) for t in f) for f in facts))
        self.root = {}
        for f in self.facts:
            d = self.root
            for t in f:
                d = d.setdefault(t, {})
            d[END] = True

    def node(self, prefix):
        d = self.root
        for t in prefix:
            if t not in d or t == END:
                return None
            d = d[t]
        return d

    def next_tokens(self, prefix):
        d = self.node(prefix)
        return sorted(k for k in d if k != END) if d is not None else []

    def contains(self, seq):
        d = self.node(seq)
        return d is not None and END in d

    def fact_ids(self, prefix):
        p = tuple(prefix)
        lo = bisect.bisect_left(self.facts, p)
        hi = bisect.bisect_left(self.facts, p + (float("inf"),))
        return list(range(lo, hi))

    def prefixes(self):
        out = {()}
        for f in self.facts:
            for i in range(1, len(f) + 1):
                out.add(f[:i])
        return sorted(out)


def bitmask_tokens(row: np.ndarray) -> list:
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).tolist()


def build(facts, vocab_size, folder, name="t.ktrie", **kw):
    return FactTrie.build(facts, Path(folder) / name, vocab_size=vocab_size, progress=False, **kw)


def check_against_oracle(trie: FactTrie, oracle: Oracle, vocab_size: int, rng: np.random.Generator):
    assert trie.num_facts == len(oracle.facts)
    prefixes = oracle.prefixes()
    if len(prefixes) > 400:
        keep = rng.choice(len(prefixes), 400, replace=False)
        prefixes = [()] + [prefixes[i] for i in keep]
    states = np.array([trie.state_of(list(p)) for p in prefixes], dtype=np.int64)
    assert (states >= 0).all()
    complete = trie.is_complete(states)
    first, count = trie.fact_range(states)
    words = (vocab_size + 31) // 32
    mask = np.full((len(prefixes), words), -1, dtype=np.int32)
    trie.fill_bitmask(states, mask)
    for i, p in enumerate(prefixes):
        expected = oracle.next_tokens(p)
        assert trie.next_tokens(list(p)).tolist() == expected
        assert trie.next_tokens_from(states[i]).tolist() == expected
        assert bitmask_tokens(mask[i]) == expected
        assert complete[i] == oracle.contains(p)
        ids = oracle.fact_ids(p)
        assert (first[i], count[i]) == (ids[0], len(ids))
        # One step along every allowed token, and along a token that is not allowed.
        if expected:
            some = expected if len(expected) <= 50 else [expected[k] for k in rng.choice(len(expected), 50)]
            nxt = trie.step(np.full(len(some), states[i]), np.array(some))
            assert nxt.tolist() == [trie.state_of(list(p) + [t]) for t in some]
            nf, nc = trie.fact_range(nxt)
            for t, f, c in zip(some, nf, nc):
                ids_t = oracle.fact_ids(p + (t,))
                assert (f, c) == (ids_t[0], len(ids_t))
        bad = [t for t in (0, 1, vocab_size - 1, int(rng.integers(vocab_size))) if t not in expected]
        if bad:
            assert (trie.step(np.full(len(bad), states[i]), np.array(bad)) == -1).all()
    for f in oracle.facts:
        assert trie.contains(list(f))
        assert trie.contains(f[:-1]) == oracle.contains(f[:-1])


# ---------------------------------------------------------------- property tests


@st.composite
def fact_sets(draw, vocab_sizes=VOCABS):
    vocab = draw(st.sampled_from(vocab_sizes))
    # A few ids near both ends of the vocabulary (shared prefixes and endings), and any id.
    small = st.sampled_from([0, 1, 2, 7, vocab - 3, vocab - 2, vocab - 1])
    token = st.one_of(small, small, small, st.integers(0, vocab - 1))
    facts = draw(st.lists(st.lists(token, min_size=1, max_size=7), min_size=1, max_size=60))
    # Some duplicates and some facts that are prefixes of others.
    extra = [f[: draw(st.integers(1, len(f)))] for f in facts[: draw(st.integers(0, 5))]]
    return vocab, facts + extra + facts[: draw(st.integers(0, 3))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=fact_sets(), seed=st.integers(0, 2**32 - 1))
def test_matches_dict_oracle(data, seed):
    vocab, facts = data
    with tempfile.TemporaryDirectory() as d:
        trie = build(facts, vocab, d)
        check_against_oracle(trie, Oracle(facts), vocab, np.random.default_rng(seed))


@settings(max_examples=40, deadline=None)
@given(
    data=fact_sets(vocab_sizes=[32001, 151936]),
    seed=st.integers(0, 2**32 - 1),
)
def test_duplicate_avoidance(data, seed):
    vocab, facts = data
    oracle = Oracle(facts)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as d:
        trie = build(facts, vocab, d)
        prefixes = oracle.prefixes()
        rows = [prefixes[i] for i in rng.integers(0, len(prefixes), size=6)]
        written = []
        for p in rows:
            ids = oracle.fact_ids(p)
            # Each row: a random subset of its facts, sometimes all of them, plus unrelated ids.
            take = rng.random(len(ids)) < rng.choice([0.3, 0.8, 1.0])
            chosen = set(np.array(ids)[take].tolist()) | set(rng.integers(0, len(oracle.facts), 2).tolist())
            written.append(sorted(chosen))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(w) for w in written])
        ids_flat = np.array([i for w in written for i in w], dtype=np.int64)
        states = np.array([trie.state_of(list(p)) for p in rows], dtype=np.int64)
        mask = np.full((len(rows), (vocab + 31) // 32), -1, dtype=np.int32)
        trie.fill_bitmask(states, mask, written_offsets=offsets, written_ids=ids_flat)
        for i, p in enumerate(rows):
            expected = [t for t in oracle.next_tokens(p) if not set(oracle.fact_ids(p + (t,))) <= set(written[i])]
            assert bitmask_tokens(mask[i]) == expected


# ---------------------------------------------------------------- edge cases


@pytest.mark.parametrize("vocab", VOCABS)
def test_ids_near_vocab_end(tmp_path, vocab):
    rng = np.random.default_rng(vocab)
    facts = [[vocab - 1], [vocab - 1, vocab - 2, 0], [0, vocab - 1]]
    facts += [rng.integers(vocab - 40, vocab, size=rng.integers(1, 6)).tolist() for _ in range(300)]
    trie = build(facts, vocab, tmp_path)
    assert trie.vocab_size == vocab
    check_against_oracle(trie, Oracle(facts), vocab, rng)
    mask = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    trie.fill_bitmask([trie.state_of([vocab - 1])], mask)
    assert bitmask_tokens(mask[0]) == Oracle(facts).next_tokens((vocab - 1,))


def test_root_with_many_children(tmp_path):
    vocab = 49152
    facts = [[t, (7 * t) % vocab, 5] for t in range(0, vocab, 3)] + [[t] for t in range(1, 5000, 7)]
    trie = build(facts, vocab, tmp_path)
    oracle = Oracle(facts)
    check_against_oracle(trie, oracle, vocab, np.random.default_rng(0))
    # Duplicate avoidance at a node with binary-searched children (the root): every fact of the
    # first 300 root tokens written, plus one fact of each of the next 300.
    root_tokens = oracle.next_tokens(())
    written = [i for t in root_tokens[:300] for i in oracle.fact_ids((t,))]
    written += [oracle.fact_ids((t,))[0] for t in root_tokens[300:600]]
    written = sorted(written)
    mask = np.zeros((1, vocab // 32), dtype=np.int32)
    trie.fill_bitmask([trie.root_state], mask, written_offsets=[0, len(written)], written_ids=written)
    expected = [t for t in root_tokens if not set(oracle.fact_ids((t,))) <= set(written)]
    assert bitmask_tokens(mask[0]) == expected and len(expected) < len(root_tokens) - 250


def test_single_fact(tmp_path):
    trie = build([[5, 6, 7]], 10, tmp_path)
    assert trie.num_facts == 1 and trie.contains([5, 6, 7])
    assert not trie.contains([5, 6]) and not trie.contains([5, 6, 7, 8]) and not trie.contains([])
    assert trie.next_tokens([]).tolist() == [5]
    assert trie.next_tokens([5, 6, 7]).tolist() == []
    s = trie.state_of([5, 6, 7])
    assert trie.is_complete([s]).tolist() == [True]
    assert [a.tolist() for a in trie.fact_range([s])] == [[0], [1]]


def test_duplicates_and_prefix_facts(tmp_path):
    facts = [[1, 2, 3], [1, 2], [1, 2, 3], [1], [1, 2, 4], [1, 2]]
    trie = build(facts, 5, tmp_path)
    assert trie.num_facts == 4 and trie.build_stats["num_input"] == 6
    # Sorted: (1), (1,2), (1,2,3), (1,2,4): a complete state's own fact is `first`.
    states = [trie.state_of(p) for p in ([1], [1, 2], [1, 2, 3], [1, 2, 4])]
    first, count = trie.fact_range(states)
    assert first.tolist() == [0, 1, 2, 3] and count.tolist() == [4, 3, 1, 1]
    assert trie.is_complete(states).all()
    assert trie.leaf_counts(states).tolist() == [4, 3, 1, 1]


def test_dead_state_and_shapes(tmp_path):
    trie = build([[1, 2], [3]], 8, tmp_path)
    r = trie.root_state
    assert trie.step([[r, -1], [r, r]], [[1, 1], [3, 4]]).tolist()[0][1] == -1
    assert trie.step([-1], [0]).tolist() == [-1]
    assert trie.step([r], [8]).tolist() == [-1] and trie.step([r], [-5]).tolist() == [-1]
    assert trie.is_complete([-1]).tolist() == [False]
    assert [a.tolist() for a in trie.fact_range([-1])] == [[0], [0]]
    mask = np.full((2, 1), -1, dtype=np.int32)
    trie.fill_bitmask(np.array([-1, r]), mask)
    assert mask[0, 0] == 0 and bitmask_tokens(mask[1]) == [1, 3]
    with pytest.raises(kcore.InvalidInputError, match="not a state"):
        trie.step([-7], [1])
    with pytest.raises(kcore.InvalidInputError, match="not a state"):
        trie.is_complete([1 << 40])


def test_bitmask_torch_and_wider_rows(tmp_path):
    torch = pytest.importorskip("torch")
    trie = build([[0, 40], [33], [39, 1]], 41, tmp_path)
    mask = torch.full((1, 4), -1, dtype=torch.int32)  # wider than ceil(41/32) = 2: all words written
    trie.fill_bitmask(torch.tensor([trie.root_state]), mask)
    assert mask.tolist() == [[1, (1 << 1) | (1 << 7), 0, 0]]


def test_bitmask_bad_arguments(tmp_path):
    torch = pytest.importorskip("torch")
    trie = build([[1]], 100, tmp_path)
    s = [trie.root_state]
    for bad, msg in [
        (np.zeros((1, 4), np.int64), "int32"),
        (np.zeros((1, 3), np.int32), "at least ceil"),
        (np.zeros((2, 8), np.int32)[:, ::2], "C-contiguous"),
        (np.zeros(4, np.int32), "2-D"),
        (torch.zeros((1, 4), dtype=torch.float32), "int32"),
        (torch.zeros((8, 2), dtype=torch.int32).t(), "C-contiguous"),
        ([[0, 0, 0, 0]], "numpy array or a torch tensor"),
    ]:
        with pytest.raises(kcore.InvalidInputError, match=msg):
            trie.fill_bitmask(s, bad)
    with pytest.raises(kcore.InvalidInputError, match="rows"):
        trie.fill_bitmask(s + s, np.zeros((1, 4), np.int32))
    mask = np.zeros((1, 4), np.int32)
    with pytest.raises(kcore.InvalidInputError, match="sorted"):
        trie.fill_bitmask(s, mask, written_offsets=[0, 2], written_ids=[3, 1])
    with pytest.raises(kcore.InvalidInputError, match="batch \\+ 1"):
        trie.fill_bitmask(s, mask, written_offsets=[0], written_ids=[])
    with pytest.raises(kcore.InvalidInputError, match="together"):
        trie.fill_bitmask(s, mask, written_offsets=[0, 0])


# ---------------------------------------------------------------- build inputs and errors


def test_input_forms_agree(tmp_path):
    rng = np.random.default_rng(1)
    facts = [rng.integers(0, 300, size=rng.integers(1, 8)) for _ in range(500)]
    a = build([f.tolist() for f in facts], 300, tmp_path, "a.ktrie")
    b = build(facts, 300, tmp_path, "b.ktrie")  # numpy arrays
    c = build((f.astype(np.int32) for f in facts), 300, tmp_path, "c.ktrie")  # generator
    flat = np.concatenate(facts)
    offsets = np.concatenate([[0], np.cumsum([len(f) for f in facts])])
    d = FactTrie.build_from_arrays(flat, offsets, tmp_path / "d.ktrie", vocab_size=300, progress=False)
    data = {p.read_bytes() for p in (Path(x.path) for x in (a, b, c, d))}
    assert len(data) == 1
    grid = rng.integers(0, 300, size=(200, 4))
    e = build(grid, 300, tmp_path, "e.ktrie")
    f = build(grid.tolist(), 300, tmp_path, "f.ktrie")
    assert Path(e.path).read_bytes() == Path(f.path).read_bytes()


@pytest.mark.parametrize(
    "facts, msg",
    [
        ([[1, 2], [], [3]], "fact 1 is an empty"),
        ([[1, 2], [3, 10]], "fact 1 has token id 10"),
        ([[1, 2], [3], [4, -1]], "fact 2 has token id -1"),
        ([[1], "ab"], "fact 1 must be a sequence of token ids"),
        ([[1], [1.5]], "fact 1 must hold integer"),
        ([[1], 3], "fact 1 must be a sequence"),
        ([], "at least one fact"),
        (np.zeros((2, 3), np.float32), "integer"),
        (np.zeros(5, np.int64), "2-D"),
    ],
)
def test_bad_sequences(tmp_path, facts, msg):
    with pytest.raises(kcore.InvalidInputError, match=msg):
        build(facts, 10, tmp_path)
    assert not any(tmp_path.iterdir())  # nothing left behind


def test_bad_index_counts_across_chunks(tmp_path):
    facts = ([1, 2] for _ in range(70000))

    def gen():
        yield from facts
        yield [99]

    with pytest.raises(kcore.InvalidInputError, match="fact 70000 has token id 99"):
        build(gen(), 10, tmp_path)


@pytest.mark.parametrize("vocab", [0, -3, 1 << 25, 2.5, True])
def test_bad_vocab_size(tmp_path, vocab):
    with pytest.raises(kcore.InvalidInputError, match="vocab_size"):
        build([[0]], vocab, tmp_path)


def test_external_memory_build_is_identical(tmp_path):
    rng = np.random.default_rng(7)
    facts = [rng.integers(0, 50, size=rng.integers(1, 9)).tolist() for _ in range(6000)]
    facts += facts[:500]
    mem = build(facts, 50, tmp_path, "mem.ktrie")
    ext = build(facts, 50, tmp_path, "ext.ktrie", memory_budget_bytes=4096, tmp_dir=tmp_path)
    assert mem.build_stats["num_runs"] == 0 and ext.build_stats["num_runs"] > 10
    assert Path(mem.path).read_bytes() == Path(ext.path).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.ktrie", "mem.ktrie"]  # runs removed


def test_tiny_budget_folds_runs(tmp_path):
    # A budget of one byte spills every fact: more runs than may be open at once get folded.
    rng = np.random.default_rng(8)
    facts = [rng.integers(0, 30, size=rng.integers(1, 5)).tolist() for _ in range(300)]
    mem = build(facts, 30, tmp_path, "mem.ktrie")
    ext = build(facts, 30, tmp_path, "ext.ktrie", memory_budget_bytes=1)
    assert ext.build_stats["num_runs"] == 300
    assert Path(mem.path).read_bytes() == Path(ext.path).read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.ktrie", "mem.ktrie"]


def test_dag_shares_fact_endings(tmp_path):
    # 200 subjects x the same 3 endings: a DAG stores the endings once.
    facts = [[s, 1000 + r, 2000 + r, 3000] for s in range(200) for r in range(3)]
    trie = build(facts, 4000, tmp_path)
    assert trie.num_trie_nodes == 1 + 200 * 10
    assert trie.num_nodes < 220
    check_against_oracle(trie, Oracle(facts), 4000, np.random.default_rng(0))


# ---------------------------------------------------------------- threads


def test_eight_threads_read_one_trie(tmp_path):
    rng = np.random.default_rng(3)
    vocab = 49152
    facts = [rng.integers(0, 2000, size=rng.integers(2, 10)).tolist() for _ in range(20000)]
    trie = build(facts, vocab, tmp_path)
    batch = np.array([trie.root_state] * 64, dtype=np.int64)
    paths = [facts[i] for i in rng.integers(0, len(facts), 64)]

    def walk():
        states, masks, ranges = batch.copy(), [], []
        for k in range(10):
            mask = np.zeros((64, vocab // 32), dtype=np.int32)
            trie.fill_bitmask(states, mask)
            masks.append(mask)
            ranges.append(trie.fact_range(states))
            toks = np.array([p[k] if k < len(p) else 0 for p in paths])
            states = trie.step(states, toks)
        return states, masks, ranges

    expected = walk()
    results, errors = [None] * 8, []

    def worker(i):
        try:
            for _ in range(20):
                results[i] = walk()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for r in results:
        assert np.array_equal(r[0], expected[0])
        assert all(np.array_equal(a, b) for a, b in zip(r[1], expected[1]))
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(r[2], expected[2]))


def test_shared_smallest_child(tmp_path):
    # The node after [2] has children 3 (shared with the path [1], already stored) and 4 (new,
    # stored right after it): the record lists 4 first, ranks must still follow token order.
    facts = [[1, 7, 7], [2, 3, 7], [2, 4, 8, 8], [2, 4, 8, 9], [2]]
    trie = build(facts, 10, tmp_path)
    assert trie.num_nodes < trie.num_trie_nodes
    check_against_oracle(trie, Oracle(facts), 10, np.random.default_rng(0))
    s = trie.state_of([2])
    first, count = trie.fact_range(trie.step([s, s], [3, 4]))
    assert first.tolist() == [2, 3] and count.tolist() == [1, 2]
    mask = np.zeros((1, 1), dtype=np.int32)
    trie.fill_bitmask([s], mask, written_offsets=[0, 2], written_ids=[3, 4])
    assert bitmask_tokens(mask[0]) == [3]
