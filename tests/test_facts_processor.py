"""FactLogitsProcessor, prefix_allowed_tokens_fn and extract_facts.

Fast tests drive the processor with a tiny tokenizer and random scores, reorder rows the way beam
search does, and compare every row's allowed set at every step with an oracle that recomputes it
from the row's tokens alone. Slow tests run real generation on SmolLM2 with the built-in KB."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from facts_helpers import FACTS, FakeTokenizer, Oracle, allowed_from_scores, make_trie
from kcore.errors import InvalidInputError, TokenizerMismatchError
from kcore.hf.facts import FactLogitsProcessor, extract_facts, prefix_allowed_tokens_fn, trigger_token_sequences


@pytest.fixture(scope="module")
def tok():
    return FakeTokenizer()


@pytest.fixture(scope="module")
def trie_and_seqs(tok, tmp_path_factory):
    return make_trie(tok, FACTS, tmp_path_factory.mktemp("trie") / "facts.ktrie")


def test_trigger_sequences_cover_every_spelling(tok):
    seqs = set(trigger_token_sequences(tok, "Fact:"))
    i = tok.ids
    assert (i["Fact"], i[":"]) in seqs
    assert (i[" Fact"], i[":"]) in seqs
    assert (i["\nFact"], i[":"]) in seqs
    assert (i["F"], i["act"], i[":"]) in seqs
    assert (i["F"], i["a"], i["c"], i["t"], i[":"]) in seqs
    assert (i["Fac"], i["t"], i[":"]) in seqs
    # "Artifact" ends with "fact" but lowercase, and the "t" of "Artifact" is inside a word anyway.
    assert not any(s[0] == i["Artifact"] for s in seqs)
    # a letter right before "F" inside the first token is not a word boundary
    tok2 = FakeTokenizer(extra=["xF"])
    assert not any(s[0] == tok2.ids["xF"] for s in trigger_token_sequences(tok2, "Fact:"))
    with pytest.raises(InvalidInputError):
        trigger_token_sequences(tok, "")


def _left_pad(prompts, pad):
    width = max(len(p) for p in prompts)
    return torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.int64)


def drive(proc, oracle, tok, prompts, *, steps, seed, beam_groups=None, extra_cols=0, dtype=torch.float32,
          neg_inf_scores=False, trigger_rate=0.3):
    """Generate ``steps`` tokens per row with random scores and a policy that often writes the
    trigger; after every processor call compare each row's allowed set with the oracle. With
    ``beam_groups`` (rows per group), each step's rows are redrawn from random parents of their
    group, as beam search reorders them. Returns the final input_ids and the prompt width."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    input_ids = _left_pad(prompts, tok.pad_token_id)
    prompt_len = input_ids.shape[1]
    batch = input_ids.shape[0]
    vocab = len(tok) + extra_cols
    triggers = trigger_token_sequences(tok, "Fact:")
    queues = [[] for _ in range(batch)]
    for _ in range(steps):
        scores = torch.randn(batch, vocab, generator=gen).to(dtype)
        if neg_inf_scores:
            scores[:] = float("-inf")
        before = scores.clone()
        out = proc(input_ids, scores)
        assert out is scores
        assert not torch.isnan(out.float()).any()
        allowed = []
        for i in range(batch):
            expected = oracle.allowed(input_ids[i].tolist(), prompt_len)
            got = allowed_from_scores(out[i])
            if expected is None:
                assert torch.equal(out[i], before[i]), f"row {i}: free-text row was modified"
                allowed.append(None)
            else:
                assert got == expected, f"row {i}: allowed {sorted(got)} != oracle {sorted(expected)}"
                kept = torch.isfinite(out[i].float())
                if not neg_inf_scores:
                    assert torch.equal(out[i][kept], before[i][kept]), "allowed scores must be untouched"
                else:
                    assert torch.all(out[i][kept] == 0)
                allowed.append(sorted(expected))
        # next tokens
        if beam_groups:
            parents = [g * beam_groups + rng.randrange(beam_groups) for g in range(batch // beam_groups) for _ in range(beam_groups)]
        else:
            parents = list(range(batch))
        tokens = []
        new_queues = []
        for i, p in enumerate(parents):
            q = list(queues[p])
            if allowed[p] is not None:
                q = []
                t = rng.choice(allowed[p])
            elif q:
                t = q.pop(0)
            elif rng.random() < trigger_rate:
                q = list(rng.choice(triggers))
                t = q.pop(0)
            else:
                t = rng.randrange(2, len(tok))
            tokens.append(t)
            new_queues.append(q)
        queues = new_queues
        input_ids = torch.cat([input_ids[parents], torch.tensor(tokens, dtype=torch.int64)[:, None]], dim=1)
    return input_ids, prompt_len


def _oracle(tok, seqs, proc):
    return Oracle(seqs, trigger_token_sequences(tok, "Fact:"), proc.terminator_ids, proc.avoid_duplicates)


@pytest.mark.parametrize("avoid_duplicates", [True, False])
def test_sampling_batch_left_padding_matches_oracle(tok, trie_and_seqs, avoid_duplicates):
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok, avoid_duplicates=avoid_duplicates)
    prompts = [tok.encode("Question: Japan?"), tok.encode("Q"), tok.encode("Fact: France capital Paris .\nFact:")]
    ids, plen = drive(proc, _oracle(tok, seqs, proc), tok, prompts, steps=120, seed=1)
    facts = extract_facts(ids, tok, trie, prompt_length=plen)
    written = [f for row in facts for f in row if f.terminated]
    assert len(written) > 10
    assert all(f.found for f in written)


def test_beam_reordering_follows_each_rows_own_tokens(tok, trie_and_seqs):
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    prompts = [tok.encode("Japan?")] * 4 + [tok.encode("France, Spain?")] * 4
    ids, plen = drive(proc, _oracle(tok, seqs, proc), tok, prompts, steps=150, seed=2, beam_groups=4, trigger_rate=0.5)
    written = [f for row in extract_facts(ids, tok, trie, prompt_length=plen) for f in row if f.terminated]
    assert len(written) > 10 and all(f.found for f in written)


def test_duplicate_rows_and_restart(tok, trie_and_seqs):
    """num_return_sequences-style identical rows, then a new generation of another batch size."""
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    oracle = _oracle(tok, seqs, proc)
    drive(proc, oracle, tok, [tok.encode("Fact:")] * 3, steps=40, seed=3)
    drive(proc, oracle, tok, [tok.encode("Hi")] * 2, steps=40, seed=4)


def test_dead_end_forces_terminator(tok, tmp_path):
    trie, seqs = make_trie(tok, ["Japan capital Tokyo ."], tmp_path / "one.ktrie")
    proc = FactLogitsProcessor(trie, tok)
    nl = tok.ids["\n"]
    text = "Fact: Japan capital Tokyo .\nFact:"
    ids = torch.tensor([tok.encode(text)])
    # first call: the prompt's fact does not count as written
    scores = torch.zeros(1, len(tok))
    proc(ids, scores)
    assert allowed_from_scores(scores[0]) == {tok.ids[" Japan"]}
    # generate the fact, then the trigger again: every fact is written, only "\n" is left
    for t in tok.encode(" Japan capital Tokyo .") + [nl] + tok.encode("Fact:"):
        ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
        scores = torch.zeros(1, len(tok))
        proc(ids, scores)
    assert allowed_from_scores(scores[0]) == {nl}
    ids = torch.cat([ids, torch.tensor([[nl]])], dim=1)
    scores = torch.zeros(1, len(tok))
    proc(ids, scores)
    assert torch.all(scores == 0), "free text again after the forced terminator"


def test_complete_fact_that_is_a_prefix_allows_both(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    ids = torch.tensor([tok.encode("Fact: New York population 8")])
    scores = torch.zeros(1, len(tok))
    proc(ids, scores)
    assert allowed_from_scores(scores[0]) == {tok.ids[" ."]}
    ids = torch.tensor([tok.encode("Fact: New York population 8 .")])
    proc.reset()
    scores = torch.zeros(1, len(tok))
    proc(ids, scores)
    assert allowed_from_scores(scores[0]) == {tok.ids["\n"], tok.ids[" "]}


def test_all_allowed_scores_neg_inf_become_zero(tok, trie_and_seqs):
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    drive(proc, _oracle(tok, seqs, proc), tok, [tok.encode("Fact:"), tok.encode("x")], steps=30, seed=5, neg_inf_scores=True, trigger_rate=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_padded_logits_and_dtypes(tok, trie_and_seqs, dtype):
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    drive(proc, _oracle(tok, seqs, proc), tok, [tok.encode("Fact:"), tok.encode("Hello")], steps=40, seed=6, extra_cols=37, dtype=dtype)


def test_multi_token_terminator(tok, trie_and_seqs):
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok, terminator=";;")
    assert len(proc.terminator_ids) == 2
    drive(proc, _oracle(tok, seqs, proc), tok, [tok.encode("Fact:"), tok.encode("a")], steps=60, seed=7)


def test_non_contiguous_rows_and_strided_scores(tok, trie_and_seqs):
    trie, seqs = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    ids = torch.tensor([tok.encode("Fact: Japan"), tok.encode("Fact: Spain")])
    big = torch.zeros(2, 2 * len(tok))
    scores = big[:, : len(tok) + 5]  # rows strided by 2 * vocab
    proc(ids, scores)
    assert allowed_from_scores(scores[0]) == {tok.ids[" capital"], tok.ids[" language"], tok.ids[" population"]}
    assert allowed_from_scores(scores[1]) == {tok.ids[" capital"]}
    assert torch.all(big[:, len(tok) + 5:] == 0), "columns outside the view untouched"


@pytest.mark.parametrize("avoid_duplicates", [True, False])
def test_host_and_device_mask_paths_agree_with_oracle(tok, trie_and_seqs, avoid_duplicates):
    """The one native masking call for host logits and the torch path used for logits on another
    device mask identically, under beam re-ordering."""
    trie, seqs = trie_and_seqs
    native_path = FactLogitsProcessor(trie, tok, avoid_duplicates=avoid_duplicates)
    torch_path = FactLogitsProcessor(trie, tok, avoid_duplicates=avoid_duplicates)
    torch_path._host_apply = False

    class Both:
        """Runs both processors on the same inputs and checks they mask identically."""

        avoid_duplicates = native_path.avoid_duplicates
        terminator_ids = native_path.terminator_ids

        def __call__(self, input_ids, scores):
            other = torch_path(input_ids, scores.clone())
            out = native_path(input_ids, scores)
            assert torch.equal(out, other)
            return out

    prompts = [tok.encode("Fact:")] * 2 + [tok.encode("Hello Fact: Japan")] * 2
    drive(Both(), _oracle(tok, seqs, native_path), tok, prompts, steps=80, seed=11, beam_groups=2, trigger_rate=0.5)


def test_native_mask_call_rejects_bad_arrays(tok, trie_and_seqs):
    from kcore._native import native, tensor_arg

    apply = native().apply_token_bitmask_keep_finite_cpu
    words = (len(tok) + 31) // 32
    scores = torch.zeros(2, len(tok))
    scores[1] = float("-inf")  # row 1: another processor banned everything
    bitmask = torch.zeros(2, words, dtype=torch.int32)
    bitmask[:, 0] = 0b1100  # tokens 2 and 3 allowed
    apply(tensor_arg(scores), tensor_arg(bitmask), None)
    assert allowed_from_scores(scores[0]) == {2, 3} and torch.all(scores[0, 2:4] == 0)
    assert allowed_from_scores(scores[1]) == {2, 3} and torch.all(scores[1, 2:4] == 0), "kept finite"
    with pytest.raises(InvalidInputError, match="logits must have dtype"):
        apply(tensor_arg(scores.to(torch.int32)), tensor_arg(bitmask), None)
    with pytest.raises(InvalidInputError, match="bitmask must have dtype"):
        apply(tensor_arg(scores), tensor_arg(bitmask.long()), None)
    with pytest.raises(InvalidInputError):
        apply(tensor_arg(scores), tensor_arg(torch.zeros(2, words - 1, dtype=torch.int32)), None)
    with pytest.raises(InvalidInputError):
        apply(tensor_arg(scores), tensor_arg(bitmask), tensor_arg(torch.tensor([5])))


def test_prefix_allowed_tokens_fn_matches_processor(tok, trie_and_seqs):
    trie, seqs = trie_and_seqs
    fn = prefix_allowed_tokens_fn(trie, tok)
    proc = FactLogitsProcessor(trie, tok)
    oracle = _oracle(tok, seqs, proc)
    ids, plen = drive(proc, oracle, tok, [tok.encode("Fact:"), tok.encode("Say")], steps=50, seed=8)
    # replay every prefix of the final rows through the function, in generation order
    for end in range(plen, ids.shape[1] + 1):
        for b in range(ids.shape[0]):
            row = ids[b, :end]
            expected = oracle.allowed(row.tolist(), plen)
            got = fn(b, row)
            if expected is None:
                assert got == list(range(len(tok)))
            else:
                assert set(got) == expected


def test_extract_facts_found_and_not_found(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    text = "Fact: Japan capital Tokyo .\nFact: Japan capital Paris .\nFact: France capital Paris.\nok"
    ids = tok.encode(text)
    (facts,) = extract_facts([ids], tok, trie)
    assert [(f.text, f.found) for f in facts] == [
        ("Japan capital Tokyo .", True),
        ("Japan capital Paris .", False),
        ("France capital Paris.", True),  # judged by its text: "Paris." normalized to "Paris ."
    ]
    # prompt facts are skipped with prompt_length; a fact cut by end of sequence counts
    (facts,) = extract_facts([ids + tok.encode("Fact: Spain capital Madrid .")], tok, trie, prompt_length=len(ids))
    assert [(f.text, f.found) for f in facts] == [("Spain capital Madrid .", True)]


def test_bad_inputs(tok, trie_and_seqs):
    trie, _ = trie_and_seqs
    proc = FactLogitsProcessor(trie, tok)
    with pytest.raises(InvalidInputError, match="scores"):
        proc(torch.tensor([[3, 4]]), torch.zeros(1, len(tok) - 1))
    with pytest.raises(InvalidInputError):
        proc(torch.tensor([3, 4]), torch.zeros(1, len(tok)))
    with pytest.raises(InvalidInputError, match="terminator"):
        FactLogitsProcessor(trie, tok, terminator="")

    class Other(FakeTokenizer):
        pass

    class Fingerprinted:
        def __init__(self, inner):
            self._inner = inner
            self.tokenizer_fingerprint = "0" * 64

        def __getattr__(self, name):
            return getattr(self._inner, name)

    with pytest.raises(TokenizerMismatchError):
        FactLogitsProcessor(Fingerprinted(trie), Other())


# ---------------------------------------------------------------------------- real model (slow)
# Kept short: the prompt's few-shot examples make it ~260 tokens, so each row's prefill costs more
# than the decode steps; rows and new tokens are as few as the checks need (a fact line is about 8
# tokens).

QUESTIONS = ["What is the capital of Japan?", "Which languages are spoken in Switzerland?", "Kenya is a country in Africa. What is the capital of Kenya?"]


@pytest.fixture(scope="module")
def geo_trie(smollm2, tmp_path_factory):
    """The built-in KB's countries plus the cities above one million, for SmolLM2's tokenizer."""
    import kcore
    from kcore.kb import default_facts

    _, tokenizer = smollm2
    facts = default_facts(cities=False) + default_facts(countries=False, min_city_population=1_000_000)
    return kcore.FactTrie.from_facts(facts, tokenizer, tmp_path_factory.mktemp("geo") / "geo.ktrie", progress=False)


def _generate(smollm2, trie, questions, **gen):
    from transformers import LogitsProcessorList

    from kcore.cli.ask import prompt_text

    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    enc = tokenizer([prompt_text(tokenizer, q) for q in questions], return_tensors="pt", padding=True, add_special_tokens=False)
    proc = FactLogitsProcessor(trie, tokenizer)
    with torch.no_grad():
        out = model.generate(**enc, logits_processor=LogitsProcessorList([proc]), pad_token_id=tokenizer.pad_token_id, **gen)
    plen = enc["input_ids"].shape[1]
    facts = extract_facts(out, tokenizer, trie, prompt_length=plen)
    return out, plen, facts


def _check_all_found(trie, facts, min_facts):
    written = [f for row in facts for f in row if f.terminated]
    assert len(written) >= min_facts
    for f in written:
        assert f.found, f"fact not in the KB: {f.text!r}"
        assert trie.contains(list(f.token_ids)), "the generated token ids themselves are a fact of the trie"


@pytest.mark.slow
def test_smollm2_greedy_batch_left_padding(smollm2, geo_trie):
    _, tokenizer = smollm2
    # Japan (257 prompt tokens) and Kenya (265): left padded.
    out, plen, facts = _generate(smollm2, geo_trie, [QUESTIONS[0], QUESTIONS[2]], max_new_tokens=12, do_sample=False)
    _check_all_found(geo_trie, facts, min_facts=2)
    texts = [f.text for row in facts for f in row]
    assert "Japan capital Tokyo ." in texts and "Kenya capital Nairobi ." in texts
    # the prompts differ in length: left padding was used
    assert (out[:, 0] == tokenizer.pad_token_id).any()


@pytest.mark.slow
def test_smollm2_sampling_num_return_sequences(smollm2, geo_trie):
    torch.manual_seed(0)
    _, _, facts = _generate(smollm2, geo_trie, QUESTIONS[1:2], max_new_tokens=16, do_sample=True, temperature=1.3,
                            top_k=0, num_return_sequences=2)
    assert len(facts) == 2
    _check_all_found(geo_trie, facts, min_facts=2)


@pytest.mark.slow
def test_smollm2_beam_search(smollm2, geo_trie):
    _, _, facts = _generate(smollm2, geo_trie, QUESTIONS[:1], max_new_tokens=12, num_beams=3, num_return_sequences=2,
                            do_sample=False)
    assert len(facts) == 2
    _check_all_found(geo_trie, facts, min_facts=2)


@pytest.mark.slow
def test_smollm2_dead_end_every_fact_written(smollm2, tmp_path):
    """A KB of two facts: the model writes each once, then every further fact is a dead end that
    the terminator closes at once."""
    import kcore

    model, tokenizer = smollm2
    trie = kcore.FactTrie.from_facts(["Japan capital Tokyo .", "Japan currency Yen ."], tokenizer, tmp_path / "two.ktrie", progress=False)
    out, plen, facts = _generate(smollm2, trie, ["Write every fact you know about Japan."], max_new_tokens=28, do_sample=False)
    written = [f.text for f in facts[0] if f.terminated]
    # after the last fact, a new "Fact:" can only be closed by the terminator
    assert "Fact:\n" in tokenizer.decode(out[0, plen:])
    assert written and set(written) <= {"Japan capital Tokyo .", "Japan currency Yen ."}
    assert len(written) == len(set(written)), "no fact written twice"
