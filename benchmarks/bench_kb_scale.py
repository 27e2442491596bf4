"""KB text -> .ktrie at scale, and lookup latency by trie size, cold and warm page cache.

Subcommands (results are appended as JSON lines to ``--results``; ``report`` prints the tables):

* ``build --kb FILE --out TRIE``: runs ``kcore build-trie`` on the KB file in a child process
  (SmolLM2's tokenizer, ``--memory-budget``) and records wall time, peak RSS of the child (from
  ``wait4``), the pipeline's seconds (reading+tokenizing, tokenizer library, adding, merging and
  writing), facts/s for tokenization and for the build separately, peak temporary disk (the
  builder's own accounting of its scratch files: they are unnamed, so ``du`` cannot see them),
  bytes/fact, and the load average.
* ``latency --kb FILE --trie TRIE``: samples 2,000 facts of the KB file, tokenizes them as the
  build did, checks that the trie holds every one (correctness first), then times in fresh child
  processes, once with the trie's pages dropped from the page cache (``posix_fadvise
  DONTNEED`` on the file) and once warm: ``next_tokens`` of a
  random proper prefix of each fact (a walk from the root plus the children of the last node),
  and ``step`` + ``fill_bitmask`` (vocab 49,152) of one row from the state of that prefix; warm
  also for a batch of 64 rows. The fraction of the file still in the page cache after the drop
  is checked with ``mincore`` and recorded.
* ``processor --trie T [--trie T2 ...]``: :class:`kcore.hf.FactLogitsProcessor` per-step cost,
  batch 8, rows writing real facts after ``"Fact:"`` (teacher-forced), random scores, on each
  trie side by side in one process.
* ``report``: markdown tables of everything recorded.

Every table built from ``benchmarks/synthetic_kb.py`` files says "synthetic".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def tokenizer_folder() -> Path:
    from kcore.models import cache_dir, load_model_and_tokenizer

    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (folder / "tokenizer.json").exists():
        load_model_and_tokenizer()  # converts the GGUF once into this folder
    return folder


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_folder()))


def record(path: str, entry: dict) -> None:
    entry = dict(entry, date=time.strftime("%Y-%m-%d %H:%M:%S"), host=platform.node(), cpus=os.cpu_count())
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")
    print(json.dumps(entry, indent=1))


# ---------------------------------------------------------------- build


def cmd_build(args) -> None:
    stats_path = str(args.out) + ".stats.json"
    cmd = [sys.executable, "-m", "kcore", "build-trie", "--facts", args.kb, "--out", args.out, "--tokenizer",
           str(tokenizer_folder()), "--memory-budget", args.memory_budget, "--stats-json", stats_path]
    if args.tmp_dir:
        cmd += ["--tmp-dir", args.tmp_dir]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build failed: {cmd}")
    s = json.loads(Path(stats_path).read_text())
    os.remove(stats_path)
    n = s["num_input"]
    record(args.results, {
        "kind": "build", "kb": args.kb, "kb_bytes": os.path.getsize(args.kb), "trie": args.out,
        "synthetic": "synthetic" in Path(args.kb).name or "syn" in Path(args.kb).name,
        "memory_budget": args.memory_budget, "facts_read": n, "facts": s["num_facts"], "file_bytes": s["file_bytes"],
        "bytes_per_fact": s["file_bytes"] / s["num_facts"], "wall_s": wall, "build_wall_s": s["wall_s"],
        "produce_s": s["produce_s"], "tokenize_s": s["tokenize_s"], "tokenizer_s": s["tokenizer_s"],
        "add_s": s["add_s"], "finish_s": s["finish_s"],
        "tokenize_facts_per_s": n / s["tokenize_s"], "build_facts_per_s": n / (s["add_s"] + s["finish_s"]),
        "end_to_end_facts_per_s": n / wall, "peak_rss_bytes": usage.ru_maxrss * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime, "peak_temp_bytes": s["peak_temp_bytes"], "runs": s["num_runs"],
        "register_generations": s["register_generations"], "nodes": s["num_nodes"],
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    })


# ---------------------------------------------------------------- build from token ids


ID_CHUNK = 2_000_000


def id_chunks(n_facts: int):
    """n_facts SYNTHETIC facts as token ids, in CSR blocks: ``bench_trie.synthetic_facts`` (the
    shape of the FactTrie benchmark: 1-4 token subjects with several facts each, 60 relations,
    Zipf objects or digit strings, a final "."), one block of 2M facts per seed."""
    from bench_trie import synthetic_facts

    for k, start in enumerate(range(0, n_facts, ID_CHUNK)):
        t, o = synthetic_facts(ID_CHUNK, seed=k)
        n = min(ID_CHUNK, n_facts - start)  # a short last block: the first n facts of a full one
        yield t[: o[n]], o[: n + 1]


def cmd_build_ids_child(args) -> None:
    from kcore.trie import FactTrie

    t0 = time.perf_counter()
    trie = FactTrie.build_from_chunks(id_chunks(args.facts), args.out, vocab_size=49152, total=args.facts,
                                      memory_budget_bytes=parse_budget(args.memory_budget), progress=False)
    s = dict(trie.build_stats, wall_s=time.perf_counter() - t0)
    print(json.dumps(s))


def parse_budget(text):
    from kcore.cli.build_trie import parse_size

    return parse_size(text)


def cmd_build_ids(args) -> None:
    """The native build alone at scale (no tokenization): token-id facts generated on the fly."""
    cmd = [sys.executable, __file__, "_build_ids", "--facts", str(args.facts), "--out", args.out,
           "--memory-budget", args.memory_budget]
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"build failed: {cmd}")
    s = json.loads(out.strip().splitlines()[-1])
    n = s["num_input"]
    record(args.results, {
        "kind": "build_ids", "trie": args.out, "synthetic": True, "memory_budget": args.memory_budget,
        "facts_read": n, "facts": s["num_facts"], "file_bytes": s["file_bytes"],
        "bytes_per_fact": s["file_bytes"] / s["num_facts"], "wall_s": wall,
        "produce_s": s["produce_s"], "add_s": s["add_s"], "finish_s": s["finish_s"],
        "build_facts_per_s": n / (s["add_s"] + s["finish_s"]), "peak_rss_bytes": usage.ru_maxrss * 1024,
        "cpu_s": usage.ru_utime + usage.ru_stime, "peak_temp_bytes": s["peak_temp_bytes"], "runs": s["num_runs"],
        "register_generations": s["register_generations"], "nodes": s["num_nodes"],
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    })


# ---------------------------------------------------------------- latency


def sample_facts(kb: str, n: int, seed: int = 0, scan: int = 2_000_000) -> list:
    """n fact strings drawn uniformly from the first `scan` facts of the KB file."""
    from kcore.kb_files import iter_facts

    rng = np.random.default_rng(seed)
    reservoir = []
    for i, f in enumerate(iter_facts(kb, bad_lines="skip")):
        if i >= scan:
            break
        if len(reservoir) < n:
            reservoir.append(f)
        else:
            j = int(rng.integers(0, i + 1))
            if j < n:
                reservoir[j] = f
    return reservoir


def resident_fraction(path: str) -> float:
    """Fraction of the file's pages in the page cache (mincore on a mapping of it)."""
    import ctypes
    import mmap

    size = os.path.getsize(path)
    page = mmap.PAGESIZE
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    try:
        buf = ctypes.c_char.from_buffer(mm)
        n = (size + page - 1) // page
        vec = (ctypes.c_ubyte * n)()
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec) != 0:
            return float("nan")
        resident = sum(v & 1 for v in vec)
        del buf
    finally:
        mm.close()
    return resident / n


