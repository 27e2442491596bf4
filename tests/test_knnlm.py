import math

import pytest
import torch

from datastore_helpers import corpus, tiny_llama, tiny_tokenizer
from kcore.errors import InvalidInputError
from kcore.hf import KNNLMLogitsProcessor, MLPMemoryLogitsProcessor
from kcore.memory import Datastore, MLPMemory


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok)), tok


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    model, tok = tiny
    return Datastore.build(model, tok, corpus(16, seed=1), tmp_path_factory.mktemp("k") / "ds", batch_size=4,
                           max_length=32, progress=False)


@pytest.fixture()
def prompt(tiny):
    _, tok = tiny
    return torch.tensor([tok("the cat sat on")["input_ids"], tok("police said the dog")["input_ids"][:4]])


def _mlp_input(model, input_ids):
    """The last layer's MLP input at the last position, read by an independent pre-hook on the MLP."""
    seen = {}
    h = model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            logits = model(input_ids).logits[:, -1]
    finally:
        h.remove()
    return seen["x"][:, -1].float(), logits


def _reference(store, query, logits, k, lmbda, T):
    """Brute-force kNN-LM: fp32 distances to every key, k smallest, softmax(-d/T) per token."""
    d = ((store.keys.float()[None] - query[:, None]) ** 2).sum(-1)
    top_d, top_i = d.topk(min(k, store.count), dim=1, largest=False)
    w = torch.softmax(-top_d.double() / T, dim=1)
    p_knn = torch.zeros(logits.shape, dtype=torch.float64).scatter_add_(1, store.values[top_i].long(), w)
    p = (1 - lmbda) * torch.softmax(logits.double(), -1) + lmbda * p_knn
    return p.log()


@pytest.mark.parametrize("lmbda,T,k", [(0.25, 1.0, 8), (0.5, 20.0, 64), (1.0, 5.0, 3)])
def test_processor_equals_reference_formula(tiny, store, prompt, lmbda, T, k):
    model, _ = tiny
    query, logits = _mlp_input(model, prompt)
    proc = KNNLMLogitsProcessor(model, store, k=k, lmbda=lmbda, temperature=T)
    try:
        with torch.no_grad():
            model(prompt)  # the step's forward: the hook captures the key state
        out = proc(prompt, logits.clone())
    finally:
        proc.remove()
    ref = _reference(store, query, logits, k, lmbda, T)
    assert out.shape == logits.shape and out.dtype == torch.float32
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out))
    # fp16 keys: both sides use the same stored keys, the distances differ only by fp32 rounding.
    torch.testing.assert_close(out[finite].double(), ref[finite], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(2), atol=1e-4, rtol=0)


def test_lmbda_zero_generation_equals_plain(tiny, store, prompt):
    model, tok = tiny
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1)
    proc = KNNLMLogitsProcessor(model, store, k=16, lmbda=0.0, temperature=1.0)
    try:
        mixed = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=1, logits_processor=[proc])
    finally:
        proc.remove()
    assert torch.equal(plain, mixed)
    assert proc.total_rows == 2 * 8 and proc.skipped_share == 0.0


def test_greedy_follows_mixed_distribution(tiny, store, prompt):
    model, _ = tiny
    query, logits = _mlp_input(model, prompt)
    ref = _reference(store, query, logits, 16, 0.9, 2.0)
    proc = KNNLMLogitsProcessor(model, store, k=16, lmbda=0.9, temperature=2.0)
    try:
        out = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=1, logits_processor=[proc])
    finally:
        proc.remove()
    assert out[:, -1].tolist() == ref.argmax(-1).tolist()


def test_beam_search_and_sampling(tiny, store, prompt):
    model, _ = tiny
    proc = KNNLMLogitsProcessor(model, store, k=16, lmbda=0.0, temperature=1.0)
    try:
        plain = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=1)
        mixed = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=1,
                               logits_processor=[proc])
        assert torch.equal(plain, mixed)
        assert proc.total_rows % (2 * 3) == 0 and proc.total_rows > 0  # every beam row went through it
        proc.lmbda = 0.5
        beams = model.generate(prompt, max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False,
                               pad_token_id=1, logits_processor=[proc], output_scores=True, return_dict_in_generate=True)
        assert beams.sequences.shape[0] == 6
        torch.manual_seed(0)
        sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, top_k=0, pad_token_id=1,
                                 logits_processor=[proc])
        assert sampled.shape == (2, prompt.shape[1] + 6)
    finally:
        proc.remove()


