"""kcore.ops.knn_search (cpu) against faiss IndexFlatL2/IndexFlatIP and torch matmul + topk, and
kcore.ops.knn_interpolate (cpu) against the plain torch version and a bare log_softmax.

Correctness first: kcore's neighbours are checked against faiss over the float32-widened keys
(exact: fp16/bf16 widen exactly), then everything is timed in the same process. Keys are random
normal, dimension 576 (SmolLM2's hidden size), queries random normal.

    flock /tmp/kcore_bench.lock python benchmarks/bench_knn.py [--quick] [--out FILE]

Columns: ms per call (median of the repeats), GB/s = key bytes streamed per second (the key
matrix in its own dtype), %bw = that as a share of the machine's read bandwidth measured here, and
speed-ups of kcore over each baseline (> 1 = kcore faster).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import time

import numpy as np
import torch

from kcore.ops import knn_interpolate, knn_search


def timeit(fn, repeats: int) -> float:
    """Median wall time in ms of `repeats` calls after one warm-up call."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def read_bandwidth_gbs() -> float:
    """Read bandwidth of this machine in GB/s: torch sum over a 1 GiB float32 buffer, all threads."""
    x = torch.ones(256 * 1024 * 1024, dtype=torch.float32)
    ms = min(timeit(lambda: x.sum(), 3) for _ in range(2))
    del x
    return 1024**3 / (ms / 1e3) / 1e9


def torch_topk(queries, keys, k, metric):
    """The baseline people write: scores in the keys' dtype, then topk."""
    scores = queries.to(keys.dtype) @ keys.T
    if metric == "l2":
        scores = (keys.float() if keys.dtype == torch.float32 else keys).pow(2).sum(1) - 2 * scores
        return torch.topk(scores, k, dim=1, largest=False)
    return torch.topk(scores, k, dim=1)


def check_against_faiss(dists, ids, ref_d, ref_i, metric, what):
    """Same distances (to float32 rounding) and the same ids apart from ties."""
    ref_d = torch.from_numpy(ref_d)
    tol = 1e-4 * ref_d.abs().max().item() + 1e-3
    err = (dists - ref_d).abs().max().item()
    assert err <= tol, f"{what}: distances differ from faiss by {err} (tolerance {tol})"
    same = np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids.tolist(), ref_i.tolist())])
    assert same > 0.99, f"{what}: only {same:.3f} of the ids agree with faiss"


