"""The text -> trie pipeline: exact tokenization (word cache), KB files, errors, interruption."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

import kcore
from kcore.errors import FileFormatError, KcoreError
from kcore.fact_tokenizer import FactTokenizer
from kcore.trie import FactTrie

WORDS = ["Paris", "capital", "France", "New", "York", "state", "São", "Paulo", "population", "Zürich", "'s",
         "O'Brien", "3.5", "2024-01-31", "東京", "(city)", "--", "U.S.", "x", "."]


def _corpus(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 7)).tolist()) for _ in range(n)]


def _train(pre_tokenizer, normalizer=None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tok.normalizer = normalizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A real byte-level BPE tokenizer (GPT-2 style), trained here in milliseconds, as a
    transformers fast tokenizer and as a saved folder."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=_train(pre_tokenizers.ByteLevel(add_prefix_space=False)))
    folder = tmp_path_factory.mktemp("bpe")
    hf.save_pretrained(folder)
    return hf, folder


AWKWARD = [
    "France capital Paris .",
    " France capital Paris .",       # already has its leading space
    "France  capital   Paris .",     # whitespace runs: tokenized whole
    "France\tcapital Paris .",       # a tab: tokenized whole
    "São Paulo state São Paulo .",
    "O'Brien's x 3.5 .",
    "東京 (city) U.S. -- 2024-01-31",
    "x<|endoftext|>x .",             # a special token's text inside a word
    "trailing space ",
    "unknownword Zzyzx .",
]


def _reference(tok, facts):
    return [tok(" " + f if not f[:1].isspace() else f, add_special_tokens=False)["input_ids"] for f in facts]


def test_word_cache_gives_the_tokenizers_tokens(bpe):
    tok, _ = bpe
    ft = FactTokenizer(tok)
    assert ft.word_cache
    facts = AWKWARD + _corpus(500, seed=1)
    for start in (0, 7):  # the second call runs on a warm cache and sampled verification
        tokens, offsets = ft.encode(facts[start:], first_index=start)
        ref = _reference(tok, facts[start:])
        assert [tokens[offsets[i]:offsets[i + 1]].tolist() for i in range(len(ref))] == ref
    exact = FactTokenizer(tok, word_cache=False)
    t2, o2 = exact.encode(facts)
    t1, o1 = FactTokenizer(tok).encode(facts)
    assert np.array_equal(t1, t2) and np.array_equal(o1, o2)


def test_word_cache_only_where_the_tokenizer_allows_it():
    from tokenizers import normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Metaspace (SentencePiece style) and a lowercasing normalizer: not proven safe, so off.
    for tok in (_train(pre_tokenizers.Metaspace()), _train(pre_tokenizers.ByteLevel(), normalizers.Lowercase())):
        hf = PreTrainedTokenizerFast(tokenizer_object=tok)
        assert not FactTokenizer(hf).word_cache
        with pytest.raises(KcoreError, match="does not allow the word cache"):
            FactTokenizer(hf, word_cache=True)
        t, o = FactTokenizer(hf).encode(AWKWARD)
        assert [t[o[i]:o[i + 1]].tolist() for i in range(len(AWKWARD))] == _reference(hf, AWKWARD)
    assert not FactTokenizer(PreTrainedTokenizerFast(tokenizer_object=_train(pre_tokenizers.ByteLevel())),
                             leading_space=False).word_cache


def test_fact_errors_name_the_fact(bpe):
    tok, _ = bpe
    for word_cache in (True, False):
        ft = FactTokenizer(tok, word_cache=word_cache)
        with pytest.raises(kcore.InvalidInputError, match="fact 11 is empty"):
            ft.encode(["a b", "  "], first_index=10)
        with pytest.raises(kcore.InvalidInputError, match="fact 1 must be a str"):
            ft.encode(["a b", 3])


def _write_kb(path, n, seed=0, bad_every=0):
    rng = np.random.default_rng(seed)
    words = np.array(WORDS[:12])
    a, b = rng.choice(words, size=n).tolist(), rng.choice(words, size=n).tolist()
    lines = ["subject\trelation\tobject\n"]
    for i in range(n):
        if bad_every and i % bad_every == bad_every - 1:
            lines.append("a line without tabs\n")
        else:
            lines.append(f"{a[i]} {b[i]} {i}\t{words[i % 7]}\t{words[i % 5]} {i % 113}\n")
    with gzip.open(path, "wt", compresslevel=1) as f:
        f.write("".join(lines))


def test_from_kb_file_equals_a_build_from_the_tokenizers_ids(bpe, tmp_path):
    from kcore.kb_files import iter_facts
    from kcore.tokenizer import tokenizer_fingerprint

    tok, _ = bpe
    kb = tmp_path / "kb.tsv.gz"
    _write_kb(kb, 20_000)
    # A small budget: several sorted runs, and the word cache cleared along the way.
    trie = FactTrie.from_kb_file(kb, tok, tmp_path / "a.ktrie", memory_budget_bytes=200_000, progress=False, batch_size=1000)
    assert trie.build_stats["num_runs"] > 1 and trie.build_stats["word_cache"] and trie.build_stats["lines"] == 20_001
    ids = _reference(tok, list(iter_facts(kb)))
    ref = FactTrie.build(ids, tmp_path / "b.ktrie", vocab_size=len(tok), tokenizer_fingerprint=tokenizer_fingerprint(tok),
                         progress=False)
    assert (tmp_path / "a.ktrie").read_bytes() == (tmp_path / "b.ktrie").read_bytes()
    assert trie.num_facts == ref.num_facts == 20_000
    assert sorted(os.listdir(tmp_path)) == ["a.ktrie", "b.ktrie", "kb.tsv.gz"]


def test_bad_lines_in_the_pipeline(bpe, tmp_path):
    tok, _ = bpe
    kb = tmp_path / "kb.tsv.gz"
    _write_kb(kb, 5000, bad_every=1000)
    with pytest.raises(FileFormatError, match=rf"{kb}:1001: expected 3 fields"):
        FactTrie.from_kb_file(kb, tok, tmp_path / "t.ktrie", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["kb.tsv.gz"]  # nothing written, nothing left
    with pytest.warns(UserWarning, match="skipped 5 malformed line"):
        trie = FactTrie.from_kb_file(kb, tok, tmp_path / "t.ktrie", bad_lines="skip", progress=False)
    assert trie.num_facts == 4995 and trie.build_stats["bad_lines"] == 5
    assert trie.build_stats["bad_line_examples"][0].startswith(f"{kb}:1001: ")
    (tmp_path / "empty.tsv").write_text("# nothing\n")
    with pytest.raises(FileFormatError, match="no facts in the file"):
        FactTrie.from_kb_file(tmp_path / "empty.tsv", tok, tmp_path / "e.ktrie", progress=False)


def test_builder_thread_error_reaches_the_caller(tmp_path):
    # An id out of range is found on the builder thread; the caller gets the error, and no file.
    with pytest.raises(kcore.InvalidInputError, match="fact 70000 has token id 99"):
        FactTrie.build(([1, 2] if i != 70_000 else [99] for i in range(100_000)), tmp_path / "t.ktrie",
                       vocab_size=50, progress=False)
    assert os.listdir(tmp_path) == []


def test_nested_token_lists_are_refused(tmp_path):
    # Issue 12 item 10: a list of facts given as one fact used to build the single fact [5, 6].
    with pytest.raises(kcore.InvalidInputError, match="sequences: fact 0 must be a flat sequence of token ids"):
        FactTrie.build([[[5, 6, 7], [8, 9, 1]]], tmp_path / "t.ktrie", vocab_size=10, progress=False)
    with pytest.raises(kcore.InvalidInputError, match="sequences: fact 1 must be a flat sequence"):
        FactTrie.build([[1, 2], [[3, 4], [5, 6]], [7]], tmp_path / "t.ktrie", vocab_size=10, progress=False)
    with pytest.raises(kcore.InvalidInputError, match="sequences: fact 1 must be a flat sequence"):
        FactTrie.build([[1, 2], [[3, 4], [5]]], tmp_path / "t.ktrie", vocab_size=10, progress=False)
    with pytest.raises(kcore.InvalidInputError, match="fact 1 must hold integer token ids"):
        FactTrie.build([[1, 2], [3, "4"]], tmp_path / "t.ktrie", vocab_size=10, progress=False)
    assert os.listdir(tmp_path) == []
    t = FactTrie.build([[5, 6, 7], [8, 9, 1]], tmp_path / "t.ktrie", vocab_size=10, progress=False)
    assert t.num_facts == 2 and t.contains([5, 6, 7]) and not t.contains([5, 6])


# ---------------------------------------------------------------- interruption

CHILD = textwrap.dedent(
    """
    import signal, sys, itertools
    # A process started in the background by a shell inherits SIGINT ignored; Ctrl-C is what this
    # child simulates, so it gets Python's own handler back.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    from tokenizers import Tokenizer
    from kcore.trie import FactTrie
    mode, kb, out, tok = sys.argv[1:5]
    def announce(it, what):
        for i, x in enumerate(it):
            if i == 50:
                print(what, flush=True)
            yield x
        print("fed", flush=True)
    if mode == "text":  # reading, tokenizing and adding on the builder thread
        from kcore.kb_files import iter_facts
        FactTrie.from_facts(announce(iter_facts(kb), "started"), Tokenizer.from_file(tok), out,
                            memory_budget_bytes=1 << 20, progress=False, batch_size=64)
    else:  # token ids: a native merge of many small runs, slowed down so the signal lands inside it
        import time, types
        import kcore.trie_build as tb
        C = tb.native()

        class SlowMerge(C.TrieBuilder):
            # The merge calls the progress hook now and then; this wraps whatever hook the builder
            # installs, announces the merge once and sleeps, so the merge outlasts the signal's
            # delivery on any machine (a fast one used to finish first).
            @property
            def progress(self):
                return C.TrieBuilder.progress.__get__(self)

            @progress.setter
            def progress(self, hook):
                said = []
                def slow(phase, done):
                    if phase == 1:
                        if not said:
                            said.append(1)
                            print("merging", flush=True)
                        time.sleep(0.2)
                    return hook(phase, done)
                C.TrieBuilder.progress.__set__(self, slow)

        tb.native = lambda: types.SimpleNamespace(TrieBuilder=SlowMerge)
        facts = ([i % 1000, (i * 7919) % 1000, i % 997, (i // 1000) % 1000] for i in range(400_000))
        FactTrie.build(announce(facts, "started"), out, vocab_size=1000, memory_budget_bytes=1 << 20, progress=False)
    print("finished", flush=True)
    """
)


def _run_and_signal(tmp_path, mode, kb, tok_file, trigger, sig):
    out = tmp_path / "out" / "kb.ktrie"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, mode, str(kb), str(out), str(tok_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    reader = threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while trigger not in "".join(seen) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert trigger in "".join(seen), (seen, proc.poll())
    time.sleep(0.3)
    proc.send_signal(sig)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("the build did not stop within 60 s of the signal")
    stderr = proc.stderr.read()
    return rc, "".join(seen), stderr, out.parent


@pytest.fixture(scope="module")
def big_kb(tmp_path_factory, bpe):
    folder = tmp_path_factory.mktemp("kb")
    kb = folder / "kb.tsv.gz"
    _write_kb(kb, 150_000)
    tok_file = folder / "tokenizer.json"
    bpe[0].backend_tokenizer.save(str(tok_file))
    return kb, tok_file


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_while_reading_leaves_nothing(tmp_path, big_kb, sig):
    kb, tok_file = big_kb
    rc, out, err, folder = _run_and_signal(tmp_path, "text", kb, tok_file, "started", sig)
    assert "finished" not in out and rc != 0
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    assert os.listdir(folder) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_in_the_native_merge_leaves_nothing(tmp_path, big_kb, sig):
    kb, tok_file = big_kb
    rc, out, err, folder = _run_and_signal(tmp_path, "ids", kb, tok_file, "merging", sig)
    assert "finished" not in out and rc != 0, (out, err)
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err
    assert os.listdir(folder) == []


@pytest.mark.slow
def test_cli_sigterm_leaves_nothing(tmp_path, big_kb, bpe):
    kb, _ = big_kb
    out = tmp_path / "kb.ktrie"
    proc = subprocess.Popen([sys.executable, "-m", "kcore", "build-trie", "--facts", str(kb), "--tokenizer", str(bpe[1]),
                             "--out", str(out), "--memory-budget", "1M"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(64), "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while "tokenizing facts" not in "".join(err) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    reader.join(timeout=10)
    assert "terminated; no file written" in "".join(err)
    assert sorted(os.listdir(tmp_path)) == []
