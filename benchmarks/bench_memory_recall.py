"""Counterfactual recall with kcore memory attention on SmolLM2-135M-Instruct.

Invented facts (invented countries with invented capitals: the model has no prior about them,
and SmolLM2-135M does not override a real country's known capital even with the document in its
prompt) are written into memory documents, "The capital of <country> is <capital>." one per line;
the model is then asked for each capital (chat template, answer prefilled with "The capital of X
is") and an answer counts when the whole invented capital appears, as a word, in the first 12
generated tokens. The invented names are deterministic, at most 3 tokens, and no two share their
first token (names that do are confused even with the document in the prompt).

As in Extended Mind Transformers' counterfactual benchmark, each question is asked with the
document that holds its fact (one document per question, not one memory for the whole test). The
number of facts per document is swept (1, 2, 5, 10, 20 of the 20 facts), because SmolLM2-135M's
associative recall collapses beyond a few invented pairs even with the document in its prompt.
Facts alternate between a dev half (topk chosen there, per row) and a test half (reported).
Conditions per row:

* no memory (the model's prior; invented names, so about 0);
* kcore memory attention over a bank of the question's document, and the same with an int8 bank;
* the document placed in the prompt.

Then the facts buried in real distractor text (news items of lee_background.cor from the gensim
wheel's test data, one memory document per item): each question's bank is the distractor bank
(built once) concatenated with the bank of its one-fact document (MemoryBank.concatenate; memory
keys carry no position, so where the fact document sits among the others does not matter), at
sizes that fit SmolLM2's 8k context, where the same documents also go in the prompt (fact document
at a random place among the news items), and at 50k tokens, which do not fit.

Usage: python benchmarks/bench_memory_recall.py [--distractor-tokens 7000,50000] [--out FILE]
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


def correct(answer, capital):
    # Whole name, case-insensitive, as a word (12 new tokens leave room for a 3-token name).
    return re.search(rf"\b{re.escape(capital)}\b", answer, re.I) is not None


def accuracy(model, tok, facts, *, contexts=None, banks=None, topk=None):
    """Share of ``facts`` answered right; question i gets ``contexts[i]`` in its prompt and/or
    memory attention over ``banks[i]`` with ``topk``."""
    return accuracies(model, tok, facts, contexts=contexts, banks=banks, topks=[topk])[topk]


def accuracies(model, tok, facts, *, contexts=None, banks=None, topks=(None,)):
    """``{topk: accuracy}``. Questions outer, topks inner, so that ``banks[i]`` is read once per
    question (``banks`` may build each bank on demand: a 50k-token bank is 1.2 GB)."""
    hits = dict.fromkeys(topks, 0)
    for i, (country, capital) in enumerate(facts):
        context = None if contexts is None else contexts[i]
        if banks is None:
            hits[None] += correct(ask(model, tok, country, context=context), capital)
            continue
        bank = banks[i]
        for k in topks:
            with enable_memory_attention(model, bank, topk=k, record_citations=False):
                hits[k] += correct(ask(model, tok, country, context=context), capital)
    return {k: h / len(facts) for k, h in hits.items()}


def choose_topk(model, tok, dev, dev_banks, topks):
    """Dev accuracy per topk and the best topk (ties: the smaller)."""
    dev_acc = accuracies(model, tok, dev, banks=dev_banks, topks=topks)
    return dev_acc, max(topks, key=lambda k: (dev_acc[k], -k))


class Concatenated:
    """``[i] -> MemoryBank.concatenate([head, tails[i]])``, built when asked (keeping them all
    would hold one copy of ``head`` per question)."""

    def __init__(self, head, tails):
        self.head, self.tails = head, tails

    def __getitem__(self, i):
        return MemoryBank.concatenate([self.head, self.tails[i]])


def int8_logit_drift(model, tok, facts, banks, banks8, topk):
    """Next-token logits after each question with the float bank vs the int8 bank: max and mean
    absolute difference, and how often the top-1 token agrees."""
    diffs, agree = [], 0
    for i, (country, _) in enumerate(facts):
        msgs = [{"role": "user", "content": f"What is the capital of {country}?"}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + f"The capital of {country} is"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        logits = []
        for b in (banks[i], banks8[i]):
            with torch.no_grad(), enable_memory_attention(model, b, topk=topk, record_citations=False):
                logits.append(model(**ids).logits[0, -1])
        diffs.append((logits[0] - logits[1]).abs())
        agree += int(logits[0].argmax() == logits[1].argmax())
    d = torch.stack(diffs)
    return {"max_abs": round(d.max().item(), 3), "mean_abs": round(d.mean().item(), 3), "top1_agree": agree / len(facts)}


def answer_retrieval(model, tok, facts, banks, topk):
    """Why memory attention does or does not answer: at the last prompt position (the query that
    must produce the capital), the share of (layer, query head) pairs whose top-k memories
    include a token of the capital. The capital is the last word of the bank's last document
    (the question's fact), so its tokens are found from the token map, not by matching text."""
    shares = []
    for i, (country, capital) in enumerate(facts):
        bank = banks[i]
        last = len(bank.documents) - 1
        doc = bank.documents[last]
        lo = doc.rindex(capital)
        m = bank.token_map
        wanted = torch.nonzero((m[:, 0] == last) & (m[:, 2] > lo) & (m[:, 1] < lo + len(capital))).flatten()
        msgs = [{"role": "user", "content": f"What is the capital of {country}?"}]
        prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + f"The capital of {country} is"
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad(), enable_memory_attention(model, bank, topk=topk) as h:
            model(**ids)
            # The handle's record of the chosen indices at the last position, per layer:
            # (batch, num_q_heads, topk) (what citations() aggregates).
            idx = torch.stack([h._steps[-1][layer][0][0] for layer in sorted(h._steps[-1])])
        shares.append(torch.isin(idx, wanted).any(-1).float().mean().item())
    return round(sum(shares) / len(shares), 3)


def news_items(tok, n_tokens):
    """Whole news items, in corpus order, until about ``n_tokens`` tokens."""
    items, n = [], 0
    for line in distractor_text().splitlines():
        if n >= n_tokens:
            break
        if line.strip():
            items.append(line.strip())
            n += len(tok(items[-1], add_special_tokens=False).input_ids)
    if n < n_tokens:
        raise SystemExit(f"the distractor corpus has only {n} tokens (< {n_tokens})")
    return items


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--facts", type=int, default=20, help="invented facts (alternately dev and test)")
    p.add_argument("--facts-per-doc", default="1,2,5,10,20", help="facts per memory document, one table row each (empty: skip)")
    p.add_argument("--topks", default="2,4,8,16")
    p.add_argument("--distractor-tokens", default="7000,50000",
                   help="sizes of the distractor memory, comma-separated (empty to skip the buried part)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--bank-cache", default="", help="folder to keep the distractor banks in")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", default="", help="also write the results as JSON here")
    args = p.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_model_and_tokenizer()
    countries = invented_countries(args.facts, tok)
    facts = list(zip(countries, invented_capitals(args.facts, tok, countries)))
    dev_idx, test_idx = list(range(0, len(facts), 2)), list(range(1, len(facts), 2))
    dev, test = [facts[i] for i in dev_idx], [facts[i] for i in test_idx]
    topks = [int(x) for x in args.topks.split(",")]
    bank_kw = dict(window=args.window, stride=args.stride, progress=False)
    results = {"model": model.config.name_or_path, "facts": len(facts), "dev": len(dev), "test": len(test),
               "window": args.window, "stride": args.stride, "topks": topks, "rows": [], "buried": []}
    t_all = time.perf_counter()
    results["no_memory"] = accuracy(model, tok, test)

    single_banks = None
    for n in [int(x) for x in args.facts_per_doc.split(",") if x.strip()]:
        t0 = time.perf_counter()
        docs = ["\n".join(fact_sentence(*f) for f in facts[i : i + n]) for i in range(0, len(facts), n)]
        banks = [MemoryBank.build(model, tok, [d], **bank_kw) for d in docs]
        banks8 = [MemoryBank.build(model, tok, [d], quantization="int8", **bank_kw) for d in docs]
        if n == 1:
            single_banks = banks
        doc_of = [i // n for i in range(len(facts))]
        dev_acc, best = choose_topk(model, tok, dev, [banks[doc_of[i]] for i in dev_idx], topks)
        t_banks = [banks[doc_of[i]] for i in test_idx]
        t_banks8 = [banks8[doc_of[i]] for i in test_idx]
        row = {
            "facts_per_doc": n,
            "doc_tokens": max(b.mem_len for b in banks),
            "dev": dev_acc,
            "topk": best,
            "memory": accuracy(model, tok, test, banks=t_banks, topk=best),
            "memory_int8": accuracy(model, tok, test, banks=t_banks8, topk=best),
            "int8_logit_drift": int8_logit_drift(model, tok, test, t_banks, t_banks8, best),
            "answer_retrieved": answer_retrieval(model, tok, test, t_banks, best) if n == 1 else None,
            "in_prompt": accuracy(model, tok, test, contexts=[docs[doc_of[i]] for i in test_idx]),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        results["rows"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    sizes = [int(x) for x in args.distractor_tokens.split(",") if x.strip()]
    if sizes and single_banks is None:
        single_banks = [MemoryBank.build(model, tok, [fact_sentence(*f)], **bank_kw) for f in facts]
    for size in sizes:
        items = news_items(tok, size)
        path = Path(args.bank_cache) / f"news_{size}_w{args.window}_s{args.stride}.safetensors" if args.bank_cache else None
        t0 = time.perf_counter()
        news = MemoryBank.load(path, tokenizer=tok, model=model) if path is not None and path.exists() else None
        if news is not None and (news.window, news.stride, news.sink_token) == (args.window, args.stride, single_banks[0].sink_token):
            build_s = None
        else:
            news = MemoryBank.build(model, tok, items, **bank_kw)
            build_s = round(time.perf_counter() - t0, 1)
            if path is not None:
                news.save(path)
        t0 = time.perf_counter()
        # Memory keys carry no position (rope="none"), so the fact document goes last.
        dev_acc, best = choose_topk(model, tok, dev, Concatenated(news, [single_banks[i] for i in dev_idx]), topks)
        test_banks = Concatenated(news, [single_banks[i] for i in test_idx])
        row = {"distractor_tokens": news.mem_len, "documents": len(items) + 1, "build_seconds": build_s,
               "build_tokens_per_s": round(news.mem_len / build_s) if build_s else None,
               "dev": dev_acc, "topk": best,
               "memory": accuracy(model, tok, test, banks=test_banks, topk=best),
               "answer_retrieved": answer_retrieval(model, tok, test, test_banks, best)}
        n_prompt = news.mem_len + 64 + max(b.mem_len for b in single_banks)
        if n_prompt <= model.config.max_position_embeddings:
            rng = random.Random(3)
            contexts = []
            for i in test_idx:
                docs = items[:]
                docs.insert(rng.randrange(len(docs) + 1), fact_sentence(*facts[i]))
                contexts.append("\n".join(docs))
            row["in_prompt"] = accuracy(model, tok, test, contexts=contexts)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["buried"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    results["seconds"] = round(time.perf_counter() - t_all, 1)

    print(f"no memory (test, {len(test)} questions): {results['no_memory']:.2f}")
    if results["rows"]:
        print("| facts per document | document tokens | dev accuracy by topk | topk | memory attention | int8 bank | document in the prompt |")
        print("|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        dev_s = " / ".join(f"{r['dev'][k]:.1f}" for k in topks)
        print(f"| {r['facts_per_doc']} | {r['doc_tokens']} | {dev_s} | {r['topk']} | {r['memory']:.2f} | {r['memory_int8']:.2f} | {r['in_prompt']:.2f} |")
    if results["rows"] and results["rows"][0]["answer_retrieved"] is not None:
        print(f"heads retrieving the answer, one fact per document, no distractors: {results['rows'][0]['answer_retrieved']:.2f}")
    if results["buried"]:
        print("| distractor tokens | dev accuracy by topk | topk | memory attention | heads retrieving the answer | document in the prompt |")
        print("|---|---|---|---|---|---|")
        for r in results["buried"]:
            dev_s = " / ".join(f"{r['dev'][k]:.1f}" for k in topks)
            ip = f"{r['in_prompt']:.2f}" if "in_prompt" in r else "n/a (exceeds the 8k context)"
            print(f"| {r['distractor_tokens']} | {dev_s} | {r['topk']} | {r['memory']:.2f} | {r['answer_retrieved']:.2f} | {ip} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