def bench_search(args, bw_gbs, lines):
    import faiss

    dim = 576
    sizes = [100_000] if args.quick else [100_000, 1_000_000]
    nqs = [1, 8, 64]
    ks = [32, 1024]
    rng = torch.Generator().manual_seed(0)
    lines.append("## knn_search, cpu backend (ms per call; GB/s of keys streamed; speed-up = baseline / kcore)\n")
    lines.append(
        "| keys | dtype | queries | k | kcore l2 ms | kcore ip ms | kcore GB/s | %bw | faiss L2 ms (fp32) | "
        "faiss IP ms (fp32) | torch mm+topk ip ms | x faiss IP | x torch | x best baseline |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        keys32 = torch.randn(n, dim, generator=rng)
        queries_all = torch.randn(max(nqs), dim, generator=rng)
        flat = {"l2": faiss.IndexFlatL2(dim), "ip": faiss.IndexFlatIP(dim)}
        faiss_ms, faiss_ref = {}, {}
        repeats = args.repeats if n < 1_000_000 else max(1, args.repeats - 1)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            keys = keys32 if dtype == torch.float32 else keys32.to(dtype)
            widened = keys.float().numpy()
            for index in flat.values():
                index.reset()
                index.add(widened)
            del widened
            for nq in nqs:
                q = queries_all[:nq].contiguous()
                for k in ks:
                    res = {}
                    for metric in ("l2", "ip"):
                        ref_d, ref_i = flat[metric].search(q.numpy(), k)
                        d, i = knn_search(q, keys, k, metric=metric, backend="cpu")
                        check_against_faiss(d, i, ref_d, ref_i, metric, f"n={n} {dtype} nq={nq} k={k} {metric}")
                        res[metric] = timeit(lambda: knn_search(q, keys, k, metric=metric, backend="cpu"), repeats)
                    if dtype == torch.float32:  # faiss always searches float32 keys: time it once
                        for metric in ("l2", "ip"):
                            faiss_ms[(nq, k, metric)] = timeit(lambda: flat[metric].search(q.numpy(), k), repeats)
                    t_torch = timeit(lambda: torch_topk(q, keys, k, "ip"), repeats)
                    f_ip, f_l2 = faiss_ms[(nq, k, "ip")], faiss_ms[(nq, k, "l2")]
                    best_kcore = min(res["l2"], res["ip"])
                    gbs = n * dim * keys.element_size() / (best_kcore / 1e3) / 1e9
                    best_base = min(f_ip, f_l2, t_torch)
                    lines.append(
                        f"| {n:,} | {str(dtype).replace('torch.', '')} | {nq} | {k} | {res['l2']:.1f} | {res['ip']:.1f} | "
                        f"{gbs:.1f} | {100 * gbs / bw_gbs:.0f}% | {f_l2:.1f} | {f_ip:.1f} | {t_torch:.1f} | "
                        f"{f_ip / res['ip']:.2f} | {t_torch / res['ip']:.2f} | {best_base / best_kcore:.2f} |"
                    )
                    print(lines[-1], flush=True)
            del keys
            gc.collect()
        del keys32, flat
        gc.collect()


def plain_interpolate(lm_logits, dists, values, lmbda, temperature):
    """The plain torch version (softmax, scatter_add, logsumexp) the issue measured."""
    lm_logp = torch.log_softmax(lm_logits.float(), dim=-1)
    valid = values >= 0
    p = torch.softmax(torch.where(valid, -dists / temperature, float("-inf")), dim=-1)
    p_knn = torch.zeros_like(lm_logp).scatter_add_(1, values.clamp_min(0), p * valid)
    return torch.logsumexp(
        torch.stack([lm_logp + math.log(1 - lmbda), torch.log(p_knn) + math.log(lmbda)]), dim=0
    )


def bench_interpolate(args, lines):
    vocab, k = 49152, 1024
    lines.append("\n## knn_interpolate, cpu backend (vocab 49152, k 1024; ms per call)\n")
    lines.append(
        "| batch | kcore cpu ms | plain torch ms | bare log_softmax ms | x plain (target >= 5) | "
        "kcore / log_softmax (target <= 2) | kcore torch-reference ms |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(1)
    for batch in (1, 8, 64):
        logits = torch.randn(batch, vocab, generator=g) * 4
        dists = torch.rand(batch, k, generator=g) * 100
        values = torch.randint(0, vocab, (batch, k), generator=g)
        values[:, 1::2] = values[:, 0::2]  # every token appears twice
        ours = knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="cpu")
        plain = plain_interpolate(logits, dists, values, 0.25, 10.0)
        assert torch.allclose(ours, plain, atol=1e-4, rtol=1e-5), "kcore and plain torch disagree"
        r = args.repeats * 20
        t_ours = timeit(lambda: knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="cpu"), r)
        t_plain = timeit(lambda: plain_interpolate(logits, dists, values, 0.25, 10.0), r)
        t_ls = timeit(lambda: torch.log_softmax(logits, dim=-1), r)
        t_ref = timeit(lambda: knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="torch"), r)
        lines.append(
            f"| {batch} | {t_ours:.3f} | {t_plain:.3f} | {t_ls:.3f} | {t_plain / t_ours:.1f} | {t_ours / t_ls:.2f} | {t_ref:.3f} |"
        )
        print(lines[-1], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100k keys only")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", choices=["search", "interpolate"], default=None)
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    args = ap.parse_args()
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    ]
    bw = read_bandwidth_gbs()
    lines.append(f"measured read bandwidth (torch sum over 1 GiB fp32, all threads): {bw:.1f} GB/s\n")
    print("\n".join(lines), flush=True)
    if args.only in (None, "interpolate"):
        bench_interpolate(args, lines)
    if args.only in (None, "search"):
        bench_search(args, bw, lines)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(args.out + ".tmp", args.out)


if __name__ == "__main__":
    main()
