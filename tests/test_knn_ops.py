"""kcore.ops.knn_search / knn_interpolate: every backend against independent float64 oracles.

kNN results are compared tie-aware (faiss style): neighbours at equal distance may come back in
any order, so a result is right when each returned id's true distance equals the returned
distance and the returned distances are the k best true distances, both within float32 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import kcore
from kcore.ops import knn_interpolate, knn_search

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


needs_triton = pytest.mark.skipif(not _triton_available(), reason="triton not installed")


# ----------------------------------------------------------------------------------------------
# knn_search
# ----------------------------------------------------------------------------------------------


def _oracle_scores(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """(num_queries, num_keys) float64 distances (l2, squared) or inner products (ip)."""
    q, x = queries.double(), keys.double()
    if metric == "ip":
        return q @ x.T
    return ((q[:, None, :] - x[None, :, :]) ** 2).sum(-1) if x.shape[0] * q.shape[0] < 200_000 else (
        (q * q).sum(1, keepdim=True) - 2 * q @ x.T + (x * x).sum(1)[None, :]
    )


def check_knn(queries, keys, k, metric, dists, ids):
    nq, n = queries.shape[0], keys.shape[0]
    assert dists.shape == (nq, k) and ids.shape == (nq, k)
    assert dists.dtype == torch.float32 and ids.dtype == torch.int64
    valid = min(k, n)
    pad = math.inf if metric == "l2" else -math.inf
    assert (ids[:, valid:] == -1).all()
    assert (dists[:, valid:] == pad).all()
    if valid == 0:
        return
    true = _oracle_scores(queries, keys, metric)  # (nq, n) float64
    q64, x64 = queries.double(), keys.double()
    # float32 rounding of the distance computation: relative to |q|^2 + |x|^2 (l2) or |q||x| (ip).
    qn, xn = (q64 * q64).sum(1), (x64 * x64).sum(1)
    scale = (qn + xn.max()) if metric == "l2" else (qn.sqrt() * xn.max().sqrt())
    tol = (4e-6 * scale + 1e-6)[:, None]
    got_ids = ids[:, :valid]
    assert ((got_ids >= 0) & (got_ids < n)).all()
    for r in range(nq):
        assert len(set(got_ids[r].tolist())) == valid, "duplicate ids"
    true_of_got = torch.gather(true, 1, got_ids)
    assert (true_of_got - dists[:, :valid].double()).abs().le(tol).all(), "returned distance != true distance"
    best = torch.topk(true, valid, dim=1, largest=(metric == "ip"), sorted=True).values
    assert (best - dists[:, :valid].double()).abs().le(tol).all(), "not the k best distances"
    step = dists[:, 1:valid].double() - dists[:, : valid - 1].double()
    if metric == "l2":
        assert (step >= -tol).all(), "not ascending"
    else:
        assert (step <= tol).all(), "not descending"


SEARCH_CASES = [
    # (num_queries, num_keys, dim, k)
    (1, 1000, 64, 32),
    (3, 10007, 80, 1024),
    (64, 1000, 576, 1024),  # k > num_keys: padding
    (1, 1, 576, 5),
    (3, 1, 80, 1),
    (64, 10007, 64, 32),
    (1, 10007, 576, 1024),
    (3, 1000, 576, 7),
    (2, 999, 72, 16),  # dim not a multiple of 16, odd key count
]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("case", SEARCH_CASES, ids=lambda c: "q{}-n{}-d{}-k{}".format(*c))
def test_knn_search_matches_oracle(backend, dtype, metric, case):
    nq, n, d, k = case
    g = torch.Generator().manual_seed(nq * 7919 + n * 31 + d)
    keys = torch.randn(n, d, generator=g).to(dtype)
    queries = torch.randn(nq, d, generator=g)
    dists, ids = knn_search(queries, keys, k, metric=metric, backend=backend)
    check_knn(queries, keys.float(), k, metric, dists, ids)


@pytest.mark.parametrize("qdtype", DTYPES, ids=str)
def test_knn_search_cpu_query_dtypes_and_views(qdtype):
    g = torch.Generator().manual_seed(3)
    wide = torch.randn(500, 160, generator=g).half()
    keys = wide[:, 16:96]  # row stride 160 > dim 80
    queries = torch.randn(80, 4, generator=g).to(qdtype).T  # non-contiguous (4, 80)
    for metric in ("l2", "ip"):
        dists, ids = knn_search(queries, keys, 20, metric=metric, backend="cpu")
        check_knn(queries.float(), keys.float(), 20, metric, dists, ids)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("num_queries", [2, 8])  # 8: the bf16 bound-and-rescore path of the cpu backend
def test_knn_search_ties_and_duplicates(dtype, num_queries):
    keys = torch.zeros(5000, 64)
    keys[10:20] = 1.0  # ten identical keys
    keys[2000:4500] = 0.5  # many identical keys: the candidate buffers must grow
    keys = keys.to(dtype)
    queries = torch.ones(num_queries, 64)
    for backend in ("torch", "cpu"):
        dists, ids = knn_search(queries, keys, 12, backend=backend)
        check_knn(queries, keys.float(), 12, "l2", dists, ids)
        assert set(ids[0, :10].tolist()) == set(range(10, 20))
        assert torch.equal(dists[0, :10], torch.zeros(10))
        dists, ids = knn_search(queries * 0.5, keys, 3000, backend=backend)
        check_knn(queries * 0.5, keys.float(), 3000, "l2", dists, ids)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_knn_search_pads_missing_neighbours(backend):
    keys = torch.tensor([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0]])
    queries = torch.tensor([[0.9, 0.0]])
    dists, ids = knn_search(queries, keys, 5, backend=backend)
    assert ids.tolist() == [[1, 0, 2, -1, -1]]
    assert torch.allclose(dists[0, :3], torch.tensor([0.01, 0.81, 4.41]), atol=1e-6)
    assert dists[0, 3:].tolist() == [math.inf, math.inf]
    dists, ids = knn_search(queries, keys, 4, metric="ip", backend=backend)
    assert ids.tolist() == [[2, 1, 0, -1]]
    assert dists[0].tolist()[:3] == pytest.approx([2.7, 0.9, 0.0]) and dists[0, 3] == -math.inf
    dists, ids = knn_search(queries, keys[:0], 3, backend=backend)
    assert ids.tolist() == [[-1, -1, -1]] and dists.isinf().all()


def test_knn_search_memmap_keys_and_faiss(tmp_path):
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    arr = rng.standard_normal((3000, 80)).astype(np.float16)
    path = tmp_path / "keys.f16"
    mm = np.memmap(path, dtype=np.float16, mode="w+", shape=arr.shape)
    mm[:] = arr
    mm.flush()
    ro = np.memmap(path, dtype=np.float16, mode="r", shape=arr.shape)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that the read-only memmap is not writable
        keys = torch.from_numpy(ro)
    queries = torch.from_numpy(rng.standard_normal((5, 80)).astype(np.float32))
    for metric, index in (("l2", faiss.IndexFlatL2(80)), ("ip", faiss.IndexFlatIP(80))):
        index.add(arr.astype(np.float32))
        ref_d, _ = index.search(queries.numpy(), 50)
        dists, ids = knn_search(queries, keys, 50, metric=metric, backend="cpu")
        check_knn(queries, keys.float(), 50, metric, dists, ids)
        assert np.allclose(dists.numpy(), ref_d, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_knn_search_rejects_bad_input(backend):
    keys = torch.randn(10, 8)
    q = torch.randn(2, 8)
    bad_q = q.clone()
    bad_q[1, 3] = float("nan")
    with pytest.raises(kcore.InvalidInputError, match="finite"):
        knn_search(bad_q, keys, 3, backend=backend)
    bad_q[1, 3] = float("inf")
    with pytest.raises(kcore.InvalidInputError, match="finite"):
        knn_search(bad_q, keys, 3, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="k must be"):
        knn_search(q, keys, 0, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="k must be"):
        knn_search(q, keys, True, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="same dim"):
        knn_search(torch.randn(2, 9), keys, 3, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="keys must have dtype"):
        knn_search(q, keys.to(torch.int32), 3, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="queries must have 2 dims"):
        knn_search(q[0], keys, 3, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="metric"):
        knn_search(q, keys, 3, metric="cos", backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="backend"):
        knn_search(q, keys, 3, backend="gpu")


def test_knn_search_native_binding_checks_sizes():
    from kcore._native import native

    from kcore._native import tensor_arg

    q, keys = torch.randn(1, 8), torch.randn(2, 8)
    dists, ids = torch.empty(1, 1), torch.empty(1, 1, dtype=torch.int64)
    overlapping = (keys.data_ptr(), 0, (2, 8), (4, 1), -1)  # row stride 4 < dim 8
    with pytest.raises(kcore.InvalidInputError, match="row stride"):
        native().knn_search(tensor_arg(q), overlapping, 1, 0, tensor_arg(dists), tensor_arg(ids))
    with pytest.raises(kcore.InvalidInputError, match="element type code 9"):
        native().knn_search(tensor_arg(q), (keys.data_ptr(), 9, (2, 8), (8, 1), -1), 1, 0, tensor_arg(dists), tensor_arg(ids))
    with pytest.raises(kcore.InvalidInputError, match="keys must have dtype"):
        native().knn_search(tensor_arg(q), tensor_arg(keys.to(torch.int32)), 1, 0, tensor_arg(dists), tensor_arg(ids))
    with pytest.raises(kcore.InvalidInputError, match="out_ids must have shape \\(1, 2\\)"):
        native().knn_search(tensor_arg(q), tensor_arg(keys), 2, 0, tensor_arg(torch.empty(1, 2)), tensor_arg(ids))


# ----------------------------------------------------------------------------------------------
# knn_interpolate
# ----------------------------------------------------------------------------------------------


def oracle_interpolate(lm_logits, dists, values, lmbda, temperature, metric):
    """float64 numpy, log space per token, row by row (independent of the implementations)."""
    logits = lm_logits.double().numpy()
    d = dists.double().numpy()
    v = values.long().numpy()
    batch, vocab = logits.shape
    out = np.empty((batch, vocab))
    for b in range(batch):
        m = logits[b].max()
        lm = logits[b] - (m + np.log(np.exp(logits[b] - m).sum()))
        valid = v[b] >= 0
        if not valid.any():
            out[b] = lm
            continue
        s = (-d[b][valid] if metric == "l2" else d[b][valid]) / temperature
        toks = v[b][valid]
        lse = np.logaddexp.reduce(s)
        knn = np.full(vocab, -np.inf)
        for t in np.unique(toks):
            knn[t] = np.logaddexp.reduce(s[toks == t]) - lse
        with np.errstate(divide="ignore"):
            out[b] = np.logaddexp(np.log1p(-lmbda) + lm, np.log(lmbda) + knn)
    return torch.from_numpy(out)


def _interp_inputs(batch, vocab, k, logits_dtype, values_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, vocab, generator=g) * 3).to(logits_dtype)
    dists = torch.rand(batch, k, generator=g) * 50
    values = torch.randint(0, vocab, (batch, k), generator=g)
    values[:, ::5] = 7  # repeated token among neighbours
    values[:, 1::9] = values[:, 2::9][:, : values[:, 1::9].shape[1]]
    if batch > 1:
        values[1, : k // 2] = -1  # padded neighbours
        dists[1, : k // 2] = math.inf
    if batch > 2:
        values[2] = -1  # a row without neighbours
        dists[2] = math.inf
    return logits, dists, values.to(values_dtype)


def check_interp(out, ref, atol):
    assert out.dtype == torch.float32 and out.shape == ref.shape
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), "-inf pattern differs"
    assert (out[~fin] == -math.inf).all()
    # float32 output: allow a few ulps of large log-probabilities on top of atol
    excess = (out[fin].double() - ref[fin]).abs() - (atol + 5e-7 * ref[fin].abs())
    assert (excess <= 0).all(), f"error exceeds tolerance by {excess.max().item()}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("logits_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lmbda", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_knn_interpolate_matches_oracle(backend, logits_dtype, lmbda, metric):
    logits, dists, values = _interp_inputs(4, 49152, 1024, logits_dtype, torch.int64, seed=5)
    out = knn_interpolate(logits, dists, values, lmbda=lmbda, temperature=7.0, metric=metric, backend=backend)
    check_interp(out, oracle_interpolate(logits.float(), dists, values, lmbda, 7.0, metric), atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_knn_interpolate_edge_cases(backend):
    logits, dists, values = _interp_inputs(5, 1001, 33, torch.float32, torch.int32, seed=9)
    # lmbda 0: exactly the LM's log_softmax (up to rounding of the log-sum-exp)
    out = knn_interpolate(logits, dists, values, lmbda=0.0, temperature=1.0, backend=backend)
    lm_logp = torch.log_softmax(logits.double(), -1)
    assert torch.allclose(out.double(), lm_logp, atol=4e-6, rtol=0)
    # lmbda 1: the kNN distribution alone, -inf on tokens no neighbour has
    out = knn_interpolate(logits, dists, values, lmbda=1.0, temperature=3.0, backend=backend)
    check_interp(out, oracle_interpolate(logits, dists, values, 1.0, 3.0, "l2"), atol=2e-5)
    assert (out[0].exp().sum() - 1).abs() < 1e-5
    assert torch.allclose(out[2].double(), lm_logp[2], atol=4e-6, rtol=0)  # row without neighbours
    # far neighbours: p_knn underflows in float32 but the per-token log-sum-exp stays finite
    far = dists.clone()
    far[0, 3:] = 5000.0
    out = knn_interpolate(logits, far, values, lmbda=1.0, temperature=1.0, backend=backend)
    check_interp(out, oracle_interpolate(logits, far, values, 1.0, 1.0, "l2"), atol=2e-5)
    # every neighbour on one token: that token gets log(lmbda + (1 - lmbda) p_lm)
    same = torch.where(values >= 0, 42, -1).to(values.dtype)
    out = knn_interpolate(logits, dists, same, lmbda=0.5, temperature=2.0, backend=backend)
    p_lm = torch.softmax(logits.double(), -1)[:, 42]
    has = (same >= 0).any(1)
    assert torch.allclose(out[has, 42].double(), torch.log(0.5 + 0.5 * p_lm[has]), atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_knn_interpolate_rejects_bad_input(backend):
    logits, dists, values = _interp_inputs(2, 100, 8, torch.float32, torch.int64, seed=1)
    kw = dict(temperature=1.0, backend=backend)
    bad = values.clone()
    bad[0, 0] = 100
    with pytest.raises(kcore.InvalidInputError, match="token ids"):
        knn_interpolate(logits, dists, bad, lmbda=0.5, **kw)
    bad[0, 0] = -2
    with pytest.raises(kcore.InvalidInputError, match="token ids"):
        knn_interpolate(logits, dists, bad, lmbda=0.5, **kw)
    nan_d = dists.clone()
    nan_d[0, 2] = float("nan")
    with pytest.raises(kcore.InvalidInputError, match="finite"):
        knn_interpolate(logits, nan_d, values, lmbda=0.5, **kw)
    with pytest.raises(kcore.InvalidInputError, match="lmbda"):
        knn_interpolate(logits, dists, values, lmbda=1.5, **kw)
    with pytest.raises(kcore.InvalidInputError, match="temperature"):
        knn_interpolate(logits, dists, values, lmbda=0.5, temperature=0.0, backend=backend)
    with pytest.raises(kcore.InvalidInputError, match="must agree"):
        knn_interpolate(logits, dists[:, :4], values, lmbda=0.5, **kw)
    with pytest.raises(kcore.InvalidInputError, match="dists must have dtype"):
        knn_interpolate(logits, dists.half(), values, lmbda=0.5, **kw)
    with pytest.raises(kcore.InvalidInputError, match="values must have dtype"):
        knn_interpolate(logits, dists, values.float(), lmbda=0.5, **kw)


def test_knn_interpolate_pipeline_with_search():
    """knn_search output feeds knn_interpolate directly, padding included (k > num_keys)."""
    g = torch.Generator().manual_seed(11)
    keys = torch.randn(20, 64, generator=g).half()
    token_of_key = torch.randint(0, 500, (20,), generator=g)
    queries = torch.randn(3, 64, generator=g)
    dists, ids = knn_search(queries, keys, 32)
    values = torch.where(ids >= 0, token_of_key[ids.clamp_min(0)], torch.full_like(ids, -1))
    logits = torch.randn(3, 500, generator=g)
    out = knn_interpolate(logits, dists, values, lmbda=0.3, temperature=10.0)
    check_interp(out, oracle_interpolate(logits, dists, values, 0.3, 10.0, "l2"), atol=2e-5)


def test_knn_custom_ops_opcheck():
    g = torch.Generator().manual_seed(2)
    keys, q = torch.randn(40, 16, generator=g), torch.randn(3, 16, generator=g)
    torch.library.opcheck(torch.ops.kcore.knn_search.default, (q, keys, 5, "l2", "cpu"))
    logits, dists, values = _interp_inputs(3, 50, 6, torch.float32, torch.int64, seed=4)
    torch.library.opcheck(torch.ops.kcore.knn_interpolate.default, (logits, dists, values, 0.25, 2.0, "l2", "cpu"))


# ----------------------------------------------------------------------------------------------
# triton (interpreter on CPU: small sizes only)
# ----------------------------------------------------------------------------------------------


TRITON_SEARCH_CASES = [
    # (num_queries, num_keys, dim, k, key dtype, metric): the interpreter is slow, sizes are small
    (1, 300, 64, 8, torch.float16, "l2"),  # several tiles per chunk and several chunks
    (3, 50, 80, 100, torch.bfloat16, "ip"),  # k > num_keys: padding; dim not a tile multiple
    (2, 40, 72, 1, torch.float32, "l2"),
    (4, 130, 64, 16, torch.float32, "ip"),
]


@needs_triton
@pytest.mark.parametrize("case", TRITON_SEARCH_CASES, ids=lambda c: "q{}-n{}-d{}-k{}-{}-{}".format(*c))
def test_knn_search_triton(case):
    nq, n, d, k, dtype, metric = case
    g = torch.Generator().manual_seed(n + d)
    keys = torch.randn(n, d, generator=g).to(dtype)
    queries = torch.randn(nq, d, generator=g)
    dists, ids = knn_search(queries, keys, k, metric=metric, backend="triton")
    check_knn(queries, keys.float(), k, metric, dists, ids)


@needs_triton
@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("lmbda", [0.0, 0.25, 1.0])
def test_knn_interpolate_triton(logits_dtype, lmbda):
    logits, dists, values = _interp_inputs(3, 1001, 40, logits_dtype, torch.int64, seed=8)
    out = knn_interpolate(logits, dists, values, lmbda=lmbda, temperature=5.0, backend="triton")
    check_interp(out, oracle_interpolate(logits.float(), dists, values, lmbda, 5.0, "l2"), atol=2e-5)
    out = knn_interpolate(logits, dists, values.int(), lmbda=lmbda, temperature=5.0, metric="ip", backend="triton")
    check_interp(out, oracle_interpolate(logits.float(), dists, values, lmbda, 5.0, "ip"), atol=2e-5)


@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_triton_cuda_matches_reference():
    """On a GPU: the triton backend on CUDA tensors (auto picks it) against the fp32 oracle."""
    g = torch.Generator().manual_seed(21)
    for dtype in (torch.float16, torch.bfloat16):
        keys = torch.randn(3000, 576, generator=g).to(dtype)
        queries = torch.randn(5, 576, generator=g)
        for metric, k in (("l2", 40), ("ip", 1024)):
            dists, ids = knn_search(queries.cuda(), keys.cuda(), k, metric=metric)
            check_knn(queries, keys.float(), k, metric, dists.cpu(), ids.cpu())
    logits, dists, values = _interp_inputs(4, 49152, 1024, torch.bfloat16, torch.int64, seed=3)
    out = knn_interpolate(logits.cuda(), dists.cuda(), values.cuda(), lmbda=0.25, temperature=7.0)
    check_interp(out.cpu(), oracle_interpolate(logits.float(), dists, values, 0.25, 7.0, "l2"), atol=2e-5)
