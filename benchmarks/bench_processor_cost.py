"""Cost per generation step of FactLogitsProcessor vs HF's PrefixConstrainedLogitsProcessor over
a dict trie (the GENRE / ReFactX way), measured inside real generation on SmolLM2-135M-Instruct
(CPU) with the built-in GeoNames KB (106k facts), at batch 1, 8 and 64.

Three greedy generations per batch size, each with one contender as the only logits processor
(so each runs right after the model's forward pass, as in real use):

* ``hf``: ``transformers.PrefixConstrainedLogitsProcessor`` with a prefix function that finds the
  row's last trigger and walks a nested-dict trie of the facts' token ids (free text: every id);
* ``kcore``: :class:`kcore.hf.FactLogitsProcessor` with ``avoid_duplicates=False``, the same
  constraint as ``hf``: during the ``hf`` run its mask is computed on the same inputs (untimed)
  and asserted equal at every step and row, and the two runs must produce the same tokens;
* ``kcore dedup``: the default ``avoid_duplicates=True``.

Reported per step (median and mean over the decode steps):
each processor's whole ``__call__``; for ``kcore`` also the time inside its one native call
``kcore._C.fact_step`` ("native step": advance states + fill + terminator bits + apply); the
model's step time (median time between two processor calls, i.e. forward pass + HF's own step
work). Prefill is excluded.

Usage: python benchmarks/bench_processor_cost.py [--batches 1,8,64] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

END = -1


def build_dict_trie(seqs):
    root: dict = {}
    for seq in seqs:
        node = root
        for t in seq:
            node = node.setdefault(t, {})
        node[END] = True
    return root


def hf_prefix_fn(dict_trie, trigger_seqs, term: int, vocab: int, lookback: int):
    """GENRE-style prefix function: the row's latest trigger, then a dict-trie walk."""
    everything = list(range(vocab))
    by_last = {}
    for s in trigger_seqs:
        by_last.setdefault(s[-1], []).append(list(s))

    def fn(batch_id, sent):
        toks = sent.tolist()
        n = len(toks)
        for p in range(n, max(n - lookback, 0), -1):
            cands = by_last.get(toks[p - 1])
            if cands and any(toks[p - len(s):p] == s for s in cands):
                break
        else:
            return everything
        node = dict_trie
        for t in toks[p:]:
            if t == term and END in node:
                return everything  # the fact ended: free text
            node = node.get(t)
            if node is None:
                return everything
        allowed = [t for t in node if t != END]
        if END in node:
            allowed.append(term)
        return allowed or [term]

    return fn


class Timer:
    def __init__(self):
        self.ns = 0

    def wrap(self, fn):
        def timed(*a, **k):
            t = time.perf_counter_ns()
            try:
                return fn(*a, **k)
            finally:
                self.ns += time.perf_counter_ns() - t

        return timed


