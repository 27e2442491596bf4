"""Tokenizing fact strings for the trie builder: batches of strings -> flat token-id arrays.

The result is exactly what ``tokenizer(text, add_special_tokens=False)["input_ids"]`` gives for
each fact (with one leading space, since facts follow other text in generation: ``"Fact:
France ..."`` tokenizes ``" France"``), produced faster:

* the Rust tokenizer's batch encoding (``tokenizers.Tokenizer.encode_batch_fast``, which runs
  across all cores) instead of the Python-level call;
* for byte-level BPE tokenizers (GPT-2, Llama 3, Qwen, SmolLM: no normalizer, a pre-tokenizer
  that splits text at spaces before BPE), a word cache: such a tokenizer never merges across a
  single space, so the tokens of ``" w1 w2 w3"`` are the tokens of ``" w1"``, ``" w2"``, ``" w3"``
  one after the other. Knowledge bases repeat their subjects, relations and objects, so most words
  are found in the cache and only new words reach the tokenizer (several times faster). A fact
  whose whitespace is not single spaces is tokenized whole. The first batch is tokenized both
  ways and compared in full, and a sample of every later batch, so a tokenizer that breaks the
  rule stops the build with an error instead of giving other tokens
  (``word_cache=False`` turns the cache off).
"""

from __future__ import annotations

import itertools
import json
from typing import List, Optional, Tuple

import numpy as np

from kcore.errors import InvalidInputError, KcoreError

__all__ = ["FactTokenizer"]

_VERIFY_SAMPLE = 16


def _backend(tokenizer):
    """The ``tokenizers.Tokenizer`` under a Hugging Face fast tokenizer, or None."""
    bt = getattr(tokenizer, "backend_tokenizer", None)
    if bt is None and type(tokenizer).__module__.startswith("tokenizers"):
        bt = tokenizer
    return bt if hasattr(bt, "encode_batch_fast") else None


def _splits_at_spaces(backend) -> bool:
    """Whether the tokenizer's pipeline never merges across a single space (see module docs)."""
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return False
    if spec.get("normalizer") is not None:
        return False
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not parts:
        return False
    for p in parts:
        if p.get("type") == "ByteLevel":
            continue
        if p.get("type") in ("Split", "Digits", "Punctuation"):
            continue
        return False
    if not any(p.get("type") == "ByteLevel" for p in parts):
        return False
    if (spec.get("model") or {}).get("type") != "BPE":
        return False
    # An added token holding a space could match across two words.
    return not any(" " in (t.get("content") or "") for t in spec.get("added_tokens") or [])


