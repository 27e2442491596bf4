"""GPU benchmark of kcore.ops.knn (triton backend) against torch on CUDA; run by gpu_check.sh.

    python benchmarks/gpu_knn.py --out DIR

knn_search triton vs torch ``matmul + topk`` (scores in the keys' dtype, as people write it) over
fp16 and bf16 keys (1M x 576), queries 1/8/64, k 32/1024; knn_interpolate triton vs the plain
torch version (softmax, scatter_add, logsumexp) and a bare log_softmax, batch 1/8/64, vocab 49152,
k 1024. Correctness is asserted first (triton against kcore's fp32 torch reference). Writes
DIR/gpu_knn.md. Bounded to well under 60 s on an H200.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from kcore.ops import knn_interpolate, knn_search


def cuda_ms(fn, repeats=10):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def plain_interpolate(lm_logits, dists, values, lmbda, temperature):
    lm_logp = torch.log_softmax(lm_logits.float(), dim=-1)
    valid = values >= 0
    p = torch.softmax(torch.where(valid, -dists / temperature, float("-inf")), dim=-1)
    p_knn = torch.zeros_like(lm_logp).scatter_add_(1, values.clamp_min(0), p * valid)
    return torch.logsumexp(torch.stack([lm_logp + math.log(1 - lmbda), torch.log(p_knn) + math.log(lmbda)]), dim=0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--num-keys", type=int, default=1_000_000)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_knn.py needs a CUDA device")
    dev = torch.device("cuda")
    t_begin = time.time()
    lines = [f"# kcore knn on {torch.cuda.get_device_name(0)} ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"]
    g = torch.Generator(device=dev).manual_seed(0)
    n, dim = args.num_keys, 576
    keys32 = torch.randn(n, dim, device=dev, generator=g)
    lines.append(f"## knn_search, {n:,} keys x {dim} (ms; GB/s of keys streamed; x = torch / triton)\n")
    lines.append("| dtype | queries | k | triton l2 ms | triton ip ms | GB/s | torch mm+topk ms | x torch |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float16, torch.bfloat16):
        keys = keys32.to(dtype)
        for nq in (1, 8, 64):
            q = torch.randn(nq, dim, device=dev, generator=g)
            for k in (32, 1024):
                # correctness: same k-th distance as the fp32 reference over the widened keys
                d_t, _ = knn_search(q, keys, k, metric="l2", backend="triton")
                d_r, _ = knn_search(q, keys, k, metric="l2", backend="torch")
                assert torch.allclose(d_t, d_r, rtol=1e-4, atol=1e-2), "triton knn_search disagrees with torch reference"
                t_l2 = cuda_ms(lambda: knn_search(q, keys, k, metric="l2", backend="triton"))
                t_ip = cuda_ms(lambda: knn_search(q, keys, k, metric="ip", backend="triton"))
                t_torch = cuda_ms(lambda: torch.topk(q.to(dtype) @ keys.T, k, dim=1))
                gbs = n * dim * keys.element_size() / (t_ip / 1e3) / 1e9
                lines.append(f"| {str(dtype)[6:]} | {nq} | {k} | {t_l2:.3f} | {t_ip:.3f} | {gbs:.0f} | {t_torch:.3f} | {t_torch / t_ip:.2f} |")
                print(lines[-1], flush=True)
        del keys
    del keys32

    vocab, k = 49152, 1024
    lines.append(f"\n## knn_interpolate, vocab {vocab}, k {k} (ms)\n")
    lines.append("| batch | triton ms | plain torch ms | log_softmax ms | x plain | triton / log_softmax |")
    lines.append("|---|---|---|---|---|---|")
    for batch in (1, 8, 64):
        logits = torch.randn(batch, vocab, device=dev, generator=g) * 4
        dists = torch.rand(batch, k, device=dev, generator=g) * 100
        values = torch.randint(0, vocab, (batch, k), device=dev, generator=g)
        ours = knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="triton")
        ref = knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="torch")
        assert torch.allclose(ours, ref, atol=1e-4), "triton knn_interpolate disagrees with torch reference"
        t_ours = cuda_ms(lambda: knn_interpolate(logits, dists, values, lmbda=0.25, temperature=10.0, backend="triton"), 50)
        t_plain = cuda_ms(lambda: plain_interpolate(logits, dists, values, 0.25, 10.0), 50)
        t_ls = cuda_ms(lambda: torch.log_softmax(logits, dim=-1), 50)
        lines.append(f"| {batch} | {t_ours:.3f} | {t_plain:.3f} | {t_ls:.3f} | {t_plain / t_ours:.1f} | {t_ours / t_ls:.2f} |")
        print(lines[-1], flush=True)
    lines.append(f"\ntotal {time.time() - t_begin:.0f} s")
    path = os.path.join(args.out, "gpu_knn.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
