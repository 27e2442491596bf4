"""Small parallel calls through kcore's thread pool (csrc/core/parallel.cpp): the cost a call pays
to split work over threads, measured on the ops that use parallel_for at sizes just above and
below their single-thread thresholds.

Each op's result is first checked against an independent one (torch backend, or the trie row by
row), then timed: median ms of repeated calls after one warm-up. To compare two builds of
parallel.cpp (e.g. the persistent pool against threads started per call), run this script on
each build with the same KCORE_NUM_THREADS.

    flock /tmp/kcore_bench.lock env KCORE_NUM_THREADS=2 python benchmarks/bench_parallel.py
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kcore.ops import apply_token_bitmask_, knn_search
from kcore.ops.memory_attention import memory_attention
from kcore.trie import FactTrie


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=300)
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    rows = []

    facts = [rng.integers(0, 1000, size=int(rng.integers(1, 5))).tolist() for _ in range(3000)]
    trie = FactTrie.build(facts, Path(tempfile.mkdtemp()) / "b.ktrie", vocab_size=1000, progress=False)
    prefixes = [trie.root_state] + [trie.state_of([int(t)]) for t in trie.next_tokens([])[:50]]
    for b in (512, 1024, 4096):
        st = np.array([prefixes[i] for i in rng.integers(0, len(prefixes), b)], dtype=np.int64)
        tok = rng.integers(0, 1000, b).astype(np.int64)
        ref = np.array([trie.step([s], [t])[0] for s, t in zip(st, tok)])
        assert np.array_equal(trie.step(st, tok), ref)
        mask = np.zeros((b, 32), np.int32)
        rows.append((f"FactTrie.step, batch {b}", median_ms(lambda: trie.step(st, tok), args.repeats)))
        rows.append((f"FactTrie.fill_bitmask, batch {b}", median_ms(lambda: trie.fill_bitmask(st, mask), args.repeats)))

    for b in (8, 16, 32, 128):
        logits = torch.randn(b, 49152)
        bitmask = torch.randint(-(2**31), 2**31 - 1, (b, 1536), dtype=torch.int32)
        ref, got = logits.clone(), logits.clone()
        apply_token_bitmask_(ref, bitmask, backend="torch")
        apply_token_bitmask_(got, bitmask, backend="cpu")
        assert torch.equal(ref, got)
        rows.append((f"apply_token_bitmask_, {b} x 49152 float32",
                     median_ms(lambda: apply_token_bitmask_(logits, bitmask, backend="cpu"), args.repeats)))

    for nk, dim in ((8192, 576), (16383, 576), (16384, 64), (100_000, 64)):
        keys, q = torch.randn(nk, dim), torch.randn(1, dim)
        assert torch.equal(knn_search(q, keys, 10, backend="cpu")[1], knn_search(q, keys, 10, backend="torch")[1])
        rows.append((f"knn_search, {nk} x {dim} float32 keys, 1 query, k 10",
                     median_ms(lambda: knn_search(q, keys, 10, backend="cpu"), args.repeats)))

    for name, hq, hkv, d in (("SmolLM2-135M", 9, 3, 64), ("Llama-3-8B", 32, 8, 128)):
        q = torch.randn(1, hq, 1, d)
        mk, mv = torch.randn(hkv, 10_000, d), torch.randn(hkv, 10_000, d)
        kn = mk / mk.norm(dim=-1, keepdim=True)
        out = memory_attention(q, mk, mv, topk=10, mem_keys_normed=kn, backend="cpu")
        ref = memory_attention(q, mk, mv, topk=10, mem_keys_normed=kn, backend="torch")
        torch.testing.assert_close(out[0], ref[0], rtol=1e-4, atol=1e-4)
        rows.append((f"memory_attention decode, {name}, 10k memories, float32",
                     median_ms(lambda: memory_attention(q, mk, mv, topk=10, mem_keys_normed=kn, backend="cpu"),
                               max(50, args.repeats // 3))))

    print(f"# {platform.machine()}, KCORE_NUM_THREADS={os.environ.get('KCORE_NUM_THREADS', '(unset)')}, "
          f"torch {torch.__version__}, median of {args.repeats} calls")
    print("| call | kcore cpu ms |")
    print("|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.4f} |")


if __name__ == "__main__":
    main()
