import json

import pytest
import torch
from membank_util import DOCS, tiny_model, tiny_tokenizer

from kcore.attention import MemoryBank
from kcore.errors import FileFormatError, InvalidInputError, TokenizerMismatchError


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(len(tok.get_vocab()))


def independent_kv(model, ids, layer):
    """k_proj / v_proj outputs of ``layer`` for the sequence ``ids``, from the hidden states the
    model returns (input layer norm applied by hand), as (num_kv_heads, len, head_dim)."""
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[layer]
        attn = model.model.layers[layer]
        x = attn.input_layernorm(hs)
        k = attn.self_attn.k_proj(x)[0].view(len(ids), 2, 16).transpose(0, 1)
        v = attn.self_attn.v_proj(x)[0].view(len(ids), 2, 16).transpose(0, 1)
    return k, v


def first_window_start(t, window, stride):
    return 0 if t < window else ((t - window) // stride + 1) * stride


@pytest.mark.parametrize("sink", ["auto", None])
@pytest.mark.parametrize("window,stride", [(64, 64), (8, 3), (8, 8), (5, 1)])
def test_keys_and_values_are_kproj_outputs_with_most_left_context(model, tok, window, stride, sink):
    bank = MemoryBank.build(model, tok, DOCS, window=window, stride=stride, dtype=torch.float32, progress=False, sink_token=sink)
    # "auto" reads the tokenizer's BOS ([BOS] = 2) before every window and does not keep it.
    lead = [2] if sink == "auto" else []
    assert bank.sink_token == (2 if sink == "auto" else None)
    offset = 0
    for doc in DOCS:
        ids = tok(doc, add_special_tokens=False).input_ids
        for layer in (0, 1):
            want_k = torch.empty(2, len(ids), 16)
            want_v = torch.empty(2, len(ids), 16)
            for t in range(len(ids)):
                s = first_window_start(t, window, stride)
                k, v = independent_kv(model, lead + ids[s : s + window], layer)
                want_k[:, t], want_v[:, t] = k[:, len(lead) + t - s], v[:, len(lead) + t - s]
            got_k = bank.keys(layer)[:, offset : offset + len(ids)]
            got_v = bank.values(layer)[:, offset : offset + len(ids)]
            torch.testing.assert_close(got_k, want_k, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_v, want_v, atol=1e-5, rtol=1e-5)
        offset += len(ids)
    assert bank.mem_len == offset
    kn = bank.keys_normed(1)
    torch.testing.assert_close(kn, bank.keys(1) / bank.keys(1).norm(dim=-1, keepdim=True))


def test_sink_token_choice_and_errors(model, tok):
    assert MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, progress=False).sink_token is None
    explicit = MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, progress=False, sink_token=5)
    assert explicit.sink_token == 5
    import numpy as np

    same = MemoryBank.build(model, tok, DOCS[:1], window=np.int64(8), stride=np.int32(4), progress=False, sink_token=np.int64(5))
    assert same.sink_token == 5 and (same.window, same.stride) == (8, 4) and torch.equal(same.keys(0), explicit.keys(0))
    for bad in (-1, "bos", 1.5, True):
        with pytest.raises(InvalidInputError, match="sink_token"):
            MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, progress=False, sink_token=bad)
    with pytest.raises(InvalidInputError, match="vocabulary"):
        MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, progress=False, sink_token=10**6)


def test_token_map_points_at_the_token_text(model, tok):
    bank = MemoryBank.build(model, tok, DOCS, window=16, stride=8, progress=False)
    texts = [bank.text(i) for i in range(bank.mem_len)]
    want = [w for d in DOCS for w in d.split()]
    assert texts == want
    assert bank.span(0).document == 0 and bank.span(bank.mem_len - 1).document == 1
    assert bank.keys(0).dtype == torch.float16


