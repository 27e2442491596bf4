"""The fact trie: tokenized knowledge-base facts in a compact, memory-mapped prefix automaton.

A :class:`FactTrie` stores a set of token-id sequences (facts such as the tokens of
``" France capital Paris ."``) and answers, for any prefix, which tokens continue some fact. It is
the data structure of trie-constrained decoding (GENRE, De Cao et al. 2021; ReFactX, 2025): while
a model writes a fact, only the tokens the trie allows keep their logits.

Storage: the facts are sorted and turned into the minimal acyclic automaton of their token
sequences (a DAWG: identical fact endings such as ``" capital Paris ."`` are stored once; Daciuk et
al. 2000), written out as byte records while it is built (children after their parent; single-
child runs stored without pointers; tokens as codes ranked by frequency, so frequent tokens take
one byte; child positions as short distances). Each node keeps the number of facts below it, so the facts through any cursor state
form an id range (the DAWG perfect-hash numbering of Lucchesi & Kowaltowski 1993). The ``.ktrie``
file (format in ``csrc/core/ktrie_format.h``) is written atomically and loaded with ``mmap``.

Verification on load: :meth:`FactTrie.load` always checks the magic, format version, a checksum
of the header (which holds the section table and the tokenizer fingerprint) and the file size (so
truncation is always caught); that costs the same for any file size. The checksum of the whole
data section is verified only with ``verify="full"`` (or :meth:`FactTrie.verify`), which reads
the whole file. Reads are bound-checked, so a corrupted data section that slipped through raises
a :class:`kcore.FileFormatError` or gives wrong answers, never a crash.

Limits of format version 2: vocab_size <= 2^24, fewer than 2^32 distinct facts, and a cursor state
of 63 bits: (bits of the number of facts) + (bits of the data section's size) <= 63, i.e. facts x
bytes below about 2^63: 1 billion facts fit in a trie of up to 8 GiB (8.6 bytes/fact; the built-in
KB takes 8.0), 500 million in up to 16 GiB; a larger build stops with an error saying so. Memory
while building is bounded by ``memory_budget_bytes`` (the sort buffer, then the register of
frozen nodes; the automaton is written out as it is built), whatever the number of facts.
Tested: ranks above 2^24 and a data section above 4 GiB (``tests/test_trie_limits.py``).

A loaded file must not be modified in place (truncated or overwritten through the same inode):
like any ``mmap`` reader, the process would then read changed bytes or die of ``SIGBUS`` on pages
past the new end. Replacing the file by a rename, as :meth:`FactTrie.build` does, is safe: a
loaded trie keeps reading the old version, a new :meth:`FactTrie.load` sees the new one.

Cursor states are ``int64`` values (opaque; ``-1`` = dead, no fact continues). They are valid only
for the trie that produced them (a state of another trie is rejected when it is not a node
offset of this one; when it happens to be one, the answer is meaningless, or a FileFormatError
when the offset falls inside a record). All batched calls run in one C++ call with the GIL released; a
loaded trie may be read from many threads at once.
"""

from __future__ import annotations

import errno
import itertools
import os
from typing import Iterable, Optional, Tuple

import numpy as np

from kcore._native import native
from kcore.errors import InvalidInputError, TokenizerMismatchError

__all__ = ["FactTrie", "DEAD_STATE"]

DEAD_STATE = -1
_DEFAULT_BUDGET = 1 << 30  # kcore.trie_build.DEFAULT_MEMORY_BUDGET
_CHUNK = 1 << 16


def _to_int64(a: np.ndarray) -> np.ndarray:
    """Integer array as int64; uint64 values above the int64 range saturate instead of wrapping to
    negative numbers (which would make error messages name a wrong id)."""
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        a = np.minimum(a, np.uint64(np.iinfo(np.int64).max))
    return a.astype(np.int64)


def _as_states(x, name: str) -> np.ndarray:
    if type(x) is np.ndarray and x.dtype == np.int64:
        return x
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.int64:
        return a
    if a.size == 0:
        return a.astype(np.int64)
    if a.dtype.kind not in "iu":
        raise InvalidInputError(f"{name} must hold integers, got dtype {a.dtype}")
    return _to_int64(a)


