"""Edge cases of kcore.ops.apply_token_bitmask_ and the bitmask helpers found by review."""

import numpy as np
import pytest
import torch

from kcore.errors import InvalidInputError
from kcore.ops import apply_token_bitmask_
from kcore.ops.bitmask import bitmask_from_bool, bitmask_to_bool

VOCAB = 100


def _case(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(batch, VOCAB, generator=g) > 0.5
    return torch.randn(batch, VOCAB, generator=g), allowed, bitmask_from_bool(allowed)


def _reference(logits, allowed):
    return logits.masked_fill(~allowed, float("-inf"))


@pytest.mark.parametrize("backend", ["auto", "cpu", "torch"])
def test_gradient_of_masked_logits_is_zero(backend):
    # Before: the native kernel wrote through a raw pointer, so autograd passed gradient to masked
    # logits as if nothing happened. Expected: exactly masked_fill_'s gradient.
    x, allowed, bitmask = _case()
    x.requires_grad_(True)
    logits = x * 1.0
    apply_token_bitmask_(logits, bitmask, backend=backend)
    # A plain sum: d/dlogits = 1 everywhere, so only the mask itself can zero the masked positions
    # (a softmax would hide the bug, its gradient at -inf is 0 anyway).
    (logits * 2.0).sum().backward()

    x_ref = x.detach().clone().requires_grad_(True)
    (_reference(x_ref * 1.0, allowed) * 2.0).sum().backward()
    assert torch.equal(x.grad == 0, x_ref.grad == 0)
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert bool((x.grad[~allowed] == 0).all())


def test_gradient_with_indices():
    x, allowed, bitmask = _case()
    x.requires_grad_(True)
    logits = x * 1.0
    apply_token_bitmask_(logits, bitmask, indices=[1])
    logits.sum().backward()
    assert bool((x.grad[1][~allowed[1]] == 0).all())
    assert bool((x.grad[0] == 1).all()) and bool((x.grad[2] == 1).all())


def test_leaf_requiring_grad_is_a_kcore_error():
    x, _, bitmask = _case()
    x.requires_grad_(True)
    before = x.detach().clone()
    with pytest.raises(InvalidInputError, match="leaf"):
        apply_token_bitmask_(x, bitmask)
    assert torch.equal(x.detach(), before)


def test_no_grad_mode_uses_kernel_on_leaf():
    x, allowed, bitmask = _case()
    x.requires_grad_(True)
    expect = _reference(x.detach(), allowed)
    with torch.no_grad():
        apply_token_bitmask_(x, bitmask)
    assert torch.equal(x.detach(), expect)


@pytest.mark.parametrize("make", [lambda: np.array([2, 0]), lambda: range(0, 3, 2), lambda: np.array([2, 0], np.int32)])
def test_indices_numpy_and_range(make):
    logits, allowed, bitmask = _case()
    indices = make()
    rows = [int(i) for i in indices]
    expect = logits.clone()
    expect[rows] = _reference(logits, allowed)[rows]
    apply_token_bitmask_(logits, bitmask, indices=indices)
    assert torch.equal(logits, expect)


def test_indices_bad_numpy():
    logits, _, bitmask = _case()
    with pytest.raises(InvalidInputError, match="indices"):
        apply_token_bitmask_(logits, bitmask, indices=np.array([0.5]))
    with pytest.raises(InvalidInputError, match="indices"):
        apply_token_bitmask_(logits, bitmask, indices=np.array([[0]]))
    with pytest.raises(InvalidInputError, match="indices"):
        apply_token_bitmask_(logits, bitmask, indices=np.array([3]))


@pytest.mark.parametrize("vocab_size", [-1, 2.0, None])
def test_bitmask_to_bool_bad_vocab_size(vocab_size):
    _, _, bitmask = _case()
    with pytest.raises(InvalidInputError, match="vocab_size"):
        bitmask_to_bool(bitmask, vocab_size)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_nan_and_inf_logits(backend):
    logits, allowed, bitmask = _case()
    logits[0, :50] = float("nan")
    logits[1, :50] = float("inf")
    expect = _reference(logits, allowed)
    apply_token_bitmask_(logits, bitmask, backend=backend)
    assert torch.equal(logits.isnan(), expect.isnan())
    assert torch.equal(logits.nan_to_num(0.0), expect.nan_to_num(0.0))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_zero_size(backend):
    apply_token_bitmask_(torch.empty(0, VOCAB), torch.empty(0, 4, dtype=torch.int32), backend=backend)
    apply_token_bitmask_(torch.empty(3, 0), torch.empty(3, 0, dtype=torch.int32), backend=backend)


def test_trie_bitmask_on_padded_logits(tmp_path):
    # The trie's vocab (tokenizer) is narrower than the logits (padded embeddings): a bitmask
    # allocated for the logits' width, filled by the trie, masks the padding tokens too.
    from kcore import FactTrie
    from kcore.ops.bitmask import allocate_token_bitmask

    trie = FactTrie.build([[1, 2], [3, 40], [99]], tmp_path / "t.ktrie", vocab_size=100, progress=False)
    logits = torch.zeros(2, 160)
    bitmask = allocate_token_bitmask(2, 160)
    trie.fill_bitmask([trie.root_state, trie.state_of([3])], bitmask)
    apply_token_bitmask_(logits, bitmask)
    assert torch.isfinite(logits[0]).nonzero().flatten().tolist() == [1, 3, 99]
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [40]
    with pytest.raises(InvalidInputError, match="narrower"):
        apply_token_bitmask_(torch.zeros(2, 160), torch.zeros(2, 4, dtype=torch.int32))
