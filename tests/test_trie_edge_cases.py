"""Edge cases of kcore.FactTrie found by review: inputs a user may pass, files replaced while loaded."""

import os
import pickle
import threading

import numpy as np
import pytest

from kcore import FactTrie
from kcore.errors import InvalidInputError

FACTS = [[1, 2, 3], [1, 2, 4], [1, 5], [7], [1, 2, 3]]


def _oracle_next(facts, prefix):
    n = len(prefix)
    return sorted({f[n] for f in facts if len(f) > n and list(f[:n]) == list(prefix)})


@pytest.fixture
def trie(tmp_path):
    return FactTrie.build(FACTS, tmp_path / "a.ktrie", vocab_size=10, progress=False)


@pytest.mark.parametrize("big", [2**63, 2**64 + 5])
def test_python_int_beyond_int64_is_a_kcore_error(tmp_path, big):
    # Before: numpy's OverflowError ("Python int too large to convert to C long"), no fact named.
    with pytest.raises(InvalidInputError, match=r"fact 1 has token id"):
        FactTrie.build([[1], [2, big]], tmp_path / "x.ktrie", vocab_size=10, progress=False)


@pytest.mark.parametrize(
    "make",
    [
        lambda: [np.array([1], np.uint64), np.array([2**63 + 1], np.uint64)],
        lambda: np.array([[1], [2**63 + 1]], np.uint64),
    ],
)
def test_uint64_ids_do_not_wrap_to_negative(tmp_path, make):
    # Before: 2**63 + 1 wrapped to a negative int64 and the message named a wrong (negative) id.
    with pytest.raises(InvalidInputError, match=r"fact 1 has token id 9223372036854775807") as e:
        FactTrie.build(make(), tmp_path / "x.ktrie", vocab_size=10, progress=False)
    assert "-" not in str(e.value).split("token id")[1].split()[0]


def test_uint64_states_do_not_wrap(trie):
    with pytest.raises(InvalidInputError, match="state 9223372036854775807 is not a state"):
        trie.step(np.array([2**63 + 1], np.uint64), np.array([1]))


def test_load_a_directory(tmp_path):
    with pytest.raises(IsADirectoryError, match="directory"):
        FactTrie.load(tmp_path)


def test_build_into_a_directory_fails_before_building(tmp_path):
    def facts():
        yield [1]
        raise AssertionError("the facts must not be read when the output path is a directory")

    with pytest.raises(IsADirectoryError, match="directory"):
        FactTrie.build(facts(), tmp_path, vocab_size=10, progress=False)
    assert os.listdir(tmp_path) == []


def test_load_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        FactTrie.load(tmp_path / "missing.ktrie")
    (tmp_path / "empty.ktrie").write_bytes(b"")
    from kcore.errors import FileFormatError

    with pytest.raises(FileFormatError, match="empty.ktrie"):
        FactTrie.load(tmp_path / "empty.ktrie")


def test_replacing_the_file_by_rename_while_loaded(tmp_path):
    path = tmp_path / "kb.ktrie"
    old = FactTrie.build(FACTS, path, vocab_size=10, progress=False)
    new_facts = [[3, 3], [4]]
    new = FactTrie.build(new_facts, path, vocab_size=10, progress=False)  # temp file + rename
    # The loaded trie still reads the old version; a fresh load reads the new one.
    assert old.next_tokens([1, 2]).tolist() == _oracle_next(FACTS, [1, 2])
    assert old.contains([7]) and not old.contains([4])
    assert new.contains([4]) and FactTrie.load(path).next_tokens([]).tolist() == [3, 4]
    assert pickle.loads(pickle.dumps(new)).contains([3, 3])


def test_very_long_fact_and_its_prefixes(tmp_path):
    rs = np.random.RandomState(0)
    long = rs.randint(0, 50000, 10000).tolist()
    facts = [long, long[:3], long[:5000] + [49999]]
    t = FactTrie.build(facts, tmp_path / "long.ktrie", vocab_size=50000, progress=False)
    assert t.contains(long) and t.contains(long[:3]) and not t.contains(long[:-1])
    for n in (0, 3, 4999, 5000, 9999, 10000):
        assert t.next_tokens(long[:n]).tolist() == _oracle_next(facts, long[:n])
    states = np.array([t.root_state])
    for tok in long:
        states = t.step(states, np.array([tok]))
    assert bool(t.is_complete(states)[0])


