"""apply_token_bitmask_ on CPU: kcore's C++ kernel vs xgrammar's CPU kernel vs torch masked_fill_.

For each (vocab, batch, mask pattern): check that the three produce the same logits as the torch
reference, then time each in the same process (median of repeats, warm cache: the logits were just
written, as after the LM head) and print a markdown table with us per call, effective GB/s over
the bytes each one must touch, the fraction of this machine's memory bandwidth (measured here with
a large torch copy) and the speed-up ratios.

    flock /tmp/kcore_bench.lock python benchmarks/bench_bitmask.py [--out FILE.md]

Mask patterns: "random" sets each bit with probability 1/2 (every 32-token word is mixed: the
worst case for a word-skipping kernel); "constrained" allows 0.1% of the tokens, like a grammar or
fact trie in the middle of a fact; xgrammar's and torch's costs do not depend on the pattern.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import time

import torch

from kcore.ops import apply_token_bitmask_
from kcore.ops.bitmask import bitmask_from_bool, bitmask_to_bool

try:
    import xgrammar
except ImportError:  # the baseline is optional: `pip install xgrammar` in the benchmark env
    xgrammar = None


def timeit_us(fn, *, min_time_s=0.2, repeats=7):
    """Median over `repeats` of the mean time per call (us), each repeat lasting ~min_time_s/repeats."""
    fn()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.02 or n < 3:
        fn()
        n += 1
    per_call = (time.perf_counter() - start) / n
    inner = max(1, int(min_time_s / repeats / per_call))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner * 1e6)
    return statistics.median(samples)


def memory_bandwidth_gbs(nbytes=256 << 20):
    """Copy bandwidth (read + write bytes / s) of a large torch copy, all torch threads."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    us = timeit_us(lambda: dst.copy_(src), min_time_s=1.0, repeats=5)
    return 2 * nbytes / (us * 1e-6) / 1e9


def make_mask(batch, vocab, pattern, gen):
    if pattern == "random":
        allowed = torch.rand(batch, vocab, generator=gen) < 0.5
    else:
        allowed = torch.rand(batch, vocab, generator=gen) < 0.001
    return allowed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocabs", type=int, nargs="+", default=[49152, 128256])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--patterns", nargs="+", default=["random", "constrained"], choices=["random", "constrained"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--threads", type=int, default=0,
                    help="threads for torch and kcore (KCORE_NUM_THREADS); 0 = library defaults")
    ap.add_argument("--out", help="also write the markdown table to this file")
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
        os.environ["KCORE_NUM_THREADS"] = str(args.threads)  # read by the C++ side at each call
    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    gen = torch.Generator().manual_seed(0)

    bw = memory_bandwidth_gbs()
    lines = [
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"torch threads {torch.get_num_threads()}, kcore threads {os.environ.get('KCORE_NUM_THREADS', os.cpu_count())}, "
        f"xgrammar {importlib.metadata.version('xgrammar') if xgrammar is not None else 'not installed'}",
        f"memory bandwidth (256 MiB torch copy, read+write): {bw:.1f} GB/s; logits dtype {args.dtype}",
        "",
        "| vocab | batch | mask | kcore cpu us | xgrammar cpu us | masked_fill_ us | kcore GB/s | kcore / bw | "
        "vs xgrammar | vs masked_fill_ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for vocab in args.vocabs:
        for batch in args.batches:
            for pattern in args.patterns:
                allowed = make_mask(batch, vocab, pattern, gen)
                bitmask = bitmask_from_bool(allowed)
                disallowed = ~bitmask_to_bool(bitmask, vocab)  # masked_fill_'s precomputed bool mask
                base = torch.randn(batch, vocab, generator=gen).to(dtype)

                # Correctness first: every implementation gives the reference's logits.
                expected = base.clone()
                apply_token_bitmask_(expected, bitmask, backend="torch")
                got = base.clone()
                apply_token_bitmask_(got, bitmask, backend="cpu")
                assert torch.equal(got, expected), "kcore cpu differs from the torch reference"
                got = base.clone().masked_fill_(disallowed, float("-inf"))
                assert torch.equal(got, expected), "masked_fill_ differs from the torch reference"
                if xgrammar is not None:
                    got = base.clone()
                    xgrammar.apply_token_bitmask_inplace(got, bitmask, backend="cpu")
                    assert torch.equal(got, expected), "xgrammar cpu differs from the torch reference"

                logits = base.clone()
                t_k = timeit_us(lambda: apply_token_bitmask_(logits, bitmask, backend="cpu"))
                t_m = timeit_us(lambda: logits.masked_fill_(disallowed, float("-inf")))
                t_x = (
                    timeit_us(lambda: xgrammar.apply_token_bitmask_inplace(logits, bitmask, backend="cpu"))
                    if xgrammar is not None
                    else float("nan")
                )
                # Bytes kcore must touch: read + write the logits, read the bitmask.
                nbytes = 2 * batch * vocab * elem + bitmask.numel() * 4
                gbs = nbytes / (t_k * 1e-6) / 1e9
                line = (
                    f"| {vocab} | {batch} | {pattern} | {t_k:.1f} | {t_x:.1f} | {t_m:.1f} | {gbs:.1f} | "
                    f"{gbs / bw:.2f} | {t_x / t_k:.1f}x | {t_m / t_k:.1f}x |"
                )
                lines.append(line)
                print(line, flush=True)
    lines.append("")
    lines.append("kcore / bw > 1 means the logits stayed in cache (L2 2 MiB/core, L3 32 MiB here).")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
