"""Fused CPU top-k memory attention vs the torch reference, one decode step (batch 1, q_len 1).

Shapes: SmolLM2-135M (9 query heads, 3 KV heads, head dim 64) and Llama-3-8B (32, 8, 128); memory
of 10k and 100k tokens (one layer's bank); topk 10 (the Extended Mind Transformers default). The
bank provides unit-normalised keys, so both backends stream mem_keys_normed for the ranking.
Correctness is asserted first (same indices, outputs within tolerance), then each backend is
timed (median of repeated calls, one warm-up). "GB/s" is the bytes of normalised keys streamed
per call divided by the time.

    flock /tmp/kcore_bench.lock python benchmarks/bench_memory_attention.py [--dtypes float32 bfloat16]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from kcore.ops.memory_attention import memory_attention, normalize_keys

SHAPES = {"SmolLM2-135M": (9, 3, 64), "Llama-3-8B": (32, 8, 128)}


def time_ms(fn, min_time_s: float, max_reps: int) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - start < min_time_s or len(times) < 3):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def check_same(ref, got, dtype, what):
    out_r, lse_r, idx_r = ref
    out_g, lse_g, idx_g = got
    # Random data: no ties, so the selected sets must agree except for near-equal similarities
    # that summation order can swap; compare as sets and allow at most 1 in 1000 differences.
    diff = (idx_r.sort(-1).values != idx_g.sort(-1).values).any(-1).float().mean().item()
    assert diff <= 1e-3, f"{what}: {diff:.2%} of (query, head) select other memories"
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    err = (out_r.float() - out_g.float()).abs().max().item()
    assert err <= tol, f"{what}: max |out - ref| = {err}"
    assert torch.allclose(lse_r, lse_g, atol=tol, rtol=0), f"{what}: lse differs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem-lens", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    ap.add_argument("--topk", type=int, default=10)
    ap.add_argument("--q-len", type=int, default=1, help="query tokens per call (1 = decode; more = prefill)")
    ap.add_argument("--min-time", type=float, default=1.0, help="seconds of timing per case")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (the kernel uses KCORE_NUM_THREADS)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"KCORE_NUM_THREADS={os.environ.get('KCORE_NUM_THREADS', 'all')}, torch {torch.__version__}, "
          f"q_len {args.q_len}, topk {args.topk}")
    print("| model shape | mem tokens | dtype | torch ms | kcore cpu ms | speed-up | kcore GB/s | torch GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for name, (hq, hkv, d) in SHAPES.items():
        for m in args.mem_lens:
            for dt_name in args.dtypes:
                dtype = getattr(torch, dt_name)
                q = torch.randn(1, hq, args.q_len, d, generator=gen)
                keys = torch.randn(hkv, m, d, generator=gen).to(dtype)
                values = torch.randn(hkv, m, d, generator=gen).to(dtype)
                normed = normalize_keys(keys)

                def run(backend):
                    return memory_attention(q, keys, values, topk=args.topk, mem_keys_normed=normed, backend=backend)

                check_same(run("torch"), run("cpu"), dtype, f"{name} {m} {dt_name}")
                reps = 50 if m <= 10_000 else 15
                t_ref = time_ms(lambda: run("torch"), args.min_time, reps)
                t_cpu = time_ms(lambda: run("cpu"), args.min_time, reps)
                gbytes = normed.numel() * normed.element_size() / 1e9
                print(f"| {name} ({hq}/{hkv}/{d}) | {m} | {dt_name} | {t_ref:.3f} | {t_cpu:.3f} | "
                      f"{t_ref / t_cpu:.2f}x | {gbytes / (t_cpu / 1e3):.1f} | {gbytes / (t_ref / 1e3):.1f} |",
                      flush=True)


if __name__ == "__main__":
    main()
