"""Added cost per generated token of kcore memory attention on SmolLM2-135M-Instruct (CPU).

Times greedy decoding with the plain model and with memory attention in all 30 layers over banks
of 10k and 100k memory tokens. The banks hold random keys and values of the right shape (timing
does not depend on their content); the real-bank build time is measured by
bench_memory_recall.py. Per-token time = median of single decode
steps (KV cache reused, prefill excluded), each configuration paired with a plain-model baseline
timed just before it. Correctness first: with an
empty bank the hooked model generates the plain model's tokens.

Usage: flock /tmp/kcore_bench.lock python benchmarks/bench_memory_overhead.py [--sizes 10000,100000]
"""

from __future__ import annotations

import argparse
import os
import statistics
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
    """Median time of one decode step (one new token, KV cache reused) over repeats x n_new
    steps after a prefill: the median ignores the stalls other processes cause on a shared
    machine, which a difference of two generate() timings does not."""
    times = []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first round warms up (allocations, normalised keys)
            out = model(**inputs, use_cache=True)
            cache, mask = out.past_key_values, inputs["attention_mask"]
            token = out.logits[:, -1:].argmax(-1)
            round_times = []
            for _ in range(n_new):
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                t0 = time.perf_counter()
                out = model(input_ids=token, attention_mask=mask, cache=cache, use_cache=True)
                round_times.append(time.perf_counter() - t0)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            times.append(round_times)
    return statistics.median(t for r in times[1:] for t in r)


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
          f"fp16 bank, prompt {inputs['input_ids'].shape[1]} tokens, median of {args.repeats}x{args.new_tokens} decode steps")
    print()
    print("| configuration | memory tokens | plain ms / token | with memory ms / token | added ms / token | x plain |")
    print("|---|---|---|---|---|---|")
    for label, size, plain, t in rows:
        print(f"| {label} | {size} | {plain * 1e3:.1f} | {t * 1e3:.1f} | {(t - plain) * 1e3:.1f} | {t / plain:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