def test_layers_subset_and_bad_arguments(model, tok):
    bank = MemoryBank.build(model, tok, DOCS[:1], window=16, stride=8, layers=[1], progress=False)
    assert bank.layers == [1]
    with pytest.raises(InvalidInputError, match="layer 0"):
        bank.keys(0)
    with pytest.raises(InvalidInputError, match="stride"):
        MemoryBank.build(model, tok, DOCS, window=4, stride=8, progress=False)
    with pytest.raises(InvalidInputError, match="window"):
        MemoryBank.build(model, tok, DOCS, window=0, stride=1, progress=False)
    with pytest.raises(InvalidInputError, match="layers"):
        MemoryBank.build(model, tok, DOCS, window=4, stride=2, layers=[5], progress=False)
    with pytest.raises(InvalidInputError, match="documents"):
        MemoryBank.build(model, tok, "one string", window=4, stride=2, progress=False)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_save_load_round_trip(model, tok, tmp_path, quantization):
    bank = MemoryBank.build(model, tok, DOCS, window=16, stride=8, quantization=quantization, progress=False)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    assert not list(tmp_path.glob("*.tmp"))
    back = MemoryBank.load(path, tokenizer=tok, model=model)
    assert (back.layers, back.mem_len, back.dtype, back.quantization) == (bank.layers, bank.mem_len, bank.dtype, quantization)
    assert back.documents == DOCS and (back.window, back.stride, back.sink_token) == (16, 8, None)
    assert torch.equal(back.token_map, bank.token_map)
    for layer in bank.layers:
        assert torch.equal(back.keys(layer), bank.keys(layer))
        assert torch.equal(back.values(layer), bank.values(layer))


def test_int8_error_is_within_half_a_step_per_row(model, tok):
    full = MemoryBank.build(model, tok, DOCS, window=16, stride=8, dtype=torch.float32, progress=False)
    q = MemoryBank.build(model, tok, DOCS, window=16, stride=8, dtype=torch.float32, quantization="int8", progress=False)
    assert q.nbytes < full.nbytes / 3
    for layer in full.layers:
        for a, b in ((full.keys(layer), q.keys(layer)), (full.values(layer), q.values(layer))):
            step = a.abs().amax(dim=-1, keepdim=True) / 127
            assert ((a - b).abs() <= step / 2 + 1e-6).all()


def test_corrupted_or_foreign_files_are_rejected(model, tok, tmp_path):
    from safetensors.torch import save_file

    bank = MemoryBank.build(model, tok, DOCS, window=16, stride=8, progress=False)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    with pytest.raises(FileFormatError, match="truncated.safetensors"):
        MemoryBank.load(truncated)

    flipped = bytearray(data)
    flipped[-7] ^= 0x40
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(FileFormatError, match="checksum"):
        MemoryBank.load(bad)

    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(3)}, str(foreign))
    with pytest.raises(FileFormatError, match="metadata"):
        MemoryBank.load(foreign)

    with pytest.raises(FileFormatError, match="no such file"):
        MemoryBank.load(tmp_path / "missing.safetensors")

    # A newer format version is refused, not misread.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kcore"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["version"] = 99
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, str(newer), metadata={"kcore": json.dumps(meta)})
    with pytest.raises(FileFormatError, match="version 99"):
        MemoryBank.load(newer)

    other = tiny_tokenizer()
    other.add_tokens(["zebra"])
    with pytest.raises(TokenizerMismatchError):
        MemoryBank.load(path, tokenizer=other)


def test_empty_bank_has_no_tokens(model):
    bank = MemoryBank.empty(model)
    assert bank.mem_len == 0 and bank.keys(0).shape == (2, 0, 16)


