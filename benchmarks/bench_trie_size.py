"""Bytes per fact of the .ktrie beside marisa-trie, on the exact facts ``kcore ask`` builds.

The facts: the built-in KB (``kcore.kb.default_facts()``), tokenized by SmolLM2's tokenizer as
``kcore ask`` does (``FactTrie.from_facts``: one leading space, no special tokens). Baselines:
marisa-trie (the GENRE-style index) on the same token sequences, keyed two ways: one character
per token id (``chr(id)``, marisa's default configuration) and big-endian 16-bit bytes
(``BinaryTrie``); both saved to a file. Correctness first: the .ktrie holds every fact.

Run: ``python benchmarks/bench_trie_size.py``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    import marisa_trie

    from bench_kb_scale import load_tokenizer
    from kcore.kb import default_facts
    from kcore.trie import FactTrie

    tok = load_tokenizer()
    facts = default_facts()
    with tempfile.TemporaryDirectory() as tmp:
        trie = FactTrie.from_facts(facts, tok, Path(tmp) / "kb.ktrie", progress=False)
        ids = [tok(" " + f, add_special_tokens=False)["input_ids"] for f in facts]
        assert all(trie.contains(x) for x in ids) and trie.num_facts == len(set(map(tuple, ids)))
        sizes = {}
        for name, build in (
            ("marisa-trie, chr(id) keys", lambda: marisa_trie.Trie(["".join(map(chr, x)) for x in ids])),
            ("marisa-trie BinaryTrie, 16-bit keys", lambda: marisa_trie.BinaryTrie(
                [b"".join(t.to_bytes(2, "big") for t in x) for x in ids])),
        ):
            path = Path(tmp) / "m.marisa"
            build().save(str(path))
            sizes[name] = path.stat().st_size
        n = trie.num_facts
        print(f"{n:,} facts ({trie.num_nodes:,} DAWG nodes), SmolLM2 tokens\n")
        print("| index | bytes | bytes/fact | .ktrie / this |")
        print("|---|---|---|---|")
        print(f"| kcore .ktrie (format {2}) | {trie.nbytes:,} | {trie.nbytes / n:.2f} | 1.00x |")
        for name, b in sizes.items():
            print(f"| {name} | {b:,} | {b / n:.2f} | {trie.nbytes / b:.2f}x |")


if __name__ == "__main__":
    main()
