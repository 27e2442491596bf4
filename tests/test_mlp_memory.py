import math

import pytest
import torch

from datastore_helpers import corpus, tiny_llama, tiny_tokenizer
from kcore.errors import FileFormatError, InvalidInputError, TokenizerMismatchError
from kcore.memory import Datastore, MLPMemory, train_mlp_memory
from kcore.memory.mlp_memory import knn_targets


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok))
    return Datastore.build(model, tok, corpus(12, seed=2), tmp_path_factory.mktemp("m") / "ds", batch_size=4,
                           max_length=32, progress=False)


def test_knn_targets_drop_own_entry(store):
    k, T = 6, 4.0
    tokens, probs = knn_targets(store, k=k, temperature=T, batch_size=50)
    keys = store.keys.float()
    d = ((keys[:, None] - keys[None]) ** 2).sum(-1)
    d.fill_diagonal_(math.inf)  # own entry dropped
    top_d, top_i = d.topk(k + 1, dim=1, largest=False)
    # Rows with a tie at the k-th neighbour may keep either of the tied entries: compare the others.
    clear = (top_d[:, k] - top_d[:, k - 1]) > 1e-3
    assert clear.float().mean() > 0.8
    top_d, top_i = top_d[:, :k], top_i[:, :k]
    ref_p = torch.softmax(-top_d / T, dim=1)
    # Compare per-token distributions (ties among equal distances may order neighbours differently).
    V = store.vocab_size
    got = torch.zeros(store.count, V).scatter_add_(1, tokens.long(), probs)
    ref = torch.zeros(store.count, V).scatter_add_(1, store.values[top_i].long(), ref_p)
    torch.testing.assert_close(got[clear], ref[clear], atol=1e-4, rtol=1e-4)


def test_training_reduces_loss_and_round_trips(store, tmp_path):
    mem, hist = train_mlp_memory(store, k=16, temperature=4.0, epochs=5, lr=5e-3, batch_size=64, width=48,
                                 depth=2, expansion=2, progress=False)
    assert hist[0]["epoch"] == 0 and len(hist) == 6
    assert hist[-1]["loss"] < 0.7 * hist[0]["loss"]
    assert hist[-1]["kl"] < hist[1]["kl"] and hist[-1]["ce"] < hist[1]["ce"]
    assert mem.config["num_outputs"] == len(torch.unique(store.values))
    h = store.keys[:7].float()
    lp = mem.log_probs(h)
    assert lp.shape == (7, store.vocab_size)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(7))
    outside = torch.ones(store.vocab_size, dtype=torch.bool)
    outside[mem.token_ids] = False
    assert torch.isinf(lp[:, outside]).all()

    path = tmp_path / "mem.safetensors"
    mem.save(path)
    again = MLPMemory.load(path, hidden_size=64, vocab_size=store.vocab_size, tokenizer=tiny_tokenizer())
    assert again.config == mem.config
    torch.testing.assert_close(again.log_probs(h), lp, atol=0, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.safetensors"]

    with pytest.raises(InvalidInputError, match="hidden_size"):
        MLPMemory.load(path, hidden_size=576)
    with pytest.raises(TokenizerMismatchError, match="vocab_size"):
        MLPMemory.load(path, vocab_size=49152)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FileFormatError):
        MLPMemory.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FileFormatError, match="not a kcore MLP Memory"):
        MLPMemory.load(tmp_path / "other.safetensors")


def test_bad_arguments(store):
    with pytest.raises(InvalidInputError, match="alpha"):
        train_mlp_memory(store, k=4, alpha=2.0, progress=False)
    with pytest.raises(InvalidInputError, match="token_ids"):
        MLPMemory(8, 10, token_ids=torch.tensor([3, 1]))
    with pytest.raises(InvalidInputError, match="width"):
        MLPMemory(8, 10, width=0)
    mem = MLPMemory(8, 10, width=4, depth=1)
    with pytest.raises(InvalidInputError, match="hidden must have shape"):
        mem.log_probs(torch.zeros(2, 9))
    assert mem.flops_per_token() == 2 * (8 * 4 + 4 * 16 + 16 * 4 + 4 * 10)


def test_validate_keeps_best_epoch(store):
    scores = iter([3.0, 1.0, 2.0])
    seen = []

    def validate(model):
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(scores)

    mem, hist = train_mlp_memory(store, k=4, temperature=4.0, epochs=3, batch_size=128, width=16, depth=1,
                                 progress=False, validate=validate)
    assert [h.get("val") for h in hist] == [None, 3.0, 1.0, 2.0]
    assert mem.config["meta"]["best_epoch"] == 2
    for k, v in mem.state_dict().items():
        assert torch.equal(v, seen[1][k])
