"""Each CPU kernel variant side by side, in one process: what a user of the portable wheel gets on an
AVX2-only or AVX-512 machine, against kernels compiled with -march=native for this machine.

kcore compiles its CPU kernels once per instruction set (csrc/core/cpu_dispatch.h) and picks one at
import; ``kcore._C.set_cpu_isa`` switches between them here. Run it on a build that also has the
native variant:

    KCORE_NATIVE=ON bash scripts/dev_build.sh
    flock /tmp/kcore_bench.lock python benchmarks/bench_isa.py [--rounds 7] [--out FILE.md]

The core cases of bench_bitmask.py, bench_knn.py and bench_memory_attention.py, with their data and
correctness checks (each variant is checked against the torch reference or faiss before timing),
plus trie step + fill_bitmask from bench_trie.py, whose code is compiled for the baseline only (the
same code under every variant: its row shows the noise of the run). Timing: in each of --rounds
rounds every variant runs each case for about --time seconds, the order of the variants rotating
from round to round; the table gives the median per call and the ratio to the native variant
(> 1 = slower than native).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other benchmark scripts

import bench_bitmask  # noqa: E402
import bench_knn  # noqa: E402
import bench_memory_attention  # noqa: E402

from kcore._native import native  # noqa: E402
from kcore.ops import apply_token_bitmask_, knn_interpolate, knn_search  # noqa: E402
from kcore.ops.bitmask import bitmask_from_bool  # noqa: E402
from kcore.ops.memory_attention import memory_attention, normalize_keys  # noqa: E402


def per_call_us(fn, seconds: float) -> float:
    """Mean time per call (us) over about `seconds` of back-to-back calls, after one warm-up call."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= 3:
            return elapsed / n * 1e6


def bitmask_cases(gen):
    for vocab, batch, pattern, dtype in [(128256, 1, "random", torch.float32), (128256, 8, "random", torch.float32),
                                         (128256, 64, "random", torch.float32),
                                         (128256, 8, "constrained", torch.bfloat16)]:
        bitmask = bitmask_from_bool(bench_bitmask.make_mask(batch, vocab, pattern, gen))
        base = torch.randn(batch, vocab, generator=gen).to(dtype)
        expected = base.clone()
        apply_token_bitmask_(expected, bitmask, backend="torch")
        logits = base.clone()

        def check(bitmask=bitmask, base=base, expected=expected):
            got = base.clone()
            apply_token_bitmask_(got, bitmask, backend="cpu")
            assert torch.equal(got, expected), "bitmask: differs from the torch reference"

        yield (f"apply_token_bitmask_ vocab {vocab} batch {batch} {pattern} {str(dtype)[6:]}", check,
               lambda logits=logits, bitmask=bitmask: apply_token_bitmask_(logits, bitmask, backend="cpu"))


def knn_cases(gen):
    import faiss

    dim, n = 576, 100_000
    keys32 = torch.randn(n, dim, generator=gen)
    flat = faiss.IndexFlatL2(dim)
    flat.add(keys32.numpy())
    for dtype, nq, k in [(torch.float32, 1, 32), (torch.float32, 8, 32), (torch.float16, 1, 32),
                         (torch.bfloat16, 8, 32)]:
        keys = keys32 if dtype == torch.float32 else keys32.to(dtype)
        q = torch.randn(nq, dim, generator=gen)
        ref_index = flat
        if dtype != torch.float32:
            ref_index = faiss.IndexFlatL2(dim)
            ref_index.add(keys.float().numpy())
        ref_d, ref_i = ref_index.search(q.numpy(), k)

        def check(q=q, keys=keys, k=k, ref_d=ref_d, ref_i=ref_i, what=f"{dtype} nq={nq}"):
            d, i = knn_search(q, keys, k, metric="l2", backend="cpu")
            bench_knn.check_against_faiss(d, i, ref_d, ref_i, "l2", what)

        yield (f"knn_search 100k x 576 {str(dtype)[6:]} keys, {nq} queries, k {k}", check,
               lambda q=q, keys=keys, k=k: knn_search(q, keys, k, metric="l2", backend="cpu"))
    vocab, k = 49152, 1024
    for batch, dtype in [(1, torch.float32), (8, torch.bfloat16)]:
        logits = (3 * torch.randn(batch, vocab, generator=gen)).to(dtype)
        dists = torch.rand(batch, k, generator=gen) * 50
        values = torch.randint(0, vocab, (batch, k), generator=gen)
        ref = knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="torch")

        def check(logits=logits, dists=dists, values=values, ref=ref):
            got = knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="cpu")
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)

        yield (f"knn_interpolate vocab {vocab} k {k} batch {batch} {str(dtype)[6:]}", check,
               lambda logits=logits, dists=dists, values=values: knn_interpolate(
                   logits, dists, values, lmbda=0.25, temperature=10.0, backend="cpu"))


