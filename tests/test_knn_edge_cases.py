"""Edge cases of kcore.ops.knn_search / knn_interpolate found by review (each failed before its fix)."""

import numpy as np
import pytest
import torch

from kcore.errors import InvalidInputError
from kcore.ops import knn_interpolate, knn_search


def _logits_and_neighbours(batch=3, vocab=40, k=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    lm = torch.randn(batch, vocab, generator=g)
    dists = torch.rand(batch, k, generator=g) * 5
    values = torch.randint(0, vocab, (batch, k), generator=g)
    return lm, dists, values


def test_search_accepts_numpy_integer_k():
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(2, 8, generator=g), torch.randn(30, 8, generator=g)
    d_np, i_np = knn_search(q, keys, np.int64(4), backend="cpu")
    d_ref, i_ref = knn_search(q, keys, 4, backend="torch")
    assert d_np.shape == (2, 4)
    torch.testing.assert_close(d_np, d_ref)
    assert torch.equal(i_np, i_ref)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_expanded_keys_stride_zero(metric):
    # keys.expand(...) has row stride 0: a valid layout the docstring allows (last dim contiguous).
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 16, generator=g)
    keys = torch.randn(1, 16, generator=g).expand(50, 16)
    d, i = knn_search(q, keys, 5, metric=metric, backend="cpu")
    d_ref, _ = knn_search(q, keys.contiguous(), 5, metric=metric, backend="torch")
    torch.testing.assert_close(d, d_ref)
    assert bool(((i >= 0) & (i < 50)).all())


def test_search_k_zero_and_bool_rejected():
    q, keys = torch.randn(1, 4), torch.randn(5, 4)
    for bad in (0, -1, True, 2.0):
        with pytest.raises(InvalidInputError, match="k must be"):
            knn_search(q, keys, bad)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_interpolate_expanded_logits(backend):
    lm, dists, values = _logits_and_neighbours()
    expanded = lm[:1].expand(3, -1)
    out = knn_interpolate(expanded, dists, values, lmbda=0.3, temperature=2.0, backend=backend)
    ref = knn_interpolate(expanded.contiguous(), dists, values, lmbda=0.3, temperature=2.0, backend="torch")
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_interpolate_numpy_scalar_hyperparameters(backend):
    lm, dists, values = _logits_and_neighbours()
    out = knn_interpolate(lm, dists, values, lmbda=np.float32(0.25), temperature=np.float64(2.0), backend=backend)
    ref = knn_interpolate(lm, dists, values, lmbda=0.25, temperature=2.0, backend="torch")
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("bad", ["nan", "inf", "all_neg_inf"])
@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_interpolate_non_finite_logits_row_is_an_error(backend, bad, lmbda):
    lm, dists, values = _logits_and_neighbours()
    if bad == "nan":
        lm[1, 7] = float("nan")
    elif bad == "inf":
        lm[1, 7] = float("inf")
    else:
        lm[1] = float("-inf")
    with pytest.raises(InvalidInputError, match="lm_logits row 1"):
        knn_interpolate(lm, dists, values, lmbda=lmbda, temperature=1.0, backend=backend)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_interpolate_lmbda_one_ignores_lm_side(backend):
    # lmbda = 1: the LM has weight 0, so even a NaN logit row gives p_knn exactly (no NaN).
    lm, dists, values = _logits_and_neighbours()
    lm[0] = float("nan")
    out = knn_interpolate(lm, dists, values, lmbda=1.0, temperature=1.0, backend=backend)
    assert not bool(out.isnan().any())
    probs = out.exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(3))
    # row 0: p_knn(w) = sum over neighbours with token w of softmax(-d)
    w = torch.softmax(-dists[0], 0)
    expect = torch.zeros(40).index_add_(0, values[0], w)
    torch.testing.assert_close(probs[0], expect)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_interpolate_masked_logits_are_fine(backend):
    # -inf logits (tokens masked by a constrained decoder) are legitimate input.
    lm, dists, values = _logits_and_neighbours()
    lm[:, ::2] = float("-inf")
    out = knn_interpolate(lm, dists, values, lmbda=0.5, temperature=1.0, backend=backend)
    assert not bool(out.isnan().any())
    torch.testing.assert_close(torch.logsumexp(out, -1), torch.zeros(3), atol=1e-5, rtol=0)


def test_interpolate_is_differentiable_under_autograd():
    # Before: the cpu backend returned a tensor without grad_fn, silently dropping the gradient.
    lm, dists, values = _logits_and_neighbours()
    lm.requires_grad_(True)
    out = knn_interpolate(lm, dists, values, lmbda=0.5, temperature=1.0, backend="cpu")
    assert out.requires_grad
    out[:, 3].sum().backward()
    lm_ref = lm.detach().clone().requires_grad_(True)
    knn_interpolate(lm_ref, dists, values, lmbda=0.5, temperature=1.0, backend="torch")[:, 3].sum().backward()
    torch.testing.assert_close(lm.grad, lm_ref.grad)
    with torch.no_grad():  # inference keeps the fused kernel
        assert not knn_interpolate(lm, dists, values, lmbda=0.5, temperature=1.0, backend="cpu").requires_grad


def test_concurrent_calls_from_threads_agree_with_reference():
    import threading

    g = torch.Generator().manual_seed(3)
    keys = torch.randn(5000, 32, generator=g).half()
    queries = [torch.randn(5, 32, generator=g) for _ in range(8)]
    expected = [knn_search(q, keys, 16, backend="torch") for q in queries]
    lm, dists, values = _logits_and_neighbours(batch=8, vocab=500, k=16, seed=3)
    expected_mix = knn_interpolate(lm, dists, values, lmbda=0.3, temperature=1.0, backend="torch")
    errors = []

    def worker(i):
        for _ in range(5):
            d, ids = knn_search(queries[i], keys, 16, backend="cpu")
            if not torch.allclose(d, expected[i][0], rtol=1e-4, atol=1e-4):
                errors.append(("search", i))
            mix = knn_interpolate(lm, dists, values, lmbda=0.3, temperature=1.0, backend="cpu")
            if not torch.allclose(mix, expected_mix, atol=1e-5, rtol=1e-5):
                errors.append(("interpolate", i))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("temperature", [1e-30, 1e-20, 1e-6])
def test_interpolate_tiny_temperature_cpu_matches_reference(temperature):
    # Scores of -dist / T near 1e30: the exact path must add log(lmbda) after making scores
    # relative to their max, or rounding returns log-probs above 0 (found by review).
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    dists = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    values = torch.tensor([[1, 2, 1], [4, 5, -1]])
    ref = knn_interpolate(logits, dists, values, lmbda=0.5, temperature=temperature, backend="torch")
    got = knn_interpolate(logits, dists, values, lmbda=0.5, temperature=temperature, backend="cpu")
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    assert float(got.max()) <= 0.0