def test_adaptive_retrieval_skips_low_entropy_rows(tiny, store, prompt):
    model, _ = tiny
    query, logits = _mlp_input(model, prompt)
    lm_logp = torch.log_softmax(logits, -1)
    ent = -(lm_logp.exp() * lm_logp).sum(-1)
    threshold = float(ent.mean())  # one row above, one below (the two prompts differ)
    assert (ent >= threshold).sum() == 1
    proc = KNNLMLogitsProcessor(model, store, k=8, lmbda=0.5, temperature=3.0, adaptive_entropy=threshold)
    try:
        with torch.no_grad():
            model(prompt)
        out = proc(prompt, logits.clone())
    finally:
        proc.remove()
    ref = _reference(store, query, logits, 8, 0.5, 3.0)
    hi = ent >= threshold
    torch.testing.assert_close(out[~hi], lm_logp[~hi])
    torch.testing.assert_close(out[hi].double(), ref[hi], atol=2e-3, rtol=2e-3)
    assert proc.total_rows == 2 and proc.searched_rows == 1 and proc.skipped_share == 0.5

    plain = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1)
    proc = KNNLMLogitsProcessor(model, store, k=8, lmbda=0.5, temperature=3.0, adaptive_entropy=1e9)
    try:
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1, logits_processor=[proc])
    finally:
        proc.remove()
    assert torch.equal(out, plain) and proc.skipped_share == 1.0


def test_remove_detaches_and_errors(tiny, store, prompt):
    model, _ = tiny
    proc = KNNLMLogitsProcessor(model, store, k=4, lmbda=0.5, temperature=1.0)
    proc.remove()
    with torch.no_grad():
        logits = model(prompt).logits[:, -1]
    with pytest.raises(InvalidInputError, match="no hidden state was captured"):
        proc(prompt, logits)
    with pytest.raises(InvalidInputError, match="lmbda"):
        KNNLMLogitsProcessor(model, store, k=4, lmbda=1.5)
    with pytest.raises(InvalidInputError, match="k must be"):
        KNNLMLogitsProcessor(model, store, k=0)
    other = tiny_llama(store.vocab_size + 5)
    with pytest.raises(InvalidInputError, match="vocab_size"):
        KNNLMLogitsProcessor(other, store, k=4)


def test_mlp_memory_processor_equals_formula(tiny, store, prompt):
    model, _ = tiny
    torch.manual_seed(0)
    mem = MLPMemory(64, store.vocab_size, width=32, depth=1, token_ids=torch.unique(store.values.long()))
    query, logits = _mlp_input(model, prompt)
    proc = MLPMemoryLogitsProcessor(model, mem, lmbda=0.3)
    try:
        with torch.no_grad():
            model(prompt)
        out = proc(prompt, logits.clone())
        plain = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1)
        proc.lmbda = 0.0
        same = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=1, logits_processor=[proc])
        assert torch.equal(plain, same)
    finally:
        proc.remove()
    with torch.no_grad():
        local = torch.softmax(mem(query).double(), -1)
    p_mem = torch.zeros(logits.shape, dtype=torch.float64)
    p_mem[:, mem.token_ids] = local
    ref = (0.7 * torch.softmax(logits.double(), -1) + 0.3 * p_mem).log()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_cli_build_datastore_and_perplexity(tiny, tmp_path, capsys):
    from kcore.cli import main
    from kcore.cli.perplexity import knn_target_logprob

    model, tok = tiny
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("\n".join(corpus(10, seed=3)))
    test_docs = corpus(3, seed=4)
    test.write_text("\n".join(test_docs))
    assert main(["build-datastore", "--model", str(folder), "--text", str(train), "--docs", "line",
                 "--out", str(tmp_path / "ds"), "--max-length", "32"]) == 0
    capsys.readouterr()
    assert main(["perplexity", "--model", str(folder), "--text", str(test), "--docs", "line", "--knn",
                 str(tmp_path / "ds"), "--k", "8", "--lmbda", "0.3", "--temperature", "2"]) == 0
    out = capsys.readouterr().out
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    # Independent figures: the model's own loss, and the brute-force kNN-LM mixture per token.
    ds = Datastore.load(tmp_path / "ds")
    nll_base, nll_knn, n = 0.0, 0.0, 0
    for text in test_docs:
        ids = torch.tensor([tok(text)["input_ids"]])
        seen = {}
        h = model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        with torch.no_grad():
            logits = model(ids).logits[0, :-1]
        h.remove()
        ref = _reference(ds, seen["x"][0, :-1].float(), logits, 8, 0.3, 2.0)
        tgt = ids[0, 1:]
        nll_base -= torch.log_softmax(logits.double(), -1).gather(1, tgt[:, None]).sum().item()
        nll_knn -= ref.gather(1, tgt[:, None]).sum().item()
        n += len(tgt)
    assert int(lines["tokens"]) == n
    assert abs(float(lines["perplexity (model)"]) - math.exp(nll_base / n)) < 2e-3
    assert abs(float(lines["perplexity (kNN-LM, k=8, lmbda=0.3, T=2.0)"]) - math.exp(nll_knn / n)) < 2e-2
    # knn_target_logprob of a padded row is -inf, never NaN
    lp = knn_target_logprob(torch.full((1, 2), math.inf), torch.full((1, 2), -1), torch.tensor([3]), 1.0)
    assert lp.item() == -math.inf
