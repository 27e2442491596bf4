"""apply_token_bitmask_ on a GPU: kcore's triton and cuda backends vs torch masked_fill_.

Vocab 128256 (Llama 3), batch 1, 64 and 4096, fp32 and bf16 logits, random masks (each token
allowed with probability 1/2). Correctness is asserted against the torch reference first. Each
call is timed with CUDA events two ways:

* eager: one call per event pair, L2 flushed before each (triton.testing.do_bench), so it
  includes the Python-side checks and the launch, as a decoding loop sees it;
* graph: 20 calls captured in a CUDA graph, replayed, time / 20 (the kernel alone, as in a
  CUDA-graph decoding loop; the logits may stay in L2 at small batch).

Bandwidth: bytes that must move (read + write the logits, read the bitmask; masked_fill_ reads
a bool mask instead) / time, as a fraction of the H200's 4.8 TB/s HBM bandwidth.

    python benchmarks/gpu_bitmask.py --out DIR     # writes DIR/gpu_bitmask.md; < 60 s on an H200
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from kcore.ops import apply_token_bitmask_
from kcore.ops.bitmask import bitmask_to_bool

HBM_TBS = 4.8  # H200 HBM3e, TB/s
VOCAB = 128256


def bench_graph_us(fn, calls=20, replays=10):
    """Mean time per call (us) of `calls` calls captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on the side stream, as graph capture requires
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * replays)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="folder for gpu_bitmask.md")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_bitmask.py needs a CUDA device; none found", file=sys.stderr)
        return 2
    from triton.testing import do_bench

    from kcore._native import cuda_compiled

    backends = ["triton"] + (["cuda"] if cuda_compiled() else [])
    t_start = time.time()
    gen = torch.Generator(device="cuda").manual_seed(0)
    lines = [
        f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, vocab {VOCAB}, random masks, "
        f"fraction of {HBM_TBS} TB/s; kcore.cuda_compiled={cuda_compiled()}",
        "",
        "| dtype | batch | impl | eager us | graph us | graph GB/s | graph / HBM bw | masked_fill_ graph us / impl graph us |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        elem = torch.finfo(dtype).bits // 8
        for batch in args.batches:
            words = (VOCAB + 31) // 32
            bitmask = torch.randint(-(2**31), 2**31 - 1, (batch, words), dtype=torch.int32, device="cuda", generator=gen)
            disallowed = ~bitmask_to_bool(bitmask, VOCAB)
            base = torch.randn(batch, VOCAB, device="cuda", generator=gen).to(dtype)
            expected = base.clone()
            apply_token_bitmask_(expected, bitmask, backend="torch")
            masked = base.clone().masked_fill_(disallowed, float("-inf"))
            assert torch.equal(masked, expected), "masked_fill_ differs from the reference"
            impls = {"masked_fill_": lambda x: x.masked_fill_(disallowed, float("-inf"))}
            for b in backends:
                impls[b] = lambda x, b=b: apply_token_bitmask_(x, bitmask, backend=b)
                got = base.clone()
                impls[b](got)
                torch.cuda.synchronize()
                assert torch.equal(got, expected), f"backend {b} differs from the torch reference (dtype {dtype_name}, batch {batch})"

            logits = base.clone()
            timings = {}
            for name, fn in impls.items():
                eager_us = do_bench(lambda fn=fn: fn(logits), warmup=5, rep=40) * 1e3
                graph_us = bench_graph_us(lambda fn=fn: fn(logits))
                timings[name] = (eager_us, graph_us)
            for name, (eager_us, graph_us) in timings.items():
                mask_bytes = disallowed.numel() if name == "masked_fill_" else bitmask.numel() * 4
                nbytes = 2 * batch * VOCAB * elem + mask_bytes
                gbs = nbytes / (graph_us * 1e-6) / 1e9
                ratio = timings["masked_fill_"][1] / graph_us
                line = (
                    f"| {dtype_name} | {batch} | {name} | {eager_us:.1f} | {graph_us:.1f} | {gbs:.0f} | "
                    f"{gbs / (HBM_TBS * 1e3):.2f} | {ratio:.2f}x |"
                )
                lines.append(line)
                print(line, flush=True)
            del base, expected, masked, logits, disallowed, bitmask
            torch.cuda.empty_cache()
    lines.append("")
    lines.append(f"total time {time.time() - t_start:.1f} s")
    print(lines[-1])
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, "gpu_bitmask.md")
        with open(path + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