class FactTokenizer:
    """Fact strings -> CSR token arrays, exactly as the tokenizer encodes each fact.

    Args:
        tokenizer: a Hugging Face tokenizer (fast ones use the Rust batch path) or a
            ``tokenizers.Tokenizer``.
        leading_space: prepend one space to each fact that does not start with whitespace.
        word_cache: ``None`` (use it where the tokenizer allows, see the module docs), ``True``
            (require it: KcoreError if the tokenizer does not allow it) or ``False``.
        cache_words: the cache holds at most this many words (it is emptied when full).

    ``encode(texts, first_index)`` returns ``(tokens int32 (total,), offsets int64 (n + 1,))``.
    """

    def __init__(self, tokenizer, *, leading_space: bool = True, word_cache: Optional[bool] = None, cache_words: int = 1 << 20):
        self._tokenizer = tokenizer
        self._backend = _backend(tokenizer)
        self.leading_space = leading_space
        # The cache stores words with their leading space: facts must get one (leading_space).
        allowed = leading_space and self._backend is not None and _splits_at_spaces(self._backend)
        if word_cache and not allowed:
            raise KcoreError("this tokenizer does not allow the word cache (it may merge across spaces); use word_cache=False")
        self.word_cache = allowed if word_cache is None else bool(word_cache)
        self._cache: dict = {}
        self._cache_words = cache_words
        self._verified_batches = 0
        self._rng = np.random.default_rng(0)
        #: seconds spent in the tokenizer library itself (cache misses and whole facts)
        self.tokenizer_seconds = 0.0

    # ---------------------------------------------------------------- whole facts

    def _encode_texts(self, texts: List[str]) -> List[List[int]]:
        import time

        t0 = time.perf_counter()
        try:
            if self._backend is not None:
                return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]
            return self._tokenizer(texts, add_special_tokens=False)["input_ids"]
        finally:
            self.tokenizer_seconds += time.perf_counter() - t0

    @staticmethod
    def _csr(ids: List[List[int]]) -> Tuple[np.ndarray, np.ndarray]:
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(offsets[-1]))
        return tokens, offsets

    def _check(self, texts: List[str], first_index: int) -> None:
        for i, f in enumerate(texts):
            if not isinstance(f, str):
                raise InvalidInputError(f"fact {first_index + i} must be a str, got {type(f).__name__}")
            if not f.strip():
                raise InvalidInputError(f"fact {first_index + i} is empty or whitespace only: {f!r}")

    def _spaced(self, f: str) -> str:
        return " " + f if self.leading_space and not f[:1].isspace() else f

    # ---------------------------------------------------------------- public

    def encode(self, texts: List[str], first_index: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Token ids of each fact: ``(tokens int32 (total,), offsets int64 (len(texts) + 1,))``.

        Raises:
            InvalidInputError: a fact that is not a str or is empty / whitespace only (names its
                index, counting from ``first_index``).
            KcoreError: the word cache gave other tokens than the tokenizer (see module docs).
        """
        if not self.word_cache:
            self._check(texts, first_index)
            return self._csr(self._encode_texts([self._spaced(f) for f in texts]))
        return self._encode_words(texts, first_index)

    def _encode_words(self, texts: List[str], first_index: int) -> Tuple[np.ndarray, np.ndarray]:
        n = len(texts)
        words_of = []
        whole = []  # facts tokenized as a whole: whitespace other than single spaces between words
        for i, f in enumerate(texts):
            if not isinstance(f, str):
                raise InvalidInputError(f"fact {first_index + i} must be a str, got {type(f).__name__}")
            w = f.split()
            if not w:
                raise InvalidInputError(f"fact {first_index + i} is empty or whitespace only: {f!r}")
            # "w1 w2 .. wk" gets the leading space added; " w1 w2 .. wk" has it already.
            canonical = " ".join(w)
            if f != canonical and f != " " + canonical:
                whole.append(i)
                w = []
            words_of.append(w)
        counts = np.fromiter(map(len, words_of), dtype=np.int64, count=n)
        words = list(itertools.chain.from_iterable(words_of))
        if len(self._cache) + len(words) > self._cache_words:
            self._cache.clear()
        vals = list(map(self._cache.get, words))
        missing = [w for w, v in zip(words, vals) if v is None]
        if missing:
            missing = list(dict.fromkeys(missing))
            for w, ids in zip(missing, self._encode_texts([" " + w for w in missing])):
                self._cache[w] = np.asarray(ids, dtype=np.uint32).tobytes()
            vals = list(map(self._cache.__getitem__, words))
        word_tokens = np.fromiter(map(len, vals), dtype=np.int64, count=len(vals)) // 4
        flat = np.frombuffer(b"".join(vals), dtype=np.int32)
        fact_len = np.zeros(n, dtype=np.int64)
        nz = counts > 0
        if nz.any():
            fact_len[nz] = np.add.reduceat(word_tokens, (np.cumsum(counts) - counts)[nz])
        whole_ids = self._encode_texts([self._spaced(texts[i]) for i in whole]) if whole else []
        for i, ids in zip(whole, whole_ids):
            fact_len[i] = len(ids)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(fact_len, out=offsets[1:])
        if whole:
            tokens = np.empty(int(offsets[-1]), dtype=np.int32)
            keep = np.ones(n, dtype=bool)
            keep[whole] = False
            # Scatter the word-path facts, then the whole ones, into their places.
            idx = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in np.flatnonzero(keep)] or [np.zeros(0, np.int64)])
            tokens[idx] = flat
            for i, ids in zip(whole, whole_ids):
                tokens[offsets[i] : offsets[i + 1]] = ids
        else:
            tokens = flat
        self._verify(texts, tokens, offsets, first_index)
        return tokens, offsets

    def _verify(self, texts, tokens, offsets, first_index) -> None:
        n = len(texts)
        if self._verified_batches == 0:
            sample = range(n)
        else:
            sample = sorted(set(self._rng.integers(0, n, size=min(n, _VERIFY_SAMPLE)).tolist()))
        self._verified_batches += 1
        sample = list(sample)
        ref = self._encode_texts([self._spaced(texts[i]) for i in sample])
        for i, ids in zip(sample, ref):
            got = tokens[offsets[i] : offsets[i + 1]].tolist()
            if got != list(ids):
                raise KcoreError(
                    f"the word cache tokenized fact {first_index + i} ({texts[i]!r}) as {got}, the tokenizer as "
                    f"{list(ids)}: this tokenizer merges across spaces; build with word_cache=False"
                )
