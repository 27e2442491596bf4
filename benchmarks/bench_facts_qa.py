"""QA over every country with a capital: SmolLM2-135M-Instruct answering freely vs with
FactLogitsProcessor, on the built-in GeoNames KB.

Conditions (greedy search, same model, same questions "What is the capital of <country>?"):

* ``plain``: the question alone in the chat template (the model's default system prompt);
* ``prompt``: kcore ask's few-shot "Fact: ... / Answer: ..." prompt, no constraint;
* ``processor``: the same prompt with :class:`kcore.hf.FactLogitsProcessor` over the KB trie.

Accuracy: the expected capital (GeoNames) appears in the answer (text after "Answer:", else the
generated text without its fact lines), compared case- and accent-insensitively. Facts: the share
of the facts the model wrote (terminated ones) that exist in the KB, judged by
:func:`kcore.hf.extract_facts`. The few-shot prompt names France, Germany and Brazil: they are
kept in the 246 questions and reported apart.

Usage: python benchmarks/bench_facts_qa.py [--limit N] [--batch 16] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import unicodedata

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def norm(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return "".join(c for c in text if not unicodedata.combining(c)).casefold()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="only the first N countries (0 = all)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--conditions", default="plain,prompt,processor")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is steadiest on a shared machine)")
    ap.add_argument("--out", default=None, help="write per-question results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LogitsProcessorList

    from kcore.cli.ask import EXAMPLES, answer_of, cached_trie, prompt_text
    from kcore.hf.facts import FactLogitsProcessor, extract_facts
    from kcore.kb import default_triples
    from kcore.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    tok.padding_side = "left"
    trie = cached_trie(tok)
    capitals = [(t.subject, t.object) for t in default_triples(cities=False) if t.relation == "capital"]
    if args.limit:
        capitals = capitals[: args.limit]
    shot_countries = {q.rsplit(" ", 1)[-1].rstrip("?") for q, _ in EXAMPLES if "capital" in q}

    def prompts(cond):
        for country, _ in capitals:
            q = f"What is the capital of {country}?"
            if cond == "plain":
                yield tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            else:
                yield prompt_text(tok, q)

    results = {}
    summary = []
    for cond in args.conditions.split(","):
        texts = list(prompts(cond))
        rows = []
        t0 = time.perf_counter()
        new_tokens = 0
        for start in range(0, len(texts), args.batch):
            chunk = texts[start : start + args.batch]
            enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            procs = LogitsProcessorList([FactLogitsProcessor(trie, tok)] if cond == "processor" else [])
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                     logits_processor=procs, pad_token_id=tok.pad_token_id)
            plen = enc["input_ids"].shape[1]
            new_tokens += int((out[:, plen:] != tok.pad_token_id).sum())
            facts = extract_facts(out, tok, trie, prompt_length=plen)
            for k, row in enumerate(out):
                country, capital = capitals[start + k]
                text = tok.decode(row[plen:], skip_special_tokens=True)
                answer = answer_of(text) if cond != "plain" else text
                written = [f for f in facts[k] if f.terminated]
                rows.append({
                    "country": country, "capital": capital, "text": text, "answer": answer,
                    "correct": norm(capital) in norm(answer),
                    "facts": [[f.text, f.found] for f in written],
                })
            print(f"{cond}: {len(rows)}/{len(texts)} done, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        seconds = time.perf_counter() - t0
        n = len(rows)
        correct = sum(r["correct"] for r in rows)
        nfacts = sum(len(r["facts"]) for r in rows)
        found = sum(f[1] for r in rows for f in r["facts"])
        rest = [r for r in rows if r["country"] not in shot_countries]
        summary.append({
            "condition": cond, "questions": n, "correct": correct, "accuracy": correct / n,
            "accuracy_without_shot_countries": sum(r["correct"] for r in rest) / max(len(rest), 1),
            "facts_written": nfacts, "facts_in_kb": found, "share_in_kb": (found / nfacts) if nfacts else None,
            "seconds": seconds, "new_tokens": new_tokens,
        })
        results[cond] = rows

    print("| condition | questions | accuracy | accuracy w/o few-shot countries | facts written | facts in KB | share in KB | time (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        share = f"{100 * s['share_in_kb']:.1f}%" if s["share_in_kb"] is not None else "n/a"
        print(f"| {s['condition']} | {s['questions']} | {100 * s['accuracy']:.1f}% ({s['correct']}) | "
              f"{100 * s['accuracy_without_shot_countries']:.1f}% | {s['facts_written']} | {s['facts_in_kb']} | {share} | {s['seconds']:.0f} |")
    if "processor" in results:
        bad = [f for r in results["processor"] for f in r["facts"] if not f[1]]
        assert not bad, f"facts written under the processor that are not in the KB: {bad[:5]}"
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
