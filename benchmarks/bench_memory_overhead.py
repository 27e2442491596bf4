"""Added cost per generated token of kcore memory attention on SmolLM2-135M-Instruct (CPU).

Times greedy decoding with the plain model and with memory attention in all 30 layers over banks
of 10k and 100k memory tokens. The banks hold random keys and values of the right shape (timing
does not depend on their content); the real-bank build time is measured by
bench_memory_recall.py. Per-token decode time = (time of generate with 1 + n new tokens - time with
1 new token) / n, so the prefill is excluded; minimum of --repeats runs, each configuration paired with
a plain-model baseline timed just before it. Correctness first: with an
empty bank the hooked model generates the plain model's tokens.

Usage: flock /tmp/kcore_bench.lock python benchmarks/bench_memory_overhead.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kcore.attention import MemoryBank  # noqa: E402
from kcore.hf import enable_memory_attention  # noqa: E402
from kcore.models import load_model_and_tokenizer  # noqa: E402


def random_bank(model, mem_len: int, dtype=torch.float16, seed: int = 0) -> MemoryBank:
    cfg = model.config
    hkv, d = cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    g = torch.Generator().manual_seed(seed)
    keys, values = {}, {}
    for layer in range(cfg.num_hidden_layers):
        keys[layer] = torch.randn(hkv, mem_len, d, generator=g).to(dtype)
        values[layer] = torch.randn(hkv, mem_len, d, generator=g).to(dtype)
    token_map = torch.zeros(mem_len, 3, dtype=torch.int64)
    return MemoryBank(keys=keys, values=values, token_map=token_map, documents=[""], num_kv_heads=hkv, head_dim=d, dtype=dtype)


def decode_seconds_per_token(model, inputs, n_new: int, repeats: int) -> float:
    def run(n):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - t0

    run(2)  # warm-up (allocations, normalised-key cache)
    # The minimum over repeats: on a shared machine, other processes only ever add time.
    samples = [(run(1 + n_new) - run(1)) / n_new for _ in range(repeats)]
    return min(samples)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-record", action="store_true", help="also time without citation recording")
    p.add_argument("--reference-max", type=int, default=10000, help="largest size also timed with the torch reference backend")
    args = p.parse_args()

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer()
    msgs = [{"role": "user", "content": "Tell me about the history of the city of Quenthaville in a few sentences."}]
    inputs = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    with torch.no_grad():
        plain_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        with enable_memory_attention(model, MemoryBank.empty(model), topk=args.topk):
            empty_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain_tokens, empty_tokens), "empty bank must reproduce the plain model"

    # Each configuration is timed right after its own plain-model baseline, so that load changes
    # on a shared machine hit both alike.
    rows = []
    for size in [int(s) for s in args.sizes.split(",")]:
        bank = random_bank(model, size)
        configs = [("kcore cpu", "auto", True)]
        if args.no_record:
            configs.append(("kcore cpu, no citation record", "auto", False))
        if size <= args.reference_max:
            configs.append(("torch reference backend", "torch", False))
        for label, backend, record in configs:
            plain = decode_seconds_per_token(model, inputs, args.new_tokens, args.repeats)
            with enable_memory_attention(model, bank, topk=args.topk, backend=backend, record_citations=record):
                t = decode_seconds_per_token(model, inputs, args.new_tokens, args.repeats)
            rows.append((label, size, plain, t))
        del bank

    threads = torch.get_num_threads()
    print(f"SmolLM2-135M-Instruct fp32, CPU ({threads} torch threads), memory in all 30 layers, topk={args.topk}, "
          f"fp16 bank, prompt {inputs['input_ids'].shape[1]} tokens, {args.new_tokens} decode steps, min of {args.repeats}")
    print()
    print("| configuration | memory tokens | plain ms / token | with memory ms / token | added ms / token | x plain |")
    print("|---|---|---|---|---|---|")
    for label, size, plain, t in rows:
        print(f"| {label} | {size} | {plain * 1e3:.1f} | {t * 1e3:.1f} | {(t - plain) * 1e3:.1f} | {t / plain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
