"""Helpers for the fact-constrained decoding tests: a tiny greedy longest-match tokenizer, tries
built from it, and an oracle that recomputes a row's allowed tokens from scratch."""

from __future__ import annotations

import string
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

import kcore

WORDS = [
    "Fact", " Fact", "\nFact", "act", "Artifact", "Fac", ":", " .", ".", "\n", " capital", " population",
    " language", " Japan", " Japanese", " Tokyo", " Kyoto", " France", " Paris", " Lyon", " French",
    " Spain", " Madrid", " is", " the", " of", " Answer", "Answer", " New", " York", " New York",
]


class FakeTokenizer:
    """Greedy longest-match tokenizer over single ASCII characters plus ``WORDS``; ids 0 and 1 are
    the special ``<eos>`` and ``<pad>``. Enough of the HF tokenizer surface for kcore.hf.facts."""

    def __init__(self, extra: Sequence[str] = ()):
        chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
        self.vocab: List[str] = ["<eos>", "<pad>"] + chars + [w for w in list(WORDS) + list(extra) if w not in chars]
        self.ids = {s: i for i, s in enumerate(self.vocab)}
        self.eos_token_id, self.pad_token_id = 0, 1
        self.eos_token, self.pad_token = "<eos>", "<pad>"
        self.all_special_ids = [0, 1]
        self.maxlen = max(len(s) for s in self.vocab)

    def __len__(self):
        return len(self.vocab)

    def get_vocab(self) -> Dict[str, int]:
        return dict(self.ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        out, k = [], 0
        while k < len(text):
            for n in range(min(self.maxlen, len(text) - k), 0, -1):
                tid = self.ids.get(text[k:k + n])
                if tid is not None and tid > 1:
                    out.append(tid)
                    k += n
                    break
            else:
                raise ValueError(f"cannot tokenize {text[k]!r}")
        return out

    def __call__(self, text, add_special_tokens: bool = False):
        if isinstance(text, list):
            return {"input_ids": [self.encode(t) for t in text]}
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i in self.all_special_ids))

    def batch_decode(self, seqs, **kw) -> List[str]:
        return [self.decode(s, **kw) for s in seqs]


FACTS = [
    "Japan capital Tokyo .",
    "Japan capital Kyoto .",
    "Japan language Japanese .",
    "Japan population 125 .",
    "France capital Paris .",
    "France language French .",
    "France population 68 .",
    "Spain capital Madrid .",
    "New York population 8 .",
    "New York population 8 . 1 .",  # has the complete fact above as a prefix
]


def make_trie(tok, facts, path, *, leading_space: bool = True):
    """A real kcore.FactTrie over the facts, encoded as FactTrie.from_facts encodes them."""
    seqs = [tok.encode((" " + f) if leading_space else f) for f in facts]
    return kcore.FactTrie.build(seqs, str(path), vocab_size=len(tok), progress=False), seqs


class Oracle:
    """Allowed next tokens of a row, recomputed from scratch from its tokens (no incremental
    state), by plain tuple and set logic over the fact token sequences."""

    def __init__(self, fact_seqs, trigger_seqs, term: Sequence[int], avoid_duplicates: bool = True):
        self.facts = {tuple(f) for f in fact_seqs}
        self.prefixes: Dict[Tuple[int, ...], Set[int]] = {}
        for f in self.facts:
            for k in range(len(f)):
                self.prefixes.setdefault(f[:k], set()).add(f[k])
        self.triggers = [tuple(t) for t in trigger_seqs]
        self.term = tuple(term)
        self.avoid = avoid_duplicates

    def _below(self, prefix) -> Set[Tuple[int, ...]]:
        return {f for f in self.facts if f[: len(prefix)] == prefix}

    def allowed(self, row: Sequence[int], prompt_len: int) -> Optional[Set[int]]:
        """None in free text, else the set of allowed token ids."""
        row = [int(t) for t in row]
        mode, prefix, k_term, written = "free", (), 0, set()
        for end in range(1, len(row) + 1):
            tok = row[end - 1]
            if end == prompt_len + 1:
                written = set()
            if mode == "fact" and prefix is None and tok != self.term[0]:
                mode = "free"  # left a fact that is not in the trie (prompt text)
            elif mode == "fact":
                allowed = self._allowed_fact(prefix, written)
                if tok == self.term[0] and self.term[0] in allowed:
                    if prefix in self.facts and prefix not in written:
                        written.add(prefix)
                    mode, k_term = ("free", 0) if len(self.term) == 1 else ("term", 1)
                else:
                    prefix = prefix + (tok,) if prefix is not None else None
                    if prefix is not None and prefix not in self.prefixes and prefix not in self.facts:
                        prefix = None
                continue
            elif mode == "term":
                if tok == self.term[k_term] and k_term + 1 < len(self.term):
                    k_term += 1
                else:
                    mode = "free"
                continue
            if any(tuple(row[max(0, end - len(t)):end]) == t for t in self.triggers):
                mode, prefix = "fact", ()
        if mode == "free":
            return None
        if mode == "term":
            return {self.term[k_term]}
        return self._allowed_fact(prefix, written)

    def _allowed_fact(self, prefix, written) -> Set[int]:
        if prefix is None:
            return {self.term[0]}
        out = set()
        wr = written if self.avoid else set()
        for f in self._below(prefix):
            if f not in wr and len(f) > len(prefix):
                out.add(f[len(prefix)])
        if prefix in self.facts and prefix not in wr:
            out.add(self.term[0])
        return out or {self.term[0]}


def allowed_from_scores(scores_row) -> Set[int]:
    return set(np.flatnonzero(np.isfinite(scores_row.float().numpy())).tolist())
