"""Counterfactual recall with kcore memory attention on SmolLM2-135M-Instruct.

A memory document states invented facts (invented countries with invented capitals: the model has
no prior about them, and SmolLM2-135M does not override a real country's known capital even with
the document in its prompt); the model is then
asked for each capital (chat template, answer prefilled with "The capital of X is") and an answer
counts when the whole invented capital appears, as a word, in the first 12 generated tokens. The
document has one fact per line; the invented names are deterministic, at most 3 tokens, and no two
names share their first token (names that do are confused even with the document in the prompt).
Conditions:

* no memory (the model's prior; invented names, so about 0);
* kcore memory attention over a bank of the document (topk chosen on the dev half, then scored
  on the test half), and the same with an int8 bank;
* the document placed in the prompt;

then the same with the facts buried in tens of thousands of tokens of real distractor text (the
news corpus lee_background.cor from the gensim wheel's test data), where the document no longer
fits SmolLM2's 8k context.

Usage: python benchmarks/bench_memory_recall.py [--distractor-tokens 50000] [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kcore.attention import MemoryBank  # noqa: E402
from kcore.hf import enable_memory_attention  # noqa: E402
from kcore.models import load_model_and_tokenizer  # noqa: E402

ONSETS = ["Br", "Qu", "V", "Z", "Th", "K", "Dr", "M", "L", "S", "Gr", "P", "T", "N", "F", "H",
          "B", "C", "D", "G", "R", "W", "J", "St", "Bl", "Cr", "Pl", "Tr", "Sh", "Ch", "Y", "Fl"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["nd", "rth", "lm", "x", "ss", "rn", "v", "nt", "sk", "ll"]
ENDINGS = ["holm", "ora", "ville", "grad", "ium", "ton", "mere", "dor", "is", "ant"]


def _invented_names(n, tok, seed, suffixes, taken=()):
    """``n`` invented names, deterministic for a seed (a list, never a set: set order follows the
    per-process string hash seed, which made the facts differ from run to run). Each name is at
    most 3 tokens after a space and starts with a token no other chosen name (nor ``taken``) starts
    with: SmolLM2-135M cannot copy long fragmented names, and names sharing their first token are
    confused with each other even with the document in the prompt, which would measure the
    tokenizer rather than recall."""
    rng = random.Random(seed)
    names, firsts = [], {tok.tokenize(" " + t)[0] for t in taken}
    for _ in range(100000):
        if len(names) == n:
            return names
        name = rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) + rng.choice(suffixes)
        pieces = tok.tokenize(" " + name)
        if name in names or len(pieces) > 3 or pieces[0] in firsts:
            continue
        names.append(name)
        firsts.add(pieces[0])
    raise SystemExit(f"could not invent {n} distinct names; use fewer --facts")


def invented_countries(n, tok, seed=1):
    return _invented_names(n, tok, seed, ["ia", "land", "istan", "ovia", "ar"])


def invented_capitals(n, tok, countries, seed=7):
    return _invented_names(n, tok, seed, ENDINGS, taken=countries)


def distractor_text() -> str:
    """lee_background.cor from the installed gensim wheel (found through its metadata, not imported)."""
    dist = importlib.metadata.distribution("gensim")
    for f in dist.files or ():
        if str(f).endswith("lee_background.cor"):
            return Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace")
    raise SystemExit("needs the gensim wheel's test data (pip install --no-deps gensim)")


def fact_sentence(country, capital):
    return f"The capital of {country} is {capital}."


def ask(model, tok, country, *, context=None, max_new_tokens=12):
    question = f"What is the capital of {country}?"
    content = question if context is None else f"{context}\n\n{question}"
    msgs = [{"role": "user", "content": content}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt += f"The capital of {country} is"
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def accuracy(model, tok, facts, **kw):
    hits = 0
    for country, capital in facts:
        # Whole name, case-insensitive, as a word (12 new tokens leave room for a 3-token name).
        hits += re.search(rf"\b{re.escape(capital)}\b", ask(model, tok, country, **kw), re.I) is not None
    return hits / len(facts)


def with_memory(model, tok, bank, facts, topk):
    with enable_memory_attention(model, bank, topk=topk, record_citations=False):
        return accuracy(model, tok, facts)


def int8_logit_drift(model, tok, bank, bank8, facts, topk):
    """Next-token logits after each question with the float bank vs the int8 bank: max and mean
    absolute difference, and how often the top-1 token agrees."""
    diffs, agree = [], 0
    for country, _ in facts:
        msgs = [{"role": "user", "content": f"What is the capital of {country}?"}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + f"The capital of {country} is"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        logits = []
        for b in (bank, bank8):
            with torch.no_grad(), enable_memory_attention(model, b, topk=topk, record_citations=False):
                logits.append(model(**ids).logits[0, -1])
        diffs.append((logits[0] - logits[1]).abs())
        agree += int(logits[0].argmax() == logits[1].argmax())
    d = torch.stack(diffs)
    return {"max_abs": d.max().item(), "mean_abs": d.mean().item(), "top1_agree": agree / len(facts)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=20, help="invented facts (half dev, half test)")
    p.add_argument("--topks", default="2,4,8,16")
    p.add_argument("--distractor-tokens", type=int, default=50000, help="0 to skip the buried part")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--bank-cache", default="", help="folder to keep the built banks in")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    p.add_argument("--only-buried", type=int, default=0, metavar="TOPK",
                   help="skip the facts-only part; run the buried part with this topk")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer()
    countries = invented_countries(args.facts, tok)
    facts = list(zip(countries, invented_capitals(args.facts, tok, countries)))
    dev, test = facts[0::2], facts[1::2]
    doc = "\n".join(fact_sentence(c, k) for c, k in facts)
    topks = [int(x) for x in args.topks.split(",")]
    results = {"facts": len(facts), "dev": len(dev), "test": len(test), "window": args.window, "stride": args.stride}

    def build(documents, name, **kw):
        path = Path(args.bank_cache) / f"{name}.safetensors" if args.bank_cache else None
        if path is not None and path.exists():
            return MemoryBank.load(path, tokenizer=tok, model=model), 0.0
        t0 = time.perf_counter()
        bank = MemoryBank.build(model, tok, documents, window=args.window, stride=args.stride, **kw)
        dt = time.perf_counter() - t0
        if path is not None:
            bank.save(path)
        return bank, dt

    t0 = time.perf_counter()
    if args.only_buried:
        best = args.only_buried
    else:
        results["no_memory"] = accuracy(model, tok, test)
        results["in_prompt"] = accuracy(model, tok, test, context=doc)
        bank, _ = build([doc], "facts")
        results["short_mem_tokens"] = bank.mem_len
        results["short_dev"] = {k: with_memory(model, tok, bank, dev, k) for k in topks}
        best = max(topks, key=lambda k: (results["short_dev"][k], -k))
        results["short_memory"] = with_memory(model, tok, bank, test, best)
        bank8, _ = build([doc], "facts_int8", quantization="int8")
        results["short_memory_int8"] = with_memory(model, tok, bank8, test, best)
        results["int8_logit_drift"] = int8_logit_drift(model, tok, bank, bank8, test, best)
    results["topk"] = best
    results["short_seconds"] = time.perf_counter() - t0
    print(json.dumps(results), file=sys.stderr)

    if args.distractor_tokens > 0:
        # Sentences of the news items (not whole items: a few thousand tokens hold fewer items
        # than there are facts to place between them).
        lines = [x.strip() + "." for l in distractor_text().splitlines() for x in l.split(". ") if x.strip()]
        # Take whole news items until about distractor_tokens tokens, then put one fact after
        # evenly spaced items (shuffled order), so the facts are scattered through the text.
        chosen, n_tok = [], 0
        for line in lines:
            if n_tok >= args.distractor_tokens:
                break
            chosen.append(line)
            n_tok += len(tok(line, add_special_tokens=False).input_ids)
        rng = random.Random(3)
        order = facts[:]
        rng.shuffle(order)
        slots = sorted(rng.sample(range(1, len(chosen)), len(order)))
        pieces, j = [], 0
        for i, line in enumerate(chosen):
            pieces.append(line)
            while j < len(slots) and slots[j] == i + 1:
                pieces.append(fact_sentence(*order[j]))
                j += 1
        buried = "\n".join(pieces)
        bank_b, build_s = build([buried], f"buried_{args.distractor_tokens}")
        results["buried_mem_tokens"] = bank_b.mem_len
        results["buried_build_seconds"] = build_s
        t0 = time.perf_counter()
        results["buried_memory"] = with_memory(model, tok, bank_b, test, best)
        results["buried_seconds"] = time.perf_counter() - t0
        # The document in the prompt, when it fits the context (with room for the question).
        if len(tok(buried, add_special_tokens=False).input_ids) + 64 <= model.config.max_position_embeddings:
            results["buried_in_prompt"] = accuracy(model, tok, test, context=buried)
        print(json.dumps(results), file=sys.stderr)

    print("| memory | condition | test accuracy |")
    print("|---|---|---|")
    if not args.only_buried:
        print(f"| facts only ({results['short_mem_tokens']} tokens) | no memory | {results['no_memory']:.2f} |")
        print(f"| | kcore memory attention, topk={best} (dev: {results['short_dev']}) | {results['short_memory']:.2f} |")
        print(f"| | same, int8 bank | {results['short_memory_int8']:.2f} |")
        print(f"| | (int8 vs float16 bank, next-token logits: {results['int8_logit_drift']}) | |")
        print(f"| | document in the prompt | {results['in_prompt']:.2f} |")
    if args.distractor_tokens > 0:
        # Without memory the questions are the same as above: the no-memory accuracy carries over.
        print(f"| facts in {results['buried_mem_tokens']} tokens of news | kcore memory attention, topk={best} | {results['buried_memory']:.2f} |")
        in_prompt = results.get("buried_in_prompt")
        print(f"| | document in the prompt | {'n/a (exceeds the context)' if in_prompt is None else f'{in_prompt:.2f}'} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
