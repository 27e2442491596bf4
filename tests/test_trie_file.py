"""The .ktrie file: atomic write, validation on load, corruption, tokenizer fingerprints."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import kcore
from kcore.trie import FactTrie

HEADER = 256


@pytest.fixture()
def trie_file(tmp_path):
    rng = np.random.default_rng(0)
    facts = [rng.integers(0, 500, size=rng.integers(1, 8)).tolist() for _ in range(3000)]
    t = FactTrie.build(facts, tmp_path / "kb.ktrie", vocab_size=500, tokenizer_fingerprint="abc123", progress=False)
    return tmp_path / "kb.ktrie", facts


def test_roundtrip_and_header_fields(trie_file):
    path, facts = trie_file
    t = FactTrie.load(path, verify="full")
    assert t.num_facts == len({tuple(f) for f in facts})
    assert t.vocab_size == 500 and t.tokenizer_fingerprint == "abc123"
    assert t.nbytes == os.path.getsize(path) and t.path == str(path)
    assert all(t.contains(f) for f in facts[:100])
    assert not list(path.parent.glob("*.tmp.*"))
    assert path.read_bytes()[:8] == b"KCORTRIE"


def test_load_does_not_read_the_data(trie_file, tmp_path):
    # A flipped bit in the data section is found by verify="full" / verify(), not by the default.
    path, _ = trie_file
    data = bytearray(path.read_bytes())
    data[HEADER + 10] ^= 0x10
    bad = tmp_path / "bad.ktrie"
    bad.write_bytes(bytes(data))
    t = FactTrie.load(bad)
    with pytest.raises(kcore.FileFormatError, match="data section is corrupted"):
        t.verify()
    with pytest.raises(kcore.FileFormatError, match=f"'{bad}'.*data section is corrupted"):
        FactTrie.load(bad, verify="full")


@pytest.mark.parametrize("keep", [0, 5, 100, HEADER - 1, HEADER, HEADER + 7, -1, -9])
def test_truncated(trie_file, tmp_path, keep):
    path, _ = trie_file
    data = path.read_bytes()
    cut = tmp_path / "cut.ktrie"
    cut.write_bytes(data[:keep] if keep >= 0 else data[:keep])
    with pytest.raises(kcore.FileFormatError, match="truncated|bad magic") as e:
        FactTrie.load(cut)
    assert str(cut) in str(e.value)


def test_trailing_bytes(trie_file, tmp_path):
    path, _ = trie_file
    longer = tmp_path / "long.ktrie"
    longer.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(kcore.FileFormatError, match="the file has"):
        FactTrie.load(longer)


def test_every_bit_flip_is_detected(trie_file, tmp_path):
    path, _ = trie_file
    data = path.read_bytes()
    rng = np.random.default_rng(1)
    positions = list(range(0, HEADER, 3)) + rng.integers(HEADER, len(data), 200).tolist()
    for pos in positions:
        flipped = bytearray(data)
        flipped[pos] ^= 1 << int(rng.integers(8))
        bad = tmp_path / "flip.ktrie"
        bad.write_bytes(bytes(flipped))
        with pytest.raises(kcore.FileFormatError):
            FactTrie.load(bad, verify="full")


def test_wrong_magic(trie_file, tmp_path):
    path, _ = trie_file
    bad = tmp_path / "magic.ktrie"
    bad.write_bytes(b"PK\x03\x04" + path.read_bytes()[4:])
    with pytest.raises(kcore.FileFormatError, match="not a kcore trie file"):
        FactTrie.load(bad)
    other = tmp_path / "text.ktrie"
    other.write_text("hello")
    with pytest.raises(kcore.FileFormatError, match="not a kcore trie file"):
        FactTrie.load(other)


@pytest.mark.parametrize("version", [1, 3])
def test_wrong_version(trie_file, tmp_path, version):
    # Version 1 is the format before the token table and streamed layout: refused with a clear
    # message (kcore ask's cache rebuilds such a file by itself).
    path, _ = trie_file
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, 8, version)
    bad = tmp_path / f"v{version}.ktrie"
    bad.write_bytes(bytes(data))
    with pytest.raises(kcore.FileFormatError, match=f"format version {version} is not supported.*reads version 2.*rebuild"):
        FactTrie.load(bad)


def test_pickles_as_its_path(trie_file):
    import pickle

    path, facts = trie_file
    t = pickle.loads(pickle.dumps(FactTrie.load(path)))
    assert t.path == str(path) and t.contains(facts[0])


def test_missing_file(tmp_path):
    with pytest.raises(OSError):
        FactTrie.load(tmp_path / "nope.ktrie")


def test_bad_verify_argument(trie_file):
    with pytest.raises(kcore.InvalidInputError, match="verify"):
        FactTrie.load(trie_file[0], verify="some")


def test_rebuild_replaces_atomically(trie_file):
    path, facts = trie_file
    old = FactTrie.load(path)
    new = FactTrie.build([[1, 2, 3]], path, vocab_size=500, progress=False)
    # The old mapping still reads the old file (rename, not overwrite in place).
    assert old.contains(facts[0]) and new.num_facts == 1 and not new.contains(facts[0])


# ---------------------------------------------------------------- real tokenizer


@pytest.fixture(scope="module")
def swapped_tokenizer(smollm2_tokenizer, tmp_path_factory):
    """SmolLM2's tokenizer with the ids of two ordinary tokens swapped."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tok")
    smollm2_tokenizer.save_pretrained(folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "Paris", "London"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.convert_tokens_to_ids(a) == smollm2_tokenizer.convert_tokens_to_ids(b)
    return tok


@pytest.mark.slow
def test_from_facts_and_tokenizer_mismatch(smollm2_tokenizer, swapped_tokenizer, tmp_path):
    tok = smollm2_tokenizer
    facts = ["France capital Paris .", "France continent Europe .", "Japan capital Tokyo .", "France capital Paris ."]
    trie = FactTrie.from_facts(facts, tok, tmp_path / "kb.ktrie", batch_size=2, progress=False)
    assert trie.num_facts == 3 and trie.vocab_size == len(tok)
    ids = tok(" France capital Paris .", add_special_tokens=False)["input_ids"]
    assert trie.contains(ids)
    assert trie.next_tokens(tok(" France", add_special_tokens=False)["input_ids"]).tolist() == sorted(
        {tok(" France capital", add_special_tokens=False)["input_ids"][1], tok(" France continent", add_special_tokens=False)["input_ids"][1]}
    )
    FactTrie.load(trie.path, tokenizer=tok)
    with pytest.raises(kcore.TokenizerMismatchError, match="another tokenizer"):
        FactTrie.load(trie.path, tokenizer=swapped_tokenizer)
    with pytest.raises(kcore.InvalidInputError, match="fact 1 is empty"):
        FactTrie.from_facts(["a b .", "  "], tok, tmp_path / "x.ktrie", progress=False)
    with pytest.raises(kcore.InvalidInputError, match="fact 0 must be a str"):
        FactTrie.from_facts([3], tok, tmp_path / "x.ktrie", progress=False)


def test_corrupted_data_never_crashes(trie_file, tmp_path):
    """With the default header-only check, a corrupted data section gives kcore errors or wrong
    answers, never a crash or a write outside the bitmask."""
    path, facts = trie_file
    data = path.read_bytes()
    rng = np.random.default_rng(5)
    prefixes = [f[: int(rng.integers(0, len(f)))] for f in facts[:200]]
    for trial in range(40):
        flipped = bytearray(data)
        for pos in rng.integers(HEADER, len(data) - 8, 20):
            flipped[pos] = int(rng.integers(256))
        bad = tmp_path / f"c{trial}.ktrie"
        bad.write_bytes(bytes(flipped))
        t = FactTrie.load(bad)
        guard = np.zeros((len(prefixes) + 1, 16 + 1), dtype=np.int32)
        for p in prefixes:
            try:
                s = t.state_of(p)
                t.next_tokens(p)
                t.fact_range([s])
                t.is_complete([s])
                t.fill_bitmask([s], guard[:1, :16])
                t.step([s], [int(rng.integers(500))])
            except (kcore.FileFormatError, kcore.InvalidInputError):
                pass
        assert not guard[1:].any() and not guard[:, 16:].any()


def test_forged_states_never_crash(trie_file):
    path, _ = trie_file
    t = FactTrie.load(path)
    rng = np.random.default_rng(6)
    states = (rng.integers(0, t.num_facts, 500) << 32) | rng.integers(0, t.nbytes - 264, 500)
    mask = np.zeros((1, 16), dtype=np.int32)
    for s in states.tolist():
        for call in (lambda: t.step([s], [3]), lambda: t.fact_range([s]), lambda: t.fill_bitmask([s], mask)):
            try:
                call()
            except (kcore.FileFormatError, kcore.InvalidInputError):
                pass