def drop_cache(path: str) -> float:
    """Evict the file's pages from the page cache (posix_fadvise DONTNEED: only this file, so the
    other users of this shared machine keep their cache); returns the fraction still resident."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_fraction(path)


def sample_id_facts(n: int):
    """n facts of the first token-id block (see id_chunks), as CSR (tokens, offsets) and labels."""
    from bench_trie import synthetic_facts

    t, o = synthetic_facts(ID_CHUNK, seed=0)
    # From the first 1M facts of the first block: they are in every build-ids trie of >= 1M facts.
    pick = np.sort(np.random.default_rng(0).choice(min(o.size - 1, 1_000_000), size=n, replace=False))
    rows = [t[o[i]:o[i + 1]] for i in pick]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=offsets[1:])
    return np.concatenate(rows).astype(np.int32), offsets, [f"id fact {i}" for i in pick]


def cmd_latency(args) -> None:
    from kcore.fact_tokenizer import FactTokenizer
    from kcore.trie import FactTrie

    if args.kb == "ids":
        tokens, offsets, facts = sample_id_facts(args.prefixes)
        trie = FactTrie.load(args.trie)
    else:
        tok = load_tokenizer()
        facts = sample_facts(args.kb, args.prefixes)
        tokens, offsets = FactTokenizer(tok).encode(facts)
        trie = FactTrie.load(args.trie, tokenizer=tok)
    missing = [facts[i] for i in range(len(facts)) if not trie.contains(tokens[offsets[i]:offsets[i + 1]])]
    assert not missing, f"{len(missing)} sampled facts are not in the trie, e.g. {missing[:3]}"
    del trie
    probe = Path(args.trie + ".probe.npz")
    np.savez(probe, tokens=tokens, offsets=offsets)
    out = {"kind": "latency", "trie": args.trie, "kb": args.kb, "file_bytes": os.path.getsize(args.trie),
           "prefixes": len(facts), "loadavg_start": os.getloadavg()}
    for what in ("next_tokens", "step_fill"):
        out[f"resident_after_drop[{what}]"] = drop_cache(args.trie)
        res = subprocess.run([sys.executable, __file__, "_probe", "--trie", args.trie, "--probe", str(probe), "--what", what],
                             capture_output=True, text=True, check=True)
        out.update(json.loads(res.stdout.strip().splitlines()[-1]))
    probe.unlink()
    out["loadavg_end"] = os.getloadavg()
    record(args.results, out)


def _timed(fn, items):
    times = np.empty(len(items))
    for i, x in enumerate(items):
        t0 = time.perf_counter_ns()
        fn(x)
        times[i] = time.perf_counter_ns() - t0
    return times / 1e3  # us


def cmd_probe(args) -> None:
    from kcore.trie import FactTrie

    d = np.load(args.probe)
    tokens, offsets = d["tokens"], d["offsets"]
    rng = np.random.default_rng(1)
    t_load = time.perf_counter()
    trie = FactTrie.load(args.trie)
    t_load = time.perf_counter() - t_load
    facts = [tokens[offsets[i]:offsets[i + 1]].astype(np.int64) for i in range(offsets.size - 1)]
    cut = [int(rng.integers(0, len(f))) for f in facts]  # proper prefixes: a next token exists
    out = {}
    if args.what == "next_tokens":
        prefixes = [f[:k] for f, k in zip(facts, cut)]
        cold = _timed(trie.next_tokens, prefixes)
        warm = np.median([_timed(trie.next_tokens, prefixes) for _ in range(5)], axis=0)
        out.update(load_s=t_load, next_cold_mean_us=cold.mean(), next_cold_p99_us=float(np.percentile(cold, 99)),
                   next_warm_mean_us=warm.mean(), next_warm_p50_us=float(np.median(warm)),
                   prefix_len_mean=float(np.mean(cut)))
    else:
        words = (trie.vocab_size + 31) // 32
        states = np.array([trie.state_of(f[:k]) for f, k in zip(facts, cut)], dtype=np.int64)  # warms the paths only
        nxt = np.array([f[k] for f, k in zip(facts, cut)], dtype=np.int64)
        mask = np.zeros((1, words), dtype=np.int32)

        def one(i):
            s = trie.step(states[i:i + 1], nxt[i:i + 1])
            trie.fill_bitmask(s, mask)

        idx = list(range(len(facts)))
        cold = _timed(one, idx)
        warm = np.median([_timed(one, idx) for _ in range(5)], axis=0)
        b = 64
        mask64 = np.zeros((b, words), dtype=np.int32)
        batches = [slice(i, i + b) for i in range(0, len(facts) - b + 1, b)]

        def batch(sl):
            s = trie.step(states[sl], nxt[sl])
            trie.fill_bitmask(s, mask64)

        warm64 = np.median([_timed(batch, batches) for _ in range(5)], axis=0) / b
        out.update(step_fill_cold_mean_us=cold.mean(), step_fill_cold_p99_us=float(np.percentile(cold, 99)),
                   step_fill_warm_mean_us=warm.mean(), step_fill_warm_b64_per_row_us=warm64.mean())
    print(json.dumps(out))


# ---------------------------------------------------------------- processor


def cmd_processor(args) -> None:
    import torch

    from kcore.fact_tokenizer import FactTokenizer
    from kcore.hf.facts import FactLogitsProcessor
    from kcore.trie import FactTrie

    tok = load_tokenizer()
    if args.kb == "ids":
        tokens, offsets, facts = sample_id_facts(8 * args.rounds)
    else:
        facts = sample_facts(args.kb, 8 * args.rounds, seed=2)
        tokens, offsets = FactTokenizer(tok).encode(facts)
    prompt = tok("Question: tell me a fact.\nFact:", add_special_tokens=False)["input_ids"]
    nl = tok("\n", add_special_tokens=False)["input_ids"]
    out = {"kind": "processor", "kb": args.kb, "batch": 8, "loadavg_start": os.getloadavg()}
    results = {}
    tries = [FactTrie.load(t, tokenizer=tok if args.kb != "ids" else None) for t in args.trie]
    for rep in range(args.repeats):  # interleaved, so both tries see the same machine load
        for trie in tries:
            proc = FactLogitsProcessor(trie, tok, trigger="Fact:", terminator="\n")
            times = []
            for r in range(args.rounds):
                rows = [tokens[offsets[i]:offsets[i + 1]].tolist() + nl for i in range(8 * r, 8 * r + 8)]
                for i in range(8 * r, 8 * r + 8):
                    assert trie.contains(tokens[offsets[i]:offsets[i + 1]]), facts[i]
                proc.reset()
                length = max(map(len, rows))
                seqs = [list(prompt) for _ in rows]
                for step in range(length):
                    ids = torch.tensor(seqs)
                    scores = torch.randn(8, 49152)
                    t0 = time.perf_counter_ns()
                    proc(ids, scores)
                    times.append(time.perf_counter_ns() - t0)
                    for b, row in enumerate(rows):
                        # The allowed token of the fact must survive the mask (correctness first).
                        t = row[step] if step < len(row) else nl[0]
                        assert step >= len(row) or torch.isfinite(scores[b, t]), (facts[8 * r + b], step)
                        seqs[b].append(t)
            results.setdefault(trie.path, []).append(float(np.mean(times)) / 1e3)
    for path, vals in results.items():
        out[f"step_us[{Path(path).name}]"] = statistics.median(vals)
        out[f"facts[{Path(path).name}]"] = FactTrie.load(path).num_facts
    out["loadavg_end"] = os.getloadavg()
    record(args.results, out)


# ---------------------------------------------------------------- report


def cmd_report(args) -> None:
    rows = [json.loads(line) for line in open(args.results)]
    print("| KB (facts read) | distinct facts | wall | tokenize facts/s | build facts/s | end to end facts/s | "
          "peak RSS | peak temp disk | .ktrie | bytes/fact | runs | load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] != "build":
            continue
        label = ("synthetic " if r["synthetic"] else "") + f"{r['facts_read']:,}"
        print(f"| {label} | {r['facts']:,} | {r['wall_s']:.0f} s | {r['tokenize_facts_per_s']:,.0f} | "
              f"{r['build_facts_per_s']:,.0f} | {r['end_to_end_facts_per_s']:,.0f} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"{r['peak_temp_bytes'] / 1e9:.2f} GB | {r['file_bytes'] / 1e6:.1f} MB | {r['bytes_per_fact']:.2f} | {r['runs']} | "
              f"{r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f} |")
    print()
    print("| trie | next_tokens cold | next_tokens warm | step+fill cold | step+fill warm | step+fill warm, batch 64, per row | load avg |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kind"] != "latency":
            continue
        print(f"| {Path(r['trie']).name} ({r['file_bytes'] / 1e6:.0f} MB) | {r['next_cold_mean_us']:.1f} us | "
              f"{r['next_warm_mean_us']:.2f} us | {r['step_fill_cold_mean_us']:.1f} us | {r['step_fill_warm_mean_us']:.2f} us | "
              f"{r['step_fill_warm_b64_per_row_us']:.2f} us | {r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f} |")
    for r in rows:
        if r["kind"] == "processor":
            print()
            print({k: v for k, v in r.items() if k.startswith(("step_us", "facts", "loadavg"))})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="kb_scale_results.jsonl")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--kb", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--memory-budget", default="1G")
    b.add_argument("--tmp-dir", default=None)
    b.set_defaults(func=cmd_build)
    lat = sub.add_parser("latency")
    lat.add_argument("--kb", required=True, help="the KB file the trie was built from, or 'ids' for build-ids tries")
    lat.add_argument("--trie", required=True)
    lat.add_argument("--prefixes", type=int, default=2000)
    lat.set_defaults(func=cmd_latency)
    pr = sub.add_parser("_probe")
    pr.add_argument("--trie", required=True)
    pr.add_argument("--probe", required=True)
    pr.add_argument("--what", required=True)
    pr.set_defaults(func=cmd_probe)
    proc = sub.add_parser("processor")
    proc.add_argument("--kb", required=True, help="KB file to sample facts from, or 'ids' for build-ids tries")
    proc.add_argument("--trie", action="append", required=True)
    proc.add_argument("--rounds", type=int, default=20)
    proc.add_argument("--repeats", type=int, default=3)
    proc.set_defaults(func=cmd_processor)
    bi = sub.add_parser("build-ids")
    bi.add_argument("--facts", type=int, required=True)
    bi.add_argument("--out", required=True)
    bi.add_argument("--memory-budget", default="1G")
    bi.set_defaults(func=cmd_build_ids)
    bic = sub.add_parser("_build_ids")
    bic.add_argument("--facts", type=int, required=True)
    bic.add_argument("--out", required=True)
    bic.add_argument("--memory-budget", default="1G")
    bic.set_defaults(func=cmd_build_ids_child)
    rep = sub.add_parser("report")
    rep.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
