"""Edge cases of the kNN-LM datastore, its HF processor and its CLI found by review: bad input is a
clear kcore error (exit code 2 in the CLI, no traceback), good edge input gives the hand result."""

from __future__ import annotations

import math

import pytest
import torch

from datastore_helpers import corpus, tiny_llama, tiny_tokenizer
from kcore.cli import main
from kcore.cli.perplexity import knn_target_logprob
from kcore.errors import InvalidInputError
from kcore.hf import KNNLMLogitsProcessor
from kcore.memory import Datastore


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok)), tok


@pytest.fixture(scope="module")
def store(tiny, tmp_path_factory):
    model, tok = tiny
    return Datastore.build(model, tok, corpus(12), tmp_path_factory.mktemp("e") / "ds", batch_size=4,
                           max_length=32, progress=False)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


def test_build_under_a_file_is_a_clear_error(tiny, tmp_path):
    model, tok = tiny
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="cannot create a folder"):
        Datastore.build(model, tok, corpus(2), tmp_path / "file.txt" / "ds", progress=False)


def test_interrupted_build_leaves_nothing(tiny, tmp_path):
    model, tok = tiny
    calls = []

    def boom(*_):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    h = model.model.norm.register_forward_hook(boom)
    try:
        with pytest.raises(KeyboardInterrupt):
            Datastore.build(model, tok, corpus(12), tmp_path / "ds", batch_size=2, progress=False)
    finally:
        h.remove()
    assert _leftovers(tmp_path) == []


def test_fp16_overflow_late_in_the_corpus_is_caught(tiny, tmp_path):
    # One long document read in equal windows, kept in corpus order: batches after the 40th
    # cover rows > 5000, beyond any check of only the first rows.
    model, tok = tiny
    text = " ".join(["the cat sat on the mat"] * 1000)  # 6000 tokens
    module = model.model.layers[-1].post_attention_layernorm
    calls = []

    def inflate(_m, _i, out):
        calls.append(1)
        return out * 1e6 if len(calls) > 40 else out

    h = module.register_forward_hook(inflate)
    try:
        with pytest.raises(InvalidInputError, match="non-finite key states"):
            Datastore.build(model, tok, [text], tmp_path / "ds", batch_size=1, max_length=256, progress=False)
    finally:
        h.remove()
    assert _leftovers(tmp_path) == []


def test_short_texts(tiny, tmp_path):
    model, tok = tiny
    with pytest.raises(InvalidInputError, match="shorter than two tokens"):
        Datastore.build(model, tok, [], tmp_path / "a", progress=False)
    with pytest.raises(InvalidInputError, match="shorter than two tokens"):
        Datastore.build(model, tok, ["cat", ""], tmp_path / "b", progress=False)
    ds = Datastore.build(model, tok, ["", "the cat sat", "dog"], tmp_path / "c", progress=False)
    ids = tok("the cat sat")["input_ids"]
    assert ds.count == len(ids) - 1 and ds.values.tolist() == ids[1:]


def test_knnlm_tiny_temperature_is_the_nearest_neighbour_limit(tiny, store):
    model, tok = tiny
    ids = torch.tensor([tok("the cat sat on")["input_ids"], tok("police said the dog")["input_ids"]])
    seen = {}
    h = model.model.layers[-1].mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0][:, -1].float()))
    proc = KNNLMLogitsProcessor(model, store, k=8, lmbda=0.5, temperature=1e-30)
    try:
        with torch.no_grad():
            scores = model(ids).logits[:, -1].float()
        out = proc(ids, scores)
    finally:
        proc.remove()
        h.remove()
    assert torch.isfinite(out.exp().sum(-1)).all()
    # Hand limit: p_knn is one-hot on the nearest neighbour's token (ties split evenly).
    d, nid = store.search(seen["x"], 8)
    p_knn = torch.zeros_like(scores)
    for r in range(2):
        best = nid[r][d[r] == d[r].min()]
        for i in best.tolist():
            p_knn[r, int(store.values[i])] += 1.0 / len(best)
    ref = torch.log(0.5 * torch.softmax(scores, -1) + 0.5 * p_knn)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_knn_target_logprob_tiny_temperature():
    d = torch.tensor([[1e10, 2e10, math.inf]])
    toks = torch.tensor([[3, 4, -1]])
    lp = knn_target_logprob(d, toks, torch.tensor([3]), 1e-30)
    assert lp.item() == 0.0  # all mass on the nearest neighbour, token 3
    assert knn_target_logprob(d, toks, torch.tensor([4]), 1e-30).item() == -math.inf


@pytest.mark.parametrize("bad", [["--temperature", "0"], ["--temperature", "nan"], ["--k", "0"]])
def test_perplexity_cli_bad_arguments_exit_2(tmp_path, capsys, bad):
    (tmp_path / "t.txt").write_text("hello world")
    # A missing model shows the arguments are checked before any model is loaded.
    rc = main(["perplexity", "--model", str(tmp_path / "no_model"), "--text", str(tmp_path / "t.txt"), *bad])
    err = capsys.readouterr().err
    assert rc == 2 and bad[0] in err and "Traceback" not in err


