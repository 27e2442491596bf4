"""Edge cases of kcore.ops.memory_attention / merge_attention_states found by review: every bad
input is a clear InvalidInputError, good edge inputs equal the torch reference / hand formula."""

from __future__ import annotations

import math

import pytest
import torch

from kcore.errors import InvalidInputError
from kcore.ops.memory_attention import memory_attention, merge_attention_states

BACKENDS = ["cpu", "torch"]


def _inputs(b=2, hq=4, lq=3, hkv=2, m=10, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, lq, d, generator=g), torch.randn(hkv, m, d, generator=g),
            torch.randn(hkv, m, d, generator=g))


def test_package_level_name_is_callable():
    # `from kcore.ops import memory_attention` must give the op, not a submodule of that name.
    from kcore.ops import memory_attention as op

    q, k, v = _inputs()
    assert op is memory_attention
    out, lse, idx = op(q, k, v, topk=3, backend="torch")
    ref = memory_attention(q, k, v, topk=3, backend="torch")
    torch.testing.assert_close(out, ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["batch", "q_len"])
def test_empty_query_gives_empty_results(backend, where):
    q, k, v = _inputs()
    q = q[:0] if where == "batch" else q[:, :, :0]
    out, lse, idx = memory_attention(q, k, v, topk=3, backend=backend)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and idx.shape == (*q.shape[:3], 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_head_dim_is_an_error(backend):
    q, k, v = _inputs()
    with pytest.raises(InvalidInputError, match="head_dim"):
        memory_attention(q[..., :0], k[..., :0], v[..., :0], topk=2, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_query_is_an_error(backend, bad):
    q, k, v = _inputs()
    q[1, 2, 0, 5] = bad
    with pytest.raises(InvalidInputError, match="query must be finite"):
        memory_attention(q, k, v, topk=3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_keys_are_an_error(backend, bad):
    q, k, v = _inputs()
    k[1, 4, 3] = bad
    with pytest.raises(InvalidInputError, match="mem_keys must be finite"):
        memory_attention(q, k, v, topk=3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_int8_scales_are_an_error(backend):
    q, _, _ = _inputs()
    k8 = torch.randint(-127, 128, (2, 10, 16), dtype=torch.int8)
    ks, vs = torch.rand(2, 10) + 0.01, torch.rand(2, 10) + 0.01
    vs[0, 3] = math.nan
    with pytest.raises(InvalidInputError, match="mem_value_scales must be finite"):
        memory_attention(q, k8, k8, topk=3, mem_key_scales=ks, mem_value_scales=vs, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["a", None.__class__, True])
def test_bad_scale_type_is_an_error(backend, scale):
    q, k, v = _inputs()
    with pytest.raises(InvalidInputError, match="scale"):
        memory_attention(q, k, v, topk=3, scale=scale, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_larger_than_memory_and_non_contiguous_match_reference(backend):
    q, k, v = _inputs(m=5)
    qn = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    kn = k.transpose(0, 1).contiguous().transpose(0, 1)
    out, lse, idx = memory_attention(qn, kn, v, topk=50, backend=backend)
    # Hand formula: every memory of the KV head attended (selection is irrelevant when k >= mem_len).
    kv = torch.arange(4) // 2
    logits = torch.einsum("bhld,hmd->bhlm", q, k[kv]) / 4.0
    ref = torch.einsum("bhlm,hmd->bhld", torch.softmax(logits, -1), v[kv])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)
    assert idx.shape[-1] == 5 and sorted(idx[0, 0, 0].tolist()) == list(range(5))


def test_merge_rejects_nan_and_plus_inf_lse():
    o = torch.randn(2, 3, 4)
    for bad in (math.nan, math.inf):
        with pytest.raises(InvalidInputError, match="lse_b"):
            merge_attention_states(o, torch.zeros(2, 3), o, torch.full((2, 3), bad))


def test_merge_rejects_zero_dim_outputs():
    with pytest.raises(InvalidInputError, match="head_dim"):
        merge_attention_states(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(0.0))


def test_merge_both_empty_and_one_empty():
    oa, ob = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    ninf = torch.full((2, 3), -math.inf)
    out, lse = merge_attention_states(oa, ninf, ob, ninf)
    assert torch.equal(out, torch.zeros_like(oa)) and torch.equal(lse, ninf)
    lb = torch.randn(2, 3)
    out, lse = merge_attention_states(oa, ninf, ob, lb)
    torch.testing.assert_close(out, ob)
    torch.testing.assert_close(lse, lb)