def test_many_identical_facts_and_tiny_memory_budget(tmp_path):
    facts = [[i % 7, (i * 3) % 7, i % 5] for i in range(3000)] + [[1, 2, 3]] * 2000
    t = FactTrie.build(facts, tmp_path / "tb.ktrie", vocab_size=10, progress=False, memory_budget_bytes=64)
    distinct = {tuple(f) for f in facts}
    assert t.num_facts == len(distinct)
    for prefix in ([], [1], [1, 2], [6, 4]):
        assert t.next_tokens(prefix).tolist() == _oracle_next(list(distinct), prefix)


def test_fill_bitmask_releases_the_gil(tmp_path):
    rs = np.random.RandomState(0)
    facts = [rs.randint(0, 1000, rs.randint(1, 6)).tolist() for _ in range(2000)]
    t = FactTrie.build(facts, tmp_path / "g.ktrie", vocab_size=1000, progress=False)
    states = np.full(100000, t.root_state)
    bitmask = np.zeros((100000, 32), np.int32)
    done = threading.Event()
    ticks = 0

    def work():
        for _ in range(3):
            t.fill_bitmask(states, bitmask)
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    while not done.is_set():
        ticks += 1
        done.wait(0.0005)
    worker.join()
    assert ticks > 5  # the main thread ran while C++ filled the rows
    first = sorted({f[0] for f in facts})
    row = np.unpackbits(bitmask[0].view(np.uint8), bitorder="little")[:1000]
    assert np.flatnonzero(row).tolist() == first


def _walk_everything(t, facts):
    frontier = [t.root_state]
    for _ in range(8):
        nxt = []
        for s in frontier[:200]:
            toks = t.next_tokens_from(s).astype(np.int64)
            ns = t.step(np.full(len(toks), s), toks)
            t.is_complete(ns)
            t.fact_range(ns)
            if len(ns):
                t.fill_bitmask(ns, np.zeros((len(ns), 10), np.int32))
            nxt += [x for x in ns.tolist() if x >= 0]
        frontier = nxt
    for f in facts[:100]:
        t.contains(f)


@pytest.mark.parametrize("seed", [1, 4])
def test_corrupted_data_section_is_the_files_fault(tmp_path, seed):
    # The data checksum is only verified with verify="full". Before: corrupted leaf counts made
    # step() return states the next call rejected with InvalidInputError ("not a state of this
    # trie"), blaming the caller. Now every failure on a corrupted file is a FileFormatError.
    from kcore.errors import FileFormatError

    rs = np.random.RandomState(seed)
    facts = [rs.randint(0, 300, rs.randint(1, 7)).tolist() for _ in range(500)]
    path = tmp_path / "f.ktrie"
    FactTrie.build(facts, path, vocab_size=300, progress=False)
    raw = path.read_bytes()
    for trial in range(30):
        b = bytearray(raw)
        for _ in range(rs.randint(1, 20)):
            b[rs.randint(256, len(b))] = rs.randint(256)
        bad = tmp_path / f"c{trial}.ktrie"
        bad.write_bytes(bytes(b))
        try:
            _walk_everything(FactTrie.load(bad), facts)
        except FileFormatError:
            pass


def test_errors_name_the_argument(trie):
    with pytest.raises(InvalidInputError, match="^sequence must hold integers"):
        trie.contains("abc")
    with pytest.raises(InvalidInputError, match="^prefix must hold integers"):
        trie.next_tokens([1.5])
    with pytest.raises(InvalidInputError, match="^tokens must hold integers"):
        trie.step([trie.root_state], [1.0])


class _CharTokenizer:
    """Just enough of a Hugging Face tokenizer for from_facts' argument checks."""

    def __len__(self):
        return 256

    def get_vocab(self):
        return {chr(i): i for i in range(256)}


@pytest.mark.parametrize("facts", ["France capital Paris .", b"France capital Paris ."])
def test_from_facts_rejects_a_single_string(tmp_path, facts):
    # Before: the string was iterated character by character ("fact 6 is empty or whitespace only").
    with pytest.raises(InvalidInputError, match="iterable of strings, got a single"):
        FactTrie.from_facts(facts, _CharTokenizer(), tmp_path / "s.ktrie", progress=False)
