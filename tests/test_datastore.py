import json
import math
import os

import numpy as np
import pytest
import torch

from datastore_helpers import corpus, tiny_llama, tiny_tokenizer
from kcore.errors import BackendUnavailableError, FileFormatError, InvalidInputError, TokenizerMismatchError
from kcore.memory import Datastore
from kcore.memory.datastore import _plan_windows, extract_key_states


@pytest.fixture(scope="module")
def tiny():
    tok = tiny_tokenizer()
    return tiny_llama(len(tok)), tok


@pytest.fixture(scope="module")
def texts():
    return corpus(12)


@pytest.fixture(scope="module")
def store(tiny, texts, tmp_path_factory):
    model, tok = tiny
    path = tmp_path_factory.mktemp("ds") / "store"
    return Datastore.build(model, tok, texts, path, batch_size=3, max_length=24, stride=10, progress=False)


def _rms_norm(x, module):
    eps = module.variance_epsilon
    return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _manual_last_layer(model, h, positions):
    """Keys computed by hand from the last layer's input ``h`` (1, T, d): explicit causal
    attention with RoPE and grouped KV heads, then the norms (no hook, no batching)."""
    layer = model.model.layers[-1]
    attn, cfg = layer.self_attn, model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // heads
    x = _rms_norm(h, layer.input_layernorm)[0]
    T = x.shape[0]
    q = (x @ attn.q_proj.weight.T).view(T, heads, hd).transpose(0, 1)
    k = (x @ attn.k_proj.weight.T).view(T, kv_heads, hd).transpose(0, 1)
    v = (x @ attn.v_proj.weight.T).view(T, kv_heads, hd).transpose(0, 1)
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    ang = positions[:, None].float() * inv_freq[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    k = k.repeat_interleave(heads // kv_heads, 0)
    v = v.repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    a = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ attn.o_proj.weight.T
    mid = h[0] + a
    mlp_in = _rms_norm(mid, layer.post_attention_layernorm)
    mlp = layer.mlp
    out = mid + (torch.nn.functional.silu(mlp_in @ mlp.gate_proj.weight.T) * (mlp_in @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return mlp_in, _rms_norm(out, model.model.norm)


def test_windows_cover_every_position_once():
    docs = [list(range(n)) for n in (0, 1, 2, 5, 24, 25, 61)]
    windows, total = _plan_windows(docs, max_length=24, stride=10)
    assert total == sum(max(0, len(d) - 1) for d in docs)
    seen = {}
    for w in windows:
        n = w.end - w.begin - 1 - w.first
        for j in range(n):
            pos = w.begin + w.first + j  # absolute position in the doc; its target is pos + 1
            assert (w.doc, pos) not in seen
            seen[(w.doc, pos)] = w.offset + j
            # Every recorded position past the first window has left context of >= 24 - 10 tokens.
            assert pos - w.begin >= min(pos, 24 - 10 - 1)
    assert sorted(seen.values()) == list(range(total))


def test_keys_equal_hidden_state_computed_by_hand(tiny, texts, store):
    model, tok = tiny
    assert store.count == sum(len(tok(t)["input_ids"]) - 1 for t in texts)
    assert store.dim == 64 and store.layer == 1 and store.key == "mlp_input"
    assert store.keys.dtype == torch.float16 and store.values.dtype == torch.int32
    row = 0
    for text in texts[:6]:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
            mlp_in, final = _manual_last_layer(model, out.hidden_states[-2], torch.arange(len(ids)))
        # hand computation agrees with the model itself
        torch.testing.assert_close(final, out.hidden_states[-1][0], atol=1e-4, rtol=1e-4)
        n = len(ids) - 1
        if n <= 24 - 1:  # one window: full left context, same as the unwindowed forward
            got = store.keys[row : row + n].float()
            torch.testing.assert_close(got, mlp_in[:n], atol=2e-3 * mlp_in.abs().max().item(), rtol=1e-2)
        assert store.values[row : row + n].tolist() == ids[1:]
        row += n


def test_final_norm_keys_fp32(tiny, texts, tmp_path):
    model, tok = tiny
    short = [t for t in texts if len(tok(t)["input_ids"]) <= 64][:4]
    ds = Datastore.build(model, tok, short, tmp_path / "f", batch_size=2, max_length=64, key="final_norm",
                         dtype=torch.float32, progress=False)
    assert ds.keys.dtype == torch.float32 and ds.layer == 2
    row = 0
    for text in short:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            hs = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(ds.keys[row : row + len(ids) - 1], hs[:-1], atol=1e-4, rtol=1e-4)
        row += len(ids) - 1


def test_extract_with_lm_matches_model_logits(tiny, texts):
    model, tok = tiny
    ids = tok(texts[1])["input_ids"]
    (batch,) = list(extract_key_states(model, tok, [texts[1]], max_length=128, with_lm=True))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    order = torch.argsort(batch.rows)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    torch.testing.assert_close(batch.lm_logprobs[order], want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch.lm_entropy[order], -(logp.exp() * logp).sum(-1), atol=1e-4, rtol=1e-4)


def test_round_trip_and_search(store, tiny):
    model, tok = tiny
    again = Datastore.load(store.path, tokenizer=tok, hidden_size=64, vocab_size=len(tok))
    assert again.count == store.count and torch.equal(again.keys, store.keys) and torch.equal(again.values, store.values)
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["version"] == 1 and meta["key_dtype"] == "float16" and meta["dim"] == 64
    q = store.keys[:5].float()
    dists, ids = again.search(q, 4)
    assert dists.shape == (5, 4) and ids.dtype == torch.int64
    assert (dists[:, 0] <= 1e-3).all()  # each key finds itself (or an identical key) first
    ref = ((store.keys.float()[None] - q[:, None]) ** 2).sum(-1).sort(1).values[:, :4]
    torch.testing.assert_close(dists, ref, atol=1e-3, rtol=1e-3)
    d_big, i_big = again.search(q[:1], store.count + 3)
    assert (i_big[0, -3:] == -1).all() and torch.isinf(d_big[0, -3:]).all()
    assert (again.neighbour_tokens(i_big)[0, -3:] == -1).all()


def test_build_is_atomic_and_refuses_existing(tiny, texts, tmp_path, monkeypatch):
    model, tok = tiny
    path = tmp_path / "a"
    Datastore.build(model, tok, texts[:2], path, progress=False)
    with pytest.raises(InvalidInputError, match="already exists"):
        Datastore.build(model, tok, texts[:2], path, progress=False)

    # A failure during the build leaves neither a partial datastore nor temp folders behind.
    import kcore.memory.datastore as dsmod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dsmod, "_sha256", boom)
    with pytest.raises(RuntimeError):
        Datastore.build(model, tok, texts[:3], tmp_path / "b", progress=False)
    with pytest.raises(RuntimeError):
        Datastore.build(model, tok, texts[:3], path, progress=False, overwrite=True)
    monkeypatch.undo()
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert Datastore.load(path).meta["num_texts"] == 2  # the old one is intact
    Datastore.build(model, tok, texts[:3], path, progress=False, overwrite=True)
    assert Datastore.load(path).meta["num_texts"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def _copy(store, dest):
    import shutil

    shutil.copytree(store.path, dest)
    return dest


def test_corrupted_or_mismatched_files_rejected(store, tmp_path):
    p = _copy(store, tmp_path / "trunc")
    with open(p / "keys.bin", "r+b") as f:
        f.truncate(os.path.getsize(p / "keys.bin") - 2)
    with pytest.raises(FileFormatError, match="keys.bin has .* bytes"):
        Datastore.load(p)

    p = _copy(store, tmp_path / "flip")
    data = bytearray((p / "values.bin").read_bytes())
    data[5] ^= 0x10
    (p / "values.bin").write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="checksum"):
        Datastore.load(p)
    Datastore.load(p, verify=False)  # sizes still agree

    p = _copy(store, tmp_path / "ver")
    meta = json.loads((p / "meta.json").read_text())
    meta["version"] = 99
    (p / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="version 99"):
        Datastore.load(p)

    p = _copy(store, tmp_path / "garbage")
    (p / "meta.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="unreadable"):
        Datastore.load(p)
    with pytest.raises(FileFormatError, match="missing"):
        Datastore.load(tmp_path / "nowhere")


def test_other_tokenizer_or_hidden_size_rejected(store):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "x": 1}, unk_token="<unk>"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other = PreTrainedTokenizerFast(tokenizer_object=other, unk_token="<unk>")
    with pytest.raises(TokenizerMismatchError, match="another tokenizer"):
        Datastore.load(store.path, tokenizer=other)
    with pytest.raises(InvalidInputError, match="hidden_size 576"):
        Datastore.load(store.path, hidden_size=576)
    with pytest.raises(TokenizerMismatchError, match="vocab_size"):
        Datastore.load(store.path, vocab_size=49152)


def test_bad_arguments(store, tiny, texts, tmp_path):
    model, tok = tiny
    with pytest.raises(InvalidInputError, match="queries must have shape"):
        store.search(torch.zeros(3, 65), 2)
    with pytest.raises(InvalidInputError, match="NaN|nan|finite"):
        store.search(torch.full((1, 64), float("nan")), 2)
    with pytest.raises(InvalidInputError, match="k must be"):
        store.search(torch.zeros(1, 64), 0)
    with pytest.raises(InvalidInputError, match="texts must be a sequence"):
        Datastore.build(model, tok, "one string", tmp_path / "x", progress=False)
    with pytest.raises(InvalidInputError, match="key must be"):
        Datastore.build(model, tok, texts, tmp_path / "x", key="attn", progress=False)
    with pytest.raises(InvalidInputError, match="dtype"):
        Datastore.build(model, tok, texts, tmp_path / "x", dtype=torch.bfloat16, progress=False)
    with pytest.raises(InvalidInputError, match="no position"):
        Datastore.build(model, tok, ["cat"], tmp_path / "x", progress=False)
    with pytest.raises(InvalidInputError, match="exact=False needs an index"):
        store.search(torch.zeros(1, 64), 2, exact=False)


def test_faiss_ivfpq_index(store, tmp_path):
    pytest.importorskip("faiss")
    ds = Datastore.load(_copy(store, tmp_path / "idx"))
    ds.build_index(nlist=8, m=16, nbits=4)
    assert (ds.path / "index.faiss").is_file() and ds.has_index
    q = ds.keys[::37][:16].float()
    exact_d, exact_i = ds.search(q, 8, exact=True)
    d, i = ds.search(q, 8, nprobe=8, rerank=True)  # all lists probed: only PQ ranking errors
    # Re-ranked distances are exact distances of the returned ids, sorted ascending.
    recomputed = ((ds.keys[i].float() - q[:, None]) ** 2).sum(-1)
    torch.testing.assert_close(d, recomputed, atol=1e-3, rtol=1e-3)
    assert (d[:, 1:] >= d[:, :-1]).all()
    assert (d[:, 0] <= exact_d[:, 0] + 1e-3).all()  # the query's own key is found
    # Recall of the exact top-8 among the re-ranked index results.
    recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 8 for a, b in zip(i, exact_i)])
    assert recall >= 0.5
    # The index reloads with the datastore and is rejected once the keys change.
    again = Datastore.load(ds.path)
    assert again.has_index
    d2, i2 = again.search(q, 8, nprobe=8)
    assert torch.equal(i2, i)
    with pytest.raises(InvalidInputError, match="already has an index"):
        again.build_index(nlist=8, m=16, nbits=4)
    meta = json.loads((ds.path / "index.json").read_text())
    meta["keys_sha256"] = "0" * 64
    (ds.path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(FileFormatError, match="other keys"):
        Datastore.load(ds.path)


def test_faiss_missing_gives_clear_error(store, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "faiss":
            raise ImportError("no faiss")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BackendUnavailableError, match=r"kcore\[faiss\]"):
        store.build_index()


@pytest.mark.slow
def test_smollm2_keys_match_hidden_states(smollm2, tmp_path):
    model, tok = smollm2
    texts = ["The bushfire near Sydney forced hundreds of people from their homes.", "Police said the man was arrested."]
    ds = Datastore.build(model, tok, texts, tmp_path / "s", batch_size=2, dtype=torch.float32, progress=False)
    assert ds.dim == 576 and ds.layer == 29 and ds.vocab_size == 49152
    captured = {}
    h = model.model.layers[-1].mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("x", i[0]))
    row = 0
    try:
        for text in texts:
            ids = tok(text)["input_ids"]
            with torch.no_grad():
                model(torch.tensor([ids]))
            n = len(ids) - 1
            torch.testing.assert_close(ds.keys[row : row + n], captured["x"][0, :n], atol=2e-3, rtol=2e-3)
            assert ds.values[row : row + n].tolist() == ids[1:]
            row += n
    finally:
        h.remove()
    Datastore.load(ds.path, tokenizer=tok, hidden_size=576)


def test_gpt2_family(texts, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128)).eval()
    short = texts[:3]
    seen = {}
    h = model.transformer.h[-1].mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    ds = Datastore.build(model, tok, short, tmp_path / "g", max_length=64, dtype=torch.float32, progress=False)
    h.remove()
    assert ds.layer == 1 and ds.dim == 32
    row = 0
    for text in short:
        ids = tok(text)["input_ids"]
        h = model.transformer.h[-1].mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
        with torch.no_grad():
            model(torch.tensor([ids]))
        h.remove()
        n = len(ids) - 1
        torch.testing.assert_close(ds.keys[row : row + n], seen["x"][0, :n], atol=1e-5, rtol=1e-5)
        row += n


def test_split_documents_by_document_without_leaks():
    from kcore.corpus import split_documents

    docs = [f"doc {i}" for i in range(50)] + ["doc 3", "doc 7", "doc 7"]
    s = split_documents(docs, dev=0.2, test=0.2, seed=1)
    assert set(s["train"]).isdisjoint(s["dev"]) and set(s["train"]).isdisjoint(s["test"])
    assert set(s["dev"]).isdisjoint(s["test"])
    assert len(s["dev"]) == len(set(s["dev"])) and len(s["test"]) == len(set(s["test"]))
    assert set(s["train"]) | set(s["dev"]) | set(s["test"]) == set(docs)
    assert s == split_documents(docs, dev=0.2, test=0.2, seed=1)