def memory_attention_cases(gen):
    for (name, (hq, hkv, d)), m, dtype, q_len in [
        (("SmolLM2", (9, 3, 64)), 100_000, torch.float32, 1), (("SmolLM2", (9, 3, 64)), 100_000, torch.bfloat16, 1),
        (("Llama-3-8B", (32, 8, 128)), 10_000, torch.float32, 1), (("SmolLM2", (9, 3, 64)), 10_000, torch.float32, 64),
    ]:
        q = torch.randn(1, hq, q_len, d, generator=gen)
        keys = torch.randn(hkv, m, d, generator=gen).to(dtype)
        values = torch.randn(hkv, m, d, generator=gen).to(dtype)
        normed = normalize_keys(keys)

        def run(backend, q=q, keys=keys, values=values, normed=normed):
            return memory_attention(q, keys, values, topk=10, mem_keys_normed=normed, backend=backend)

        ref = run("torch")

        def check(run=run, ref=ref, dtype=dtype, what=f"{name} {m} {dtype}"):
            bench_memory_attention.check_same(ref, run("cpu"), dtype, what)

        yield (f"memory_attention {name} ({hq}/{hkv}/{d}) {m // 1000}k {str(dtype)[6:]} q_len {q_len}", check,
               lambda run=run: run("cpu"))


def trie_case(tmp: str):
    import bench_trie

    from kcore.trie import FactTrie

    tokens, offsets = bench_trie.synthetic_facts(200_000)
    path = os.path.join(tmp, "isa.ktrie")
    trie = FactTrie.build_from_arrays(tokens, offsets, path, vocab_size=49152)
    rng = np.random.default_rng(0)
    prefixes = bench_trie.sample_prefixes(tokens, offsets, 4000, rng)
    rows = [(p, nt) for p in prefixes if p for nt in [trie.next_tokens(p)] if nt.size][:64]
    states = np.array([trie.state_of(p) for p, _ in rows], dtype=np.int64)
    toks = np.array([nt[0] for _, nt in rows], dtype=np.int64)
    mask = np.zeros((len(rows), (49152 + 31) // 32), dtype=np.int32)

    def check():
        trie.fill_bitmask(trie.step(states, toks), mask)
        for i, (p, _) in enumerate(rows):
            expect = np.zeros(mask.shape[1], dtype=np.int32)
            bench_trie.set_bits(expect, trie.next_tokens(list(p) + [int(toks[i])]))
            assert np.array_equal(mask[i], expect)

    return (f"trie step + fill_bitmask, {len(rows)} rows (baseline code in every variant)", check,
            lambda: trie.fill_bitmask(trie.step(states, toks), mask))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--time", type=float, default=0.15, help="seconds per case, variant and round")
    ap.add_argument("--families", nargs="+", default=["bitmask", "knn", "memory_attention", "trie"])
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()
    c = native()
    features = c.cpu_features()
    variants = features["supported"]
    if "native" not in variants:
        print("note: no native variant in this build (KCORE_NATIVE=ON bash scripts/dev_build.sh adds it); "
              "ratios are to the last variant", file=sys.stderr)
    ref_isa = variants[-1]
    gen = torch.Generator().manual_seed(0)
    lines = [
        f"machine: {features['cpu_brand']} ({platform.machine()}), {os.cpu_count()} cores, load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start; torch {torch.__version__}, "
        f"kcore threads {c.num_threads()}",
        "variants: " + ", ".join(f"{v} ({features['variant_flags'][v]})" for v in variants)
        + (f"; {', '.join(features['runtime_extensions'])} at run time in the AVX-512 variants"
           if features["runtime_extensions"] else ""),
        f"{args.rounds} rounds x {args.time} s per case and variant; median us per call; ratio = variant / {ref_isa}",
        "",
        "| case | " + " | ".join(f"{v} us" for v in variants) + " | "
        + " | ".join(f"{v} / {ref_isa}" for v in variants if v != ref_isa) + " |",
        "|---|" + "---|" * (2 * len(variants) - 1),
    ]
    print("\n".join(lines), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        if "bitmask" in args.families:
            cases += list(bitmask_cases(gen))
        if "knn" in args.families:
            cases += list(knn_cases(gen))
        if "memory_attention" in args.families:
            cases += list(memory_attention_cases(gen))
        if "trie" in args.families:
            cases.append(trie_case(tmp))
        for name, check, fn in cases:
            for v in variants:  # correctness first, under every variant
                c.set_cpu_isa(v)
                check()
            times = {v: [] for v in variants}
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[: r % len(variants)]
                for v in order:
                    c.set_cpu_isa(v)
                    times[v].append(per_call_us(fn, args.time))
            med = {v: statistics.median(t) for v, t in times.items()}
            line = (f"| {name} | " + " | ".join(f"{med[v]:.1f}" for v in variants) + " | "
                    + " | ".join(f"{med[v] / med[ref_isa]:.2f}" for v in variants if v != ref_isa) + " |")
            lines.append(line)
            print(line, flush=True)
    c.set_cpu_isa(features["isa"])
    lines.append("")
    lines.append(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(lines[-1])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