def test_build_datastore_cli_existing_out_names_the_flag(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello world")
    (tmp_path / "ds").mkdir()
    rc = main(["build-datastore", "--model", str(tmp_path / "no_model"), "--text", str(tmp_path / "t.txt"),
               "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err


def test_generate_left_padding_beam_and_k_beyond_count(tiny, store):
    model, tok = tiny
    tok.padding_side = "left"
    enc = tok(["the cat sat on", "dog"], return_tensors="pt", padding=True)
    proc = KNNLMLogitsProcessor(model, store, k=store.count + 50, lmbda=1.0)
    try:
        out = model.generate(**enc, max_new_tokens=3, num_beams=3, do_sample=False, logits_processor=[proc],
                             pad_token_id=1, output_scores=True, return_dict_in_generate=True)
    finally:
        proc.remove()
        proc.remove()  # twice is harmless
    # lmbda = 1: only tokens present in the datastore can be chosen.
    assert set(out.sequences[:, -3:].flatten().tolist()) <= set(store.values.tolist())
    assert all(torch.isfinite(s).any(-1).all() for s in out.scores)


def test_mlp_memory_flipped_weight_byte_is_detected(tmp_path):
    from kcore.errors import FileFormatError
    from kcore.memory import MLPMemory

    mem = MLPMemory(8, 10, width=4, depth=1)
    f = tmp_path / "m.safetensors"
    mem.save(f)
    back = MLPMemory.load(f)
    assert all(torch.equal(a, b) for a, b in zip(mem.state_dict().values(), back.state_dict().values()))
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's bytes (the header is at the start)
    f.write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum"):
        MLPMemory.load(f)
    f.write_bytes(b"")
    with pytest.raises(FileFormatError, match="safetensors"):
        MLPMemory.load(f)


def test_knn_targets_tiny_temperature_is_one_hot_on_the_nearest(store):
    from kcore.memory.mlp_memory import knn_targets

    tokens, probs = knn_targets(store, k=4, temperature=1e-40)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(store.count))  # was all zeros
    ref_tokens, ref_probs = knn_targets(store, k=4, temperature=1.0)
    assert torch.equal(tokens, ref_tokens)
    # The nearest (first) neighbour gets all the mass unless it ties with the second.
    d, _ = store.search(store.keys[:50].float(), 5, exact=True)
    untied = (d[:, 2] > d[:, 1])  # d[:, 0] is the entry itself
    assert untied.any() and torch.all(probs[:50][untied, 0] == 1.0)


def test_train_mlp_memory_k_beyond_count_and_bad_arguments(tiny, tmp_path):
    # k >= count pads the neighbours with -1; with vocab="datastore", token 0 (the clamped pad id)
    # is no output of the MLP and the padding used to index output -1.
    from kcore.memory import train_mlp_memory
    from kcore.memory.mlp_memory import knn_targets

    model, tok = tiny
    ds = Datastore.build(model, tok, ["the cat sat on the mat"], tmp_path / "ds", progress=False)
    assert 0 not in ds.values.tolist()
    mem = train_mlp_memory(ds, k=ds.count + 5, epochs=1, width=8, depth=1, progress=False)
    mem = mem[0] if isinstance(mem, tuple) else mem
    assert all(torch.isfinite(p).all() for p in mem.parameters())
    tokens, probs = knn_targets(ds, k=ds.count + 5, temperature=1.0)
    assert (tokens[:, ds.count - 1 :] == -1).all() and (probs[:, ds.count - 1 :] == 0).all()
    for bad in ({"batch_size": 0}, {"lr": float("nan")}, {"lr": 0.0}):
        with pytest.raises(InvalidInputError, match=next(iter(bad))):
            train_mlp_memory(ds, k=2, epochs=1, width=8, depth=1, progress=False, **bad)


@pytest.mark.parametrize("kwargs", [{"metric": "ip"}, {"k": 3}, {"exct": True}])
def test_knnlm_rejects_search_kwargs_that_change_the_method(tiny, store, kwargs):
    model, _ = tiny
    with pytest.raises(InvalidInputError, match="search_kwargs"):
        KNNLMLogitsProcessor(model, store, k=4, search_kwargs=kwargs)


@pytest.mark.parametrize("command", ["perplexity", "build-datastore"])
def test_cli_missing_text_is_reported_before_the_model_loads(tmp_path, capsys, command):
    extra = ["--out", str(tmp_path / "ds")] if command == "build-datastore" else []
    rc = main([command, "--model", str(tmp_path / "no_model"), "--text", str(tmp_path / "none.txt"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "--text" in err and "no such file" in err and "Traceback" not in err