@pytest.mark.parametrize("quantization", [None, "int8"])
def test_concatenate_equals_one_build_over_all_documents(model, tok, quantization):
    kw = dict(window=8, stride=3, dtype=torch.float32, quantization=quantization, progress=False)
    whole = MemoryBank.build(model, tok, DOCS, **kw)
    parts = [MemoryBank.build(model, tok, [d], **kw) for d in DOCS]
    cat = MemoryBank.concatenate(parts)
    assert cat.mem_len == whole.mem_len == sum(p.mem_len for p in parts)
    assert cat.documents == DOCS and (cat.window, cat.stride) == (8, 3)
    # Document ids renumbered: token i of the result cites the same text as in the one build.
    assert torch.equal(cat.token_map, whole.token_map)
    assert [cat.text(i) for i in range(cat.mem_len)] == [whole.text(i) for i in range(whole.mem_len)]
    for layer in whole.layers:
        torch.testing.assert_close(cat.keys(layer), whole.keys(layer), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cat.values(layer), whole.values(layer), atol=1e-5, rtol=1e-5)
    # The inputs are left as they were.
    assert parts[1].token_map[0, 0].item() == 0 and parts[1].documents == [DOCS[1]]


def test_concatenate_refuses_mismatched_banks(model, tok):
    a = MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, progress=False, sink_token="auto")
    with pytest.raises(InvalidInputError, match="non-empty"):
        MemoryBank.concatenate([])
    with pytest.raises(InvalidInputError, match="layers"):
        MemoryBank.concatenate([a, MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, layers=[0], progress=False)])
    with pytest.raises(InvalidInputError, match="dtype"):
        MemoryBank.concatenate([a, MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, dtype=torch.float32, progress=False)])
    with pytest.raises(InvalidInputError, match="quantization"):
        MemoryBank.concatenate([a, MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, quantization="int8", progress=False)])
    mixed = MemoryBank.concatenate([a, MemoryBank.build(model, tok, DOCS[1:2], window=16, stride=4, progress=False, sink_token=None)])
    assert (mixed.window, mixed.stride, mixed.sink_token) == (0, 4, None)
    assert MemoryBank.concatenate([a, a]).sink_token == 2


def test_empty_banks_combine_with_built_ones(model, tok, tmp_path):
    a = MemoryBank.build(model, tok, DOCS, window=8, stride=4, progress=False)
    for empty in (MemoryBank.empty(model), MemoryBank.empty(model, tokenizer=tok)):
        for banks in ([empty, a], [a, empty]):
            cat = MemoryBank.concatenate(banks)
            assert cat.mem_len == a.mem_len and cat.tokenizer_fingerprint == a.tokenizer_fingerprint
            assert torch.equal(cat.keys(1), a.keys(1)) and torch.equal(cat.token_map, a.token_map)
    q8 = MemoryBank.build(model, tok, DOCS, window=8, stride=4, quantization="int8", progress=False)
    assert MemoryBank.concatenate([MemoryBank.empty(model, quantization="int8"), q8]).mem_len == q8.mem_len
    # Saved without a tokenizer, an empty bank loads with one (it holds no token to mismatch).
    MemoryBank.empty(model).save(tmp_path / "e.safetensors")
    assert MemoryBank.load(tmp_path / "e.safetensors", tokenizer=tok, model=model).mem_len == 0
    with pytest.raises(InvalidInputError, match="layers"):
        MemoryBank.empty(model, layers=[99])
    with pytest.raises(InvalidInputError, match="dtype"):
        a.to(torch.float32)


def test_saved_bank_has_ordinary_file_permissions(model, tok, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        MemoryBank.build(model, tok, DOCS[:1], window=8, stride=4, progress=False).save(tmp_path / "b.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "b.safetensors").stat().st_mode) == 0o644


def test_bad_quantization_or_dtype_refused_before_reading_documents(model, tok, monkeypatch):
    def no_forward(*a, **k):
        raise AssertionError("the model ran before the arguments were checked")

    monkeypatch.setattr(model, "forward", no_forward)
    with pytest.raises(InvalidInputError, match="quantization"):
        MemoryBank.build(model, tok, DOCS, window=8, stride=4, quantization="int4", progress=False)
    with pytest.raises(InvalidInputError, match="dtype"):
        MemoryBank.build(model, tok, DOCS, window=8, stride=4, dtype=torch.float64, progress=False)