class Timed:
    """The one logits processor given to generate(): times ``proc`` (first after the forward pass,
    its place in real generation), records the gap between calls (model step) and, untimed, the
    rows inside a fact; with ``check``, also asserts that ``check`` allows exactly the same tokens."""

    def __init__(self, proc, fill_apply: Timer, tracker_proc=None, check=None):
        self.proc, self.fill_apply, self.tracker_proc, self.check = proc, fill_apply, tracker_proc, check
        self.rows = []  # per step: (call ns, fill+apply ns, rows in a fact)
        self.gaps = []
        self.last_end = None
        self.mismatches = 0

    def __call__(self, input_ids, scores):
        start = time.perf_counter_ns()
        if self.last_end is not None:
            self.gaps.append(start - self.last_end)
        before = scores.clone() if self.check is not None else None
        self.fill_apply.ns = 0
        t0 = time.perf_counter_ns()
        out = self.proc(input_ids, scores)
        t1 = time.perf_counter_ns()
        fa = self.fill_apply.ns
        if self.check is not None:
            self.check(input_ids, before)
            a = torch.isfinite(out[:, : before.shape[1]])
            b = torch.isfinite(before)
            free_rows = b.all(dim=1)
            a[free_rows] = True  # hf masks ids >= len(tokenizer) in free rows too (none here)
            self.mismatches += int((a != b).any(dim=1).sum())
        nodes = (self.tracker_proc or self.proc)._nodes
        self.rows.append((t1 - t0, fa, sum(nd.mode != 0 for nd in nodes)))
        self.last_end = time.perf_counter_ns()
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import LogitsProcessorList, PrefixConstrainedLogitsProcessor

    from kcore.cli.ask import cached_trie, prompt_text
    from kcore.hf.facts import FactLogitsProcessor, trigger_token_sequences
    from kcore.kb import default_facts, default_triples
    from kcore.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer()
    tok.padding_side = "left"
    trie = cached_trie(tok)
    facts = default_facts()
    seqs = tok([" " + f for f in facts], add_special_tokens=False)["input_ids"]
    dict_trie = build_dict_trie(seqs)
    term = tok("\n", add_special_tokens=False)["input_ids"]
    assert len(term) == 1
    max_len = max(len(s) for s in seqs)
    trig = trigger_token_sequences(tok, "Fact:")
    countries = [t.subject for t in default_triples(cities=False) if t.relation == "capital"]

    fill_apply = Timer()  # time inside kcore's native step call

    print(f"# SmolLM2-135M-Instruct, CPU, torch threads {args.threads}, KB {trie.num_facts} facts, "
          f"{args.new_tokens} new tokens, greedy")
    print("Per-step processor times in us: median (mean). Steps: all decode steps, those with at least one row in a "
          "fact ('fact'), and those with every row in free text ('free').")
    print()
    print("| batch | steps | n | rows in a fact | model step (ms) | HF prefix fn (us) | kcore (us) | "
          "kcore native step (us) | kcore dedup (us) | HF / kcore | kcore / model step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for batch in [int(b) for b in args.batches.split(",")]:
        questions = [f"What is the capital of {countries[i % len(countries)]}?" for i in range(batch)]
        enc = tok([prompt_text(tok, q) for q in questions], return_tensors="pt", padding=True, add_special_tokens=False)

        def run(timed):
            with torch.no_grad():
                return model.generate(**enc, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                      do_sample=False, logits_processor=LogitsProcessorList([timed]),
                                      pad_token_id=tok.pad_token_id)

        # HF alone (timed), with kcore's mask computed on the same inputs afterwards (untimed) and
        # asserted equal; then kcore alone and kcore with dedup alone. Greedy search with equal
        # masks gives the three runs the same token streams.
        hf_fn = hf_prefix_fn(dict_trie, trig, term[0], len(tok), max_len + 8)
        ref = FactLogitsProcessor(trie, tok, avoid_duplicates=False)
        t_hf = Timed(PrefixConstrainedLogitsProcessor(hf_fn, num_beams=1), fill_apply, tracker_proc=ref, check=ref)
        out_hf = run(t_hf)
        assert t_hf.mismatches == 0, f"batch {batch}: kcore and HF masks differ in {t_hf.mismatches} row-steps"
        kc = FactLogitsProcessor(trie, tok, avoid_duplicates=False)
        kc._fact_step = fill_apply.wrap(kc._fact_step)
        t_kc = Timed(kc, fill_apply)
        out_kc = run(t_kc)
        assert torch.equal(out_hf, out_kc), "same constraint, same greedy tokens"
        kd = FactLogitsProcessor(trie, tok, avoid_duplicates=True)
        kd._fact_step = fill_apply.wrap(kd._fact_step)
        t_kd = Timed(kd, fill_apply)
        run(t_kd)
        model_ms = statistics.median(t_kc.gaps) / 1e6
        # the first call follows prefill (and scans the prompts): excluded
        steps = list(zip(t_hf.rows[1:], t_kc.rows[1:], t_kd.rows[1:]))
        for kind, sel in (("all", steps), ("fact", [r for r in steps if r[1][2] > 0]), ("free", [r for r in steps if r[1][2] == 0])):
            if not sel:
                continue
            cols = [[r[0][0] for r in sel], [r[1][0] for r in sel], [r[1][1] for r in sel], [r[2][0] for r in sel]]
            med = [statistics.median(c) / 1e3 for c in cols]
            mean = [np.mean(c) / 1e3 for c in cols]
            cons = np.mean([r[1][2] for r in sel])
            print(f"| {batch} | {kind} | {len(sel)} | {cons:.1f} | {model_ms:.1f} | {med[0]:.0f} ({mean[0]:.0f}) | "
                  f"{med[1]:.0f} ({mean[1]:.0f}) | {med[2]:.0f} ({mean[2]:.0f}) | {med[3]:.0f} ({mean[3]:.0f}) | "
                  f"{med[0] / med[1]:.1f}x | {100 * med[1] / 1e3 / model_ms:.2f}% |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