def _is_sequence(t) -> bool:
    return hasattr(t, "__len__") and not isinstance(t, (str, bytes))


def _nested(batch: list, first_index: int, i: int) -> InvalidInputError:
    return InvalidInputError(
        f"sequences: fact {first_index + i} must be a flat sequence of token ids, got nested sequences "
        f"({list(batch[i])[:2]!r}); pass the facts themselves, e.g. [[5, 6, 7], [8, 9, 1]]"
    )


def _flatten_chunk(batch: list, first_index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Concatenate a list of token sequences into (tokens int64, offsets int64)."""
    try:
        lengths = np.fromiter((len(s) for s in batch), dtype=np.int64, count=len(batch))
    except TypeError:
        bad = next(i for i, s in enumerate(batch) if not hasattr(s, "__len__"))
        raise InvalidInputError(
            f"fact {first_index + bad} must be a sequence of token ids, got {type(batch[bad]).__name__}"
        ) from None
    offsets = np.zeros(len(batch) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if all(isinstance(s, np.ndarray) for s in batch):
        for i, s in enumerate(batch):
            if s.ndim != 1 or (s.size and s.dtype.kind not in "iu"):
                raise InvalidInputError(
                    f"fact {first_index + i} must be a 1-D integer array, got shape {s.shape} dtype {s.dtype}"
                )
        tokens = _to_int64(np.concatenate(batch)) if batch else np.zeros(0, np.int64)
        return tokens, offsets
    for i, s in enumerate(batch):
        if isinstance(s, (str, bytes)):
            raise InvalidInputError(f"fact {first_index + i} must be a sequence of token ids, got a {type(s).__name__}")
    try:
        tokens = np.array(list(itertools.chain.from_iterable(batch)))
    except (TypeError, ValueError):
        tokens = None
    if tokens is None or (tokens.size and tokens.dtype.kind not in "iu"):
        for i, s in enumerate(batch):
            if any(_is_sequence(t) for t in s):
                raise _nested(batch, first_index, i)
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in s):
                raise InvalidInputError(f"fact {first_index + i} must hold integer token ids, got {list(s)[:8]}")
            big = next((t for t in s if not -(1 << 63) <= int(t) < 1 << 63), None)
            if big is not None:  # numpy cannot hold it: name the fact here, as the builder would
                raise InvalidInputError(f"fact {first_index + i} has token id {big}, outside the int64 range")
        tokens = np.array(list(itertools.chain.from_iterable(batch)), dtype=np.int64)
    if tokens.ndim != 1:
        # Elements that are themselves sequences (a list of facts passed as one fact): numpy made
        # a 2-D array, and flattening it would store a different fact.
        raise _nested(batch, first_index, next(i for i, s in enumerate(batch) if any(_is_sequence(t) for t in s)))
    if tokens.dtype != np.int64:
        tokens = _to_int64(tokens)
    return tokens, offsets


def _iter_chunks(sequences, chunk_size: int):
    """Yield (tokens, offsets) blocks of at most chunk_size sequences."""
    if isinstance(sequences, np.ndarray) and sequences.dtype != object:
        if sequences.ndim != 2:
            raise InvalidInputError(
                f"a numpy array of sequences must be 2-D (num_facts, length), got shape {sequences.shape}"
            )
        if sequences.size and sequences.dtype.kind not in "iu":
            raise InvalidInputError(f"sequences must hold integer token ids, got dtype {sequences.dtype}")
        rows, cols = sequences.shape
        for start in range(0, rows, chunk_size):
            block = np.ascontiguousarray(sequences[start : start + chunk_size])
            tokens = block.reshape(-1)
            if tokens.dtype not in (np.int32, np.int64):
                tokens = _to_int64(tokens)
            yield tokens, np.arange(block.shape[0] + 1, dtype=np.int64) * cols
        return
    it = iter(sequences)
    index = 0
    while True:
        batch = list(itertools.islice(it, chunk_size))
        if not batch:
            return
        yield _flatten_chunk(batch, index)
        index += len(batch)


def _csr_block(tokens, offsets) -> Tuple[np.ndarray, np.ndarray]:
    """Checked (tokens int32/int64, offsets int64) of facts in CSR form."""
    tokens = np.asarray(tokens)
    offsets = np.asarray(offsets)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise InvalidInputError(f"tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}")
    if offsets.ndim != 1 or offsets.size < 1 or offsets.dtype.kind not in "iu":
        raise InvalidInputError(f"offsets must be a 1-D integer array of num_facts + 1 elements, got {offsets.shape}")
    if tokens.dtype not in (np.int32, np.int64):
        tokens = _to_int64(tokens)
    offsets = offsets.astype(np.int64, copy=False)
    if offsets[0] != 0 or offsets[-1] != tokens.size or np.any(np.diff(offsets) < 0):
        raise InvalidInputError(
            f"offsets must start at 0, be non-decreasing and end at len(tokens)={tokens.size}; "
            f"got first {offsets[0]}, last {offsets[-1]}"
        )
    return tokens, offsets


class FactTrie:
    """A read-only, memory-mapped trie of tokenized facts (a ``.ktrie`` file).

    Create one with :meth:`build` (token ids), :meth:`build_from_arrays` (flat token ids and
    offsets) or :meth:`from_facts` (strings and a tokenizer); open an existing file with
    :meth:`load`.

    Facts are numbered ``0 .. num_facts - 1`` in lexicographic order of their token sequences (a
    fact that is a prefix of another sorts first). The facts extending a cursor state are exactly
    the ids ``[first, first + count)`` of :meth:`fact_range`.
    """

    def __init__(self, native_trie, build_stats: Optional[dict] = None):
        self._t = native_trie
        self._vocab = int(native_trie.vocab_size)
        self._words = (self._vocab + 31) // 32
        self._root = int(native_trie.root_state)
        #: Counters of the build that produced this object (None when loaded from a file).
        self.build_stats = build_stats

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        sequences,
        path,
        *,
        vocab_size: int,
        tokenizer_fingerprint: str = "",
        memory_budget_bytes: int = _DEFAULT_BUDGET,
        progress: bool = True,
        tmp_dir=None,
    ) -> "FactTrie":
        """Build a ``.ktrie`` file from token-id sequences and return it loaded.

        Args:
            sequences: the facts, each a sequence of token ids: an iterable or generator of lists
                or 1-D integer numpy arrays (ragged is fine), or a 2-D integer numpy array
                ``(num_facts, length)``. Identical facts are stored once.
            path: the output file (``.ktrie``); written unnamed in the same folder and given its
                name only when complete, so a reader never sees a partial file and a failed or
                interrupted build leaves nothing.
            vocab_size: the tokenizer's vocabulary size; every id must lie in ``[0, vocab_size)``.
            tokenizer_fingerprint: recorded in the header (see :func:`kcore.tokenizer.tokenizer_fingerprint`);
                :meth:`load` with a tokenizer compares it.
            memory_budget_bytes: size of the in-memory sequence buffer (about 4 bytes per token plus
                32 per fact, sorting included). Beyond it, sorted runs are spilled to ``tmp_dir``
                (front-coded, several times smaller than the tokens) and merged (external sort).
                The automaton is written out while it is built; its register of shared suffixes
                gets the same budget (at least 64 MiB; half of it while an unspilled buffer is
                alive). Peak memory is therefore about the budget whatever the number of facts;
                past the register's capacity a suffix seen long before may be stored twice (a
                slightly larger file, same facts).
            progress: show tqdm progress bars (facts read, then the merge) with rates and ETA.
            tmp_dir: folder of the scratch files (default: the folder of ``path``); they are
                unnamed, so nothing remains there whatever ends the build.

        Returns:
            The loaded :class:`FactTrie`; ``build_stats`` holds the counts of the build.

        Raises:
            InvalidInputError: an empty sequence, an id < 0 or >= vocab_size, or a non-integer
                element (the message names the fact's index); no facts at all; bad vocab_size.
            OSError: the file or the runs cannot be written.
        """
        vocab_size = cls._check_vocab_size(vocab_size)
        if isinstance(sequences, (str, bytes)):
            raise InvalidInputError(f"sequences must be an iterable of token-id sequences, got a {type(sequences).__name__}")
        total = len(sequences) if hasattr(sequences, "__len__") else None
        return cls._build_chunks(
            _iter_chunks(sequences, _CHUNK),
            path,
            total=total,
            vocab_size=vocab_size,
            tokenizer_fingerprint=tokenizer_fingerprint,
            memory_budget_bytes=memory_budget_bytes,
            progress=progress,
            tmp_dir=tmp_dir,
        )

    @classmethod
    def build_from_arrays(cls, tokens, offsets, path, *, vocab_size: int, **build_kwargs) -> "FactTrie":
        """Build from facts given in CSR form: fact ``i`` is ``tokens[offsets[i]:offsets[i + 1]]``.

        The fastest input path (no Python work per fact). ``tokens``: 1-D int32/int64 array
        ``(total_tokens,)``; ``offsets``: 1-D int64 array ``(num_facts + 1,)``, non-decreasing.
        Other arguments and errors as in :meth:`build`.
        """
        vocab_size = cls._check_vocab_size(vocab_size)
        tokens, offsets = _csr_block(tokens, offsets)

        def chunks():
            n = offsets.size - 1
            for start in range(0, n, _CHUNK):
                end = min(n, start + _CHUNK)
                o = offsets[start : end + 1]
                yield tokens[o[0] : o[-1]], o - o[0]

        return cls._build_chunks(chunks(), path, total=offsets.size - 1, vocab_size=vocab_size, **build_kwargs)

    @classmethod
    def build_from_chunks(cls, chunks, path, *, vocab_size: int, total: Optional[int] = None, **build_kwargs) -> "FactTrie":
        """Build from a stream of CSR blocks of facts, e.g. a pre-tokenized KB read piece by piece.

        Args:
            chunks: an iterable of ``(tokens, offsets)`` pairs, each as in :meth:`build_from_arrays`
                (fact ``i`` of a block is ``tokens[offsets[i]:offsets[i + 1]]``); only one block is
                held at a time.
            total: the number of facts, if known (for the progress bar's ETA).
            Other arguments and errors as in :meth:`build`.
        """
        vocab_size = cls._check_vocab_size(vocab_size)

        def checked():
            for tokens, offsets in chunks:
                yield _csr_block(tokens, offsets)

        return cls._build_chunks(checked(), path, total=total, vocab_size=vocab_size, **build_kwargs)

    @classmethod
    def from_facts(
        cls,
        facts: Iterable[str],
        tokenizer,
        path,
        *,
        batch_size: int = 4096,
        leading_space: bool = True,
        **build_kwargs,
    ) -> "FactTrie":
        """Tokenize fact strings with a Hugging Face fast tokenizer and build the trie.

        Args:
            facts: iterable of strings, e.g. ``"France capital Paris ."``.
            tokenizer: a Hugging Face tokenizer (``PreTrainedTokenizerFast`` / ``TokenizersBackend``).
                Called in batches without special tokens. Its fingerprint
                (:func:`kcore.tokenizer.tokenizer_fingerprint`) is recorded and ``vocab_size`` is
                ``len(tokenizer)``.
            path: the output ``.ktrie`` file.
            batch_size: facts per tokenizer call.
            leading_space: prepend one space to each fact that does not start with whitespace,
                since facts follow other text in generation (``"Fact: France ..."`` tokenizes
                ``" France"``, not ``"France"``).
            **build_kwargs: ``memory_budget_bytes``, ``progress``, ``tmp_dir`` of :meth:`build`.

        Raises:
            InvalidInputError: ``facts`` is a single string; a fact that is not a string or is
                empty / whitespace only (the message names its index), or a token id >= len(tokenizer).
        """
        from kcore.trie_build import build_from_text

        if "vocab_size" in build_kwargs or "tokenizer_fingerprint" in build_kwargs:
            raise InvalidInputError("from_facts takes vocab_size and tokenizer_fingerprint from the tokenizer")
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(facts, (str, bytes)):  # iterating it would make one "fact" per character
            raise InvalidInputError(f"facts must be an iterable of strings, got a single {type(facts).__name__}: {facts[:40]!r}")
        total = len(facts) if hasattr(facts, "__len__") else None

        def batches():
            it = iter(facts)
            while True:
                batch = list(itertools.islice(it, batch_size))
                if not batch:
                    return
                yield batch

        stats = build_from_text(batches(), tokenizer, path, leading_space=leading_space, total=total, **build_kwargs)
        return cls(native().Trie(os.fspath(path), False), build_stats=stats)

    @classmethod
    def from_kb_file(
        cls,
        kb_path,
        tokenizer,
        path,
        *,
        template: str = "{subject} {relation} {object} .",
        bad_lines: str = "error",
        leading_space: bool = True,
        batch_size: int = 8192,
        **build_kwargs,
    ) -> "FactTrie":
        """Stream a knowledge-base file into a trie: read, verbalize, tokenize and build in bounded memory.

        The file is read line by line (:mod:`kcore.kb_files`: ``.tsv`` / ``.jsonl`` triples or
        ``.txt`` facts, plain or ``.gz`` / ``.bz2`` / ``.xz`` / ``.zst``), tokenized in batches
        (:mod:`kcore.fact_tokenizer`) while the native builder sorts and merges under
        ``memory_budget_bytes`` (:mod:`kcore.trie_build`); memory does not grow with the KB.

        Args:
            kb_path: the knowledge-base file.
            tokenizer: a Hugging Face tokenizer (see :meth:`from_facts`).
            path: the output ``.ktrie`` file (written atomically; nothing is left if the build
                fails or is interrupted).
            template: verbalization of triples (ignored for ``.txt``).
            bad_lines: ``"error"``: stop at the first malformed line (FileFormatError naming
                ``file:line``); ``"skip"``: skip and count them (``build_stats["bad_lines"]``, the
                first messages in ``build_stats["bad_line_examples"]``, and a warning).
            leading_space, batch_size: as :meth:`from_facts`.
            **build_kwargs: ``memory_budget_bytes``, ``progress``, ``tmp_dir``, ``word_cache``.

        Raises:
            KcoreError: the file does not exist; FileFormatError: a malformed line (with
            ``bad_lines="error"``) or corrupted compressed data, or no fact at all;
            InvalidInputError: unknown format or bad arguments.
        """
        import warnings

        from kcore.kb_files import ReadReport, iter_fact_batches
        from kcore.errors import FileFormatError
        from kcore.trie_build import build_from_text

        report = ReadReport(os.fspath(kb_path))
        batches = iter_fact_batches(kb_path, template=template, bad_lines=bad_lines, batch_size=batch_size, report=report)

        def estimate_total():
            # Facts so far scaled by the bytes of the file read so far (compressed bytes for a
            # compressed file): the progress bar's ETA.
            if report.bytes_read and report.file_bytes:
                return int(report.facts * report.file_bytes / report.bytes_read)
            return None

        try:
            stats = build_from_text(batches, tokenizer, path, leading_space=leading_space, estimate_total=estimate_total, **build_kwargs)
        except InvalidInputError as e:
            if report.facts == 0 and "sequences is empty" in str(e):
                raise FileFormatError(f"{kb_path}: no facts in the file ({report.lines} lines, {report.bad_lines} bad)") from None
            raise
        stats.update(lines=report.lines, bad_lines=report.bad_lines, bad_line_examples=list(report.examples))
        if report.bad_lines:
            warnings.warn(
                f"{kb_path}: skipped {report.bad_lines} malformed line(s) of {report.lines}; first: {report.examples[0]}",
                stacklevel=2,
            )
        return cls(native().Trie(os.fspath(path), False), build_stats=stats)

    @staticmethod
    def _check_vocab_size(vocab_size) -> int:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not 1 <= vocab_size <= 1 << 24:
            raise InvalidInputError(f"vocab_size must be an int in [1, 2^24], got {vocab_size!r}")
        return int(vocab_size)

    @classmethod
    def _build_chunks(cls, chunks, path, *, total, vocab_size: int, **build_kwargs) -> "FactTrie":
        from kcore.trie_build import run_builder

        stats = run_builder(chunks, path, total=total, vocab_size=vocab_size, **build_kwargs)
        return cls(native().Trie(os.fspath(path), False), build_stats=stats)

    @classmethod
    def load(cls, path, *, tokenizer=None, verify: str = "header") -> "FactTrie":
        """Open a ``.ktrie`` file with ``mmap`` (the load time does not grow with the file size).

        Args:
            path: the file.
            tokenizer: if given, its fingerprint must equal the one recorded at build time (and
                ``len(tokenizer)`` the trie's vocab_size); a trie built without a fingerprint is
                checked on the vocab size only.
            verify: ``"header"`` (default): magic, format version, header checksum, file size and
                section table; ``"full"``: also the checksum of the whole data section (reads the
                whole file).

        Raises:
            FileFormatError: not a kcore trie, truncated, corrupted, other format version (the
                message names the file and the problem).
            TokenizerMismatchError: the trie was built for another tokenizer.
            OSError: the file cannot be opened (``FileNotFoundError`` if missing,
                ``IsADirectoryError`` for a directory).

        The file must not be modified in place while loaded (see the module docs); replace it by a
        rename instead, as :meth:`build` does.
        """
        if verify not in ("header", "full"):
            raise InvalidInputError(f"verify must be 'header' or 'full', got {verify!r}")
        path = os.fspath(path)
        if os.path.isdir(path):  # mmap would answer a cryptic "No such device"
            raise IsADirectoryError(f"cannot load a trie from '{path}': it is a directory, not a .ktrie file")
        if not os.path.exists(path):  # the subclass, so `except FileNotFoundError` works
            raise FileNotFoundError(errno.ENOENT, "no trie file here (build one with FactTrie.build)", path)
        t = cls(native().Trie(path, verify == "full"))
        if tokenizer is not None:
            t.check_tokenizer(tokenizer)
        return t

    def check_tokenizer(self, tokenizer) -> None:
        """Raise :class:`kcore.TokenizerMismatchError` unless ``tokenizer`` is the one the trie was built for."""
        from kcore.tokenizer import tokenizer_fingerprint

        if len(tokenizer) != self._vocab:
            raise TokenizerMismatchError(
                f"'{self.path}' was built for a vocabulary of {self._vocab} tokens, the tokenizer has {len(tokenizer)}"
            )
        stored = self.tokenizer_fingerprint
        if stored and tokenizer_fingerprint(tokenizer) != stored:
            raise TokenizerMismatchError(
                f"'{self.path}' was built for another tokenizer (fingerprint {stored[:16]}..., "
                f"this tokenizer's is {tokenizer_fingerprint(tokenizer)[:16]}...); rebuild the trie for it"
            )

    def verify(self) -> None:
        """Verify the checksum of the whole data section; raise FileFormatError on mismatch."""
        self._t.verify_data()

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        return self._t.path

    @property
    def num_facts(self) -> int:
        """Number of distinct facts stored."""
        return int(self._t.num_facts)

    @property
    def num_nodes(self) -> int:
        """Nodes of the minimised automaton (shared fact endings count once)."""
        return int(self._t.num_nodes)

    @property
    def num_edges(self) -> int:
        return int(self._t.num_edges)

    @property
    def num_trie_nodes(self) -> int:
        """Nodes a plain prefix trie of the same facts would have (root included)."""
        return int(self._t.num_trie_nodes)

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def nbytes(self) -> int:
        """Size of the ``.ktrie`` file in bytes (all of it is mapped, none copied)."""
        return int(self._t.file_bytes)

    @property
    def tokenizer_fingerprint(self) -> str:
        return self._t.fingerprint

    @property
    def root_state(self) -> int:
        """The cursor state of the empty prefix."""
        return self._root

    def __len__(self) -> int:
        return self.num_facts

    def __reduce__(self):
        # Pickles as its path (for worker processes): the unpickled trie maps the same file.
        return (_load_path, (self.path,))

    def __repr__(self) -> str:
        return (
            f"FactTrie(path={self.path!r}, num_facts={self.num_facts}, num_nodes={self.num_nodes}, "
            f"vocab_size={self.vocab_size}, nbytes={self.nbytes})"
        )

    # ------------------------------------------------------------------ queries

    def state_of(self, prefix) -> int:
        """The cursor state after ``prefix`` (token ids, list / 1-D numpy array / torch tensor)
        from the root; ``-1`` if no fact starts so (ids outside the vocabulary included).

        Raises:
            InvalidInputError: ``prefix`` does not hold integers.
        """
        return int(self._t.walk(_as_states(prefix, "prefix").reshape(-1)))

    def next_tokens(self, prefix) -> np.ndarray:
        """Tokens that continue some fact after ``prefix``.

        Args:
            prefix: token ids (list or 1-D array; may be empty for the root).

        Returns:
            ``np.ndarray[int32]`` of shape ``(num_next,)``, ascending; empty if no fact starts
            with ``prefix`` (ids outside the vocabulary included) or ``prefix`` is a whole fact
            with no extension.

        Raises:
            InvalidInputError: ``prefix`` does not hold integers.
        """
        return self._t.next_tokens(self.state_of(prefix))

    def next_tokens_from(self, state: int) -> np.ndarray:
        """Like :meth:`next_tokens`, for a cursor state (``int``; ``-1`` gives an empty array).

        Raises:
            InvalidInputError: a state that is not one of this trie's.
        """
        return self._t.next_tokens(int(state))

    def contains(self, sequence) -> bool:
        """True iff ``sequence`` (token ids) is exactly one of the stored facts.

        Raises:
            InvalidInputError: ``sequence`` does not hold integers.
        """
        s = int(self._t.walk(_as_states(sequence, "sequence").reshape(-1)))
        return s != DEAD_STATE and bool(self._t.is_complete(np.array([s], dtype=np.int64))[0])

    def step(self, states, tokens) -> np.ndarray:
        """Advance cursor states by one token each.

        Args:
            states: ``int64`` array-like of any shape ``(*batch)`` (from :attr:`root_state` or
                earlier calls; ``-1`` = dead).
            tokens: integer array-like of the same shape.

        Returns:
            New ``np.ndarray[int64]`` of shape ``(*batch)``: ``-1`` where the state was dead or no
            fact continues with the token (ids outside ``[0, vocab_size)`` included).

        Raises:
            InvalidInputError: shapes differ, or a state that is not one of this trie's.
        """
        s = _as_states(states, "states")
        t = _as_states(tokens, "tokens")
        if s.shape != t.shape:
            raise InvalidInputError(f"states and tokens must have the same shape, got {s.shape} and {t.shape}")
        if s.ndim == 1:
            return self._t.step(s, t)
        return self._t.step(s.reshape(-1), t.reshape(-1)).reshape(s.shape)

    def is_complete(self, states) -> np.ndarray:
        """``np.ndarray[bool]`` of the states' shape: a fact ends exactly at the state (False for -1)."""
        s = _as_states(states, "states")
        return self._t.is_complete(s.reshape(-1)).reshape(s.shape)

    def fact_range(self, states) -> Tuple[np.ndarray, np.ndarray]:
        """Ids of the facts that extend each state (the state's own fact first, if complete).

        Returns:
            ``(first, count)``, two ``np.ndarray[int64]`` of the states' shape: the facts through
            state ``i`` are ids ``[first[i], first[i] + count[i])`` (``count`` is the leaf count);
            for a complete state its own fact is ``first[i]``. Dead states give ``(0, 0)``.
        """
        s = _as_states(states, "states")
        first, count = self._t.fact_range(s.reshape(-1))
        return first.reshape(s.shape), count.reshape(s.shape)

    def leaf_counts(self, states) -> np.ndarray:
        """Number of facts through each state (``fact_range(states)[1]``), ``np.ndarray[int64]``."""
        return self.fact_range(states)[1]

    def fill_bitmask(self, states, bitmask, *, written_offsets=None, written_ids=None) -> None:
        """Write the allowed-next-token bitmask of each state, in place.

        The int32 bitmask format of xgrammar / llguidance / outlines-core: bit ``j % 32`` of word
        ``j // 32`` of row ``i`` is set iff token ``j`` continues some fact from ``states[i]``.
        Every word of every row is written (rows of dead states are all zero).

        Args:
            states: ``int64`` array-like ``(batch,)``.
            bitmask: ``int32`` ``(batch, num_words)`` with ``num_words >= ceil(vocab_size / 32)``,
                C-contiguous, a numpy array or a CPU torch tensor; modified in place.
            written_offsets, written_ids: optional duplicate avoidance, in CSR form: row ``i``'s
                already-written fact ids are ``written_ids[written_offsets[i]:written_offsets[i+1]]``
                (``int64``, sorted within each row; ``written_offsets`` has ``batch + 1`` elements,
                starting at 0). A token is left out when every fact through it is already written
                in that row.

        Raises:
            InvalidInputError: wrong dtype, shape, device or layout of an argument, unsorted
                written ids, or a state that is not one of this trie's.
        """
        s = _as_states(states, "states")
        if s.ndim != 1:
            s = s.reshape(-1)
        ptr, rows, words = self._bitmask_pointer(bitmask)
        if (written_offsets is None) != (written_ids is None):
            raise InvalidInputError("written_offsets and written_ids must be given together")
        wo = wi = None
        if written_offsets is not None:
            wo = _as_states(written_offsets, "written_offsets")
            wi = _as_states(written_ids, "written_ids")
        self._t.fill_bitmask(s, ptr, rows, words, wo, wi)

    def _bitmask_pointer(self, bitmask):
        if type(bitmask) is np.ndarray and bitmask.dtype == np.int32 and bitmask.ndim == 2:
            # Fast path; layout and writeability are checked in C++.
            rows, words = bitmask.shape
            if words < self._words:
                raise InvalidInputError(
                    f"bitmask must have at least ceil(vocab_size / 32) = {self._words} columns, got {words}"
                )
            if not bitmask.flags.writeable:
                raise InvalidInputError("bitmask must be writeable")
            return bitmask, rows, words
        if type(bitmask).__module__.startswith("torch"):
            import torch

            if bitmask.dtype != torch.int32:
                raise InvalidInputError(f"bitmask must be int32, got {bitmask.dtype}")
            if bitmask.device.type != "cpu":
                raise InvalidInputError(f"bitmask must be on the CPU, got device {bitmask.device}")
            if bitmask.dim() != 2 or not bitmask.is_contiguous():
                raise InvalidInputError(
                    f"bitmask must be a C-contiguous 2-D tensor (batch, ceil(vocab/32)), got shape "
                    f"{tuple(bitmask.shape)} strides {bitmask.stride()}"
                )
            rows, words = bitmask.shape
            ptr = bitmask.data_ptr()
        elif isinstance(bitmask, np.ndarray):
            if bitmask.dtype != np.int32:
                raise InvalidInputError(f"bitmask must be int32, got {bitmask.dtype}")
            if bitmask.ndim != 2 or not bitmask.flags.c_contiguous or not bitmask.flags.writeable:
                raise InvalidInputError(
                    f"bitmask must be a writeable C-contiguous 2-D array (batch, ceil(vocab/32)), got shape "
                    f"{bitmask.shape}"
                )
            rows, words = bitmask.shape
            ptr = bitmask
        else:
            raise InvalidInputError(f"bitmask must be a numpy array or a torch tensor, got {type(bitmask).__name__}")
        if words < self._words:
            raise InvalidInputError(
                f"bitmask must have at least ceil(vocab_size / 32) = {self._words} columns, got {words}"
            )
        return ptr, int(rows), int(words)


def _load_path(path: str) -> FactTrie:
    return FactTrie.load(path)
