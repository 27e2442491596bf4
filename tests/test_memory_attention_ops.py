"""kcore.ops.memory_attention / merge_attention_states: every backend against the torch reference
and against independent oracles (a per-query loop, plain attention, one concatenated softmax)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from kcore.errors import BackendUnavailableError, InvalidInputError
from kcore.ops._dispatch import triton_usable
from kcore.ops.memory_attention import (
    _memory_attention_torch,
    memory_attention,
    memory_attention_joint_reference,
    merge_attention_states,
    normalize_keys,
)

DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _backends():
    out = [pytest.param("torch", id="torch"), pytest.param("cpu", id="cpu")]
    out.append(
        pytest.param(
            "triton",
            id="triton",
            marks=pytest.mark.skipif(not triton_usable(DEVICE), reason="triton needs a GPU or TRITON_INTERPRET=1"),
        )
    )
    return out


BACKENDS = _backends()


def _interpreted(backend):
    """Triton's CPU interpreter runs each program in numpy: tests shrink their sizes for it."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def _device(backend):
    return torch.device("cpu") if backend == "cpu" else DEVICE


def _make(b, hq, hkv, lq, d, m, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, d, generator=g)
    k = torch.randn(hkv, m, d, generator=g)
    v = torch.randn(hkv, m, d, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _assert_same_selection(q, keys, ref_idx, got_idx, eps=1e-4):
    """Selected sets equal, except where near-equal similarities (within eps of the k-th) swap."""
    assert ref_idx.shape == got_idx.shape
    if ref_idx.shape[-1] == 0:
        return
    same = (ref_idx.sort(-1).values == got_idx.sort(-1).values).all(-1)
    if bool(same.all()):
        return
    hq, hkv = q.shape[1], keys.shape[0]
    kn = normalize_keys(keys).float()
    kv = (torch.arange(hq, device=q.device) // (hq // hkv)).view(1, hq, 1, 1)
    qf = q.float().unsqueeze(-2)

    def sims(idx):
        return (qf * kn[kv, idx.clamp_min(0)]).sum(-1) / q.float().norm(dim=-1, keepdim=True)

    kth = sims(ref_idx).min(-1).values
    got_min = sims(got_idx).min(-1).values
    bad = ~same & (got_min < kth - eps)
    assert not bool(bad.any()), f"{int(bad.sum())} (query, head) rows select memories below the k-th similarity"


def _tolerance(q, k, v, topk, ref_out, **kw):
    """Error bound for a low-precision backend: twice what plain torch makes in the same precision
    against the float32 reference (flash-attention's policy), plus a small floor."""
    if q.dtype == torch.float32:
        return 2e-5
    kn = normalize_keys(k)
    low, _, _ = _memory_attention_torch(q, k, v, kn, topk, 1 / math.sqrt(q.shape[-1]), None, compute_dtype=q.dtype)
    return 2 * (low.float() - ref_out.float()).abs().max().item() + 1e-4


def _reference(q, k, v, topk, **kw):
    """float32 torch reference on the same (possibly low-precision) inputs, ranking with the same
    normalised keys the backends use (normalize_keys rounds them to the bank's dtype)."""
    kn = normalize_keys(k).float()
    return memory_attention(q.float(), k.float(), v.float(), topk=topk, mem_keys_normed=kn, backend="torch", **kw)


CASES = [  # batch, q heads, kv heads, q_len, head_dim, mem_len, topk
    (1, 9, 3, 1, 64, 1000, 10),  # SmolLM2 decode
    (2, 4, 2, 3, 80, 37, 5),  # head_dim 80, prefill, batch 2
    (1, 2, 2, 1, 64, 1, 4),  # one memory, topk > mem_len
    (3, 8, 1, 2, 64, 300, 16),  # multi-query (one KV head)
    (1, 4, 4, 5, 128, 200, 32),  # topk 32, head_dim 128
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_backend_matches_reference(backend, dtype, case):
    b, hq, hkv, lq, d, m, topk = case
    if _interpreted(backend) and (dtype == torch.bfloat16 or b * lq > 4):
        pytest.skip("bf16 and larger batches run on a GPU only (interpreter time)")
    q, k, v = _make(b, hq, hkv, lq, d, m, dtype, _device(backend))
    out, lse, idx = memory_attention(q, k, v, topk=topk, backend=backend)
    ref_out, ref_lse, ref_idx = _reference(q, k, v, topk)
    k_eff = min(topk, m)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert idx.shape == (b, hq, lq, k_eff) and idx.dtype == torch.int64
    _assert_same_selection(q, k, ref_idx, idx)
    tol = _tolerance(q, k, v, topk, ref_out)
    assert (out.float() - ref_out).abs().max().item() <= tol
    assert torch.allclose(lse, ref_lse, atol=max(tol, 1e-4), rtol=1e-4)


def _loop_oracle(q, k, v, topk, scale):
    """Per (batch, head, token) in plain Python loops: top-k by cosine, softmax over the k."""
    b, hq, lq, d = q.shape
    hkv = k.shape[0]
    out = torch.zeros(b, hq, lq, d, dtype=torch.float64)
    idx_all = []
    for bi in range(b):
        for h in range(hq):
            kv = h // (hq // hkv)
            for t in range(lq):
                qv = q[bi, h, t].double()
                cos = (k[kv].double() @ qv) / (k[kv].double().norm(dim=-1) * qv.norm())
                top = torch.argsort(cos, descending=True)[:topk]
                logits = (k[kv, top].double() @ qv) * scale
                out[bi, h, t] = torch.softmax(logits, 0) @ v[kv, top].double()
                idx_all.append(top)
    return out, torch.stack(idx_all).view(b, hq, lq, -1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_each_query_sees_its_own_memories(backend):
    b, lq = (1, 3) if _interpreted(backend) else (2, 7)
    q, k, v = _make(b, 6, 3, lq, 64, 120, device=_device(backend), seed=3)
    out, lse, idx = memory_attention(q, k, v, topk=4, scale=0.2, backend=backend)
    want_out, want_idx = _loop_oracle(q.cpu(), k.cpu(), v.cpu(), 4, 0.2)
    assert torch.equal(idx.cpu(), want_idx)
    torch.testing.assert_close(out.cpu().double(), want_out, atol=2e-5, rtol=0)
    # Different tokens of one head do pick different memories (the selection is per query).
    assert not torch.equal(idx[0, 0, 0], idx[0, 0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_larger_than_memory_is_plain_attention(backend):
    q, k, v = _make(1, 4, 2, 2, 64, 6, device=_device(backend), seed=5)
    out, lse, idx = memory_attention(q, k, v, topk=50, backend=backend)
    assert idx.shape[-1] == 6
    assert torch.equal(idx.sort(-1).values.cpu(), torch.arange(6).expand(1, 4, 2, 6))
    kr, vr = k.repeat_interleave(2, 0).unsqueeze(0), v.repeat_interleave(2, 0).unsqueeze(0)
    logits = q @ kr.transpose(-1, -2) / 8.0
    torch.testing.assert_close(out, torch.softmax(logits, -1) @ vr, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), atol=2e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_sorted_by_similarity(backend):
    q, k, v = _make(1, 4, 2, 3, 64, 500, device=_device(backend), seed=7)
    _, _, idx = memory_attention(q, k, v, topk=12, backend=backend)
    kn = normalize_keys(k)
    kv = (torch.arange(4, device=q.device) // 2).view(1, 4, 1, 1)
    sims = (q.unsqueeze(-2) * kn[kv, idx]).sum(-1)
    assert bool((sims[..., :-1] >= sims[..., 1:] - 1e-6).all())


def _context_attention(q, kc, vc, scale, causal=True):
    g = q.shape[1] // kc.shape[1]
    kr, vr = kc.repeat_interleave(g, 1).float(), vc.repeat_interleave(g, 1).float()
    logits = q.float() @ kr.transpose(-1, -2) * scale
    lq, s = q.shape[2], kc.shape[2]
    if causal:
        mask = torch.arange(s, device=q.device)[None, :] > (torch.arange(lq, device=q.device) + s - lq)[:, None]
        logits = logits.masked_fill(mask, -math.inf)
    return torch.softmax(logits, -1) @ vr, torch.logsumexp(logits, -1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("mem_len", [0, 1, 37, 1000])
def test_fused_plus_merge_equals_joint_softmax(backend, dtype, mem_len):
    """The anchor's semantics: context and memory logits in one softmax (causal context)."""
    dev = _device(backend)
    b, lq = (1, 2) if _interpreted(backend) else (2, 4)
    q, k, v = _make(b, 9, 3, lq, 64, mem_len, dtype, dev, seed=11)
    g = torch.Generator().manual_seed(12)
    kc = torch.randn(b, 3, 10, 64, generator=g).to(dev, dtype)
    vc = torch.randn(b, 3, 10, 64, generator=g).to(dev, dtype)
    scale = 1 / 8.0
    out_m, lse_m, idx = memory_attention(q, k, v, topk=8, backend=backend)
    assert idx.shape[-1] == min(8, mem_len)
    out_c, lse_c = _context_attention(q, kc, vc, scale)
    out, lse = merge_attention_states(out_c, lse_c, out_m.float(), lse_m)
    want = memory_attention_joint_reference(
        q.float(), kc.float(), vc.float(), k.float(), v.float(), topk=8, is_causal=True
    )
    assert not bool(torch.isnan(out).any())
    tol = 2e-5 if dtype == torch.float32 else _tolerance(q, k, v, 8, _reference(q, k, v, 8)[0]) if mem_len else 1e-6
    assert (out - want).abs().max().item() <= tol
    if mem_len == 0:  # empty memory: exactly plain causal attention
        assert torch.equal(out, out_c) and torch.equal(lse, lse_c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_memory(backend):
    q, k, v = _make(2, 4, 2, 3, 64, 0, device=_device(backend))
    out, lse, idx = memory_attention(q, k, v, topk=5, backend=backend)
    assert torch.equal(out, torch.zeros_like(q))
    assert bool(torch.isneginf(lse).all()) and lse.shape == (2, 4, 3)
    assert idx.shape == (2, 4, 3, 0) and idx.dtype == torch.int64


@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_threshold_drops_memories(backend):
    q, k, v = _make(1, 4, 2, 3, 64, 200, device=_device(backend), seed=13)
    out, lse, idx = memory_attention(q, k, v, topk=10, similarity_threshold=0.25, backend=backend)
    ref_out, ref_lse, ref_idx = _reference(q, k, v, 10, similarity_threshold=0.25)
    assert bool((idx == -1).any()) and bool((idx >= 0).any())  # the threshold is active here
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=0)
    # Nothing passes a threshold of 1: zeros and -inf, no NaN.
    out, lse, idx = memory_attention(q, k, v, topk=10, similarity_threshold=1.0, backend=backend)
    assert torch.equal(out, torch.zeros_like(q)) and bool(torch.isneginf(lse).all()) and bool((idx == -1).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    """HF passes transposed query views; banks may be slices of a larger buffer."""
    dev = _device(backend)
    g = torch.Generator().manual_seed(17)
    q = torch.randn(1, 3, 6, 64, generator=g).to(dev).transpose(1, 2)  # (1, 6, 3, 64) view
    big_k = torch.randn(3, 90, 80, generator=g).to(dev)
    big_v = torch.randn(3, 90, 80, generator=g).to(dev)
    k, v = big_k[:, 10:, :64], big_v[:, 10:, 16:]
    out, lse, idx = memory_attention(q, k, v, topk=7, backend=backend)
    ref = _reference(q.contiguous(), k.contiguous(), v.contiguous(), 7)
    assert torch.equal(idx, ref[2])
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=0)


def test_given_normed_keys_are_used_for_ranking():
    q, k, v = _make(1, 2, 1, 1, 64, 50, seed=19)
    fake_normed = torch.zeros_like(k)
    fake_normed[0, 42] = q[0, 0, 0] / q[0, 0, 0].norm()  # only memory 42 matches query head 0
    for backend in ("torch", "cpu"):
        _, _, idx = memory_attention(q, k, v, topk=1, mem_keys_normed=fake_normed, backend=backend)
        assert idx[0, 0, 0, 0].item() == 42


def test_merge_attention_states_exact_and_inf():
    g = torch.Generator().manual_seed(23)
    la, lb = torch.randn(2, 3, 4, 6, generator=g), torch.randn(2, 3, 4, 9, generator=g)
    va, vb = torch.randn(2, 3, 6, 16, generator=g), torch.randn(2, 3, 9, 16, generator=g)
    oa, ob = torch.softmax(la, -1) @ va, torch.softmax(lb, -1) @ vb
    out, lse = merge_attention_states(oa, torch.logsumexp(la, -1), ob, torch.logsumexp(lb, -1))
    joint = torch.cat([la, lb], -1)
    torch.testing.assert_close(out, torch.softmax(joint, -1) @ torch.cat([va, vb], -2), atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(joint, -1), atol=1e-6, rtol=0)
    ninf = torch.full((2, 3, 4), -math.inf)
    zeros = torch.zeros_like(oa)
    out, lse = merge_attention_states(oa, torch.logsumexp(la, -1), zeros, ninf)
    assert torch.equal(out, oa) and torch.equal(lse, torch.logsumexp(la, -1))
    out, lse = merge_attention_states(zeros, ninf, ob, torch.logsumexp(lb, -1))
    torch.testing.assert_close(out, ob, atol=0, rtol=0)
    out, lse = merge_attention_states(zeros, ninf, zeros, ninf)
    assert torch.equal(out, zeros) and bool(torch.isneginf(lse).all())
    # fp16 outputs keep their dtype; large lse gaps do not overflow.
    out, lse = merge_attention_states(oa.half(), torch.full((2, 3, 4), 1e4), ob.half(), torch.zeros(2, 3, 4))
    assert out.dtype == torch.float16 and torch.equal(out, oa.half())


def test_native_merge_equals_torch_formula():
    # The float32 CPU path is one C++ pass; the torch formula is the other backends' path.
    g = torch.Generator().manual_seed(29)
    oa, ob = torch.randn(3, 9, 5, 64, generator=g), torch.randn(3, 9, 5, 64, generator=g)
    la, lb = torch.randn(3, 9, 5, generator=g) * 20, torch.randn(3, 9, 5, generator=g) * 20
    la[0, :, 0] = -math.inf  # one side empty
    lb[1, :, 1] = -math.inf
    la[2, :, 2] = lb[2, :, 2] = -math.inf  # both empty
    la[2, 0, 3], lb[2, 0, 3] = 80.0, -80.0  # far apart: no overflow
    out, lse = merge_attention_states(oa, la, ob, lb, backend="cpu")
    ref_out, ref_lse = merge_attention_states(oa, la, ob, lb, backend="torch")
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    assert bool(torch.isneginf(lse[2, :, 2]).all()) and bool((out[2, :, 2] == 0).all())
    # Strided (non-contiguous) inputs give the same result.
    out_t, lse_t = merge_attention_states(oa.transpose(1, 2).contiguous().transpose(1, 2), la, ob, lb)
    assert torch.equal(out_t, out) and torch.equal(lse_t, lse)
    # With autograd recording the torch formula runs (the native pass has no backward).
    oa_g = oa.clone().requires_grad_()
    out_g, _ = merge_attention_states(oa_g, la, ob, lb)
    out_g.sum().backward()
    assert oa_g.grad is not None and torch.allclose(out_g.detach(), out, atol=1e-6)
    # A NaN or +inf lse is refused and named, on either side.
    for bad_side in ("a", "b"):
        bad = la.clone() if bad_side == "a" else lb.clone()
        bad[0, 0, 4] = math.nan if bad_side == "a" else math.inf
        args = (oa, bad, ob, lb) if bad_side == "a" else (oa, la, ob, bad)
        with pytest.raises(InvalidInputError, match=f"lse_{bad_side}"):
            merge_attention_states(*args)


def test_bad_inputs_raise_named_errors():
    q, k, v = _make(1, 4, 2, 1, 64, 10)
    with pytest.raises(InvalidInputError, match="query"):
        memory_attention(q[0], k, v, topk=2)
    with pytest.raises(InvalidInputError, match="num_q_heads"):
        memory_attention(q[:, :3], k, v, topk=2)
    with pytest.raises(InvalidInputError, match="head_dim"):
        memory_attention(q, k[..., :32], v[..., :32], topk=2)
    with pytest.raises(InvalidInputError, match="topk"):
        memory_attention(q, k, v, topk=0)
    with pytest.raises(InvalidInputError, match="mem_values"):
        memory_attention(q, k, v.half(), topk=2)
    with pytest.raises(InvalidInputError, match="mem_values"):
        memory_attention(q, k, v[:, :5], topk=2)
    with pytest.raises(InvalidInputError, match="mem_keys_normed"):
        memory_attention(q, k, v, topk=2, mem_keys_normed=k[:, :3])
    with pytest.raises(InvalidInputError, match="scale"):
        memory_attention(q, k, v, topk=2, scale=float("nan"))
    with pytest.raises(InvalidInputError, match="similarity_threshold"):
        memory_attention(q, k, v, topk=2, similarity_threshold=2.0)
    with pytest.raises(InvalidInputError, match="backend"):
        memory_attention(q, k, v, topk=2, backend="fast")
    with pytest.raises(InvalidInputError, match="lse_b"):
        merge_attention_states(q, q[..., 0], q, q[0, ..., 0])
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            memory_attention(q, k, v, topk=2, backend="cuda")


def _quantize_rows(x):
    scale = x.abs().amax(-1).clamp_min(1e-8) / 127.0
    return torch.round(x / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_bank_matches_dequantised_reference(backend):
    dev = _device(backend)
    q, k, v = _make(1, 9, 3, 2, 64, 300, device=dev, seed=29)
    kq, ks = _quantize_rows(k)
    vq, vs = _quantize_rows(v)
    k_deq, v_deq = kq.float() * ks.unsqueeze(-1), vq.float() * vs.unsqueeze(-1)
    kn = normalize_keys(k_deq)
    out, lse, idx = memory_attention(
        q, kq, vq, topk=6, mem_keys_normed=kn, mem_key_scales=ks, mem_value_scales=vs, backend=backend
    )
    ref = memory_attention(q, k_deq, v_deq, topk=6, mem_keys_normed=kn, backend="torch")
    assert torch.equal(idx, ref[2])
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, ref[1], atol=2e-5, rtol=0)


def test_int8_bank_argument_checks():
    q, k, v = _make(1, 4, 2, 1, 64, 10)
    kq, ks = _quantize_rows(k)
    vq, vs = _quantize_rows(v)
    with pytest.raises(InvalidInputError, match="mem_key_scales"):
        memory_attention(q, kq, vq, topk=2)
    with pytest.raises(InvalidInputError, match="mem_value_scales"):
        memory_attention(q, kq, vq, topk=2, mem_key_scales=ks, mem_value_scales=vs[:, :3])
    with pytest.raises(InvalidInputError, match="int8"):
        memory_attention(q, k, v, topk=2, mem_key_scales=ks, mem_value_scales=vs)
    # Without given normalised keys, the ranking uses the int8 rows' directions.
    out, _, idx = memory_attention(q, kq, vq, topk=3, mem_key_scales=ks, mem_value_scales=vs, backend="cpu")
    ref = memory_attention(q, kq, vq, topk=3, mem_key_scales=ks, mem_value_scales=vs, backend="torch")
    assert torch.equal(idx, ref[2])
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=0)


@pytest.mark.parametrize("threads", ["1", "4"])
def test_cpu_large_memory_split_over_threads(monkeypatch, threads):
    """Big enough that the C++ kernel splits the memory over threads and merges their top-k."""
    monkeypatch.setenv("KCORE_NUM_THREADS", threads)
    q, k, v = _make(1, 4, 2, 1, 64, 40000, seed=31)
    k[1, 39999] = q[0, 2, 0] * 3  # the best key of KV head 1 sits in the last split
    out, lse, idx = memory_attention(q, k, v, topk=12, backend="cpu")
    ref = memory_attention(q, k, v, topk=12, backend="torch")
    assert idx[0, 2, 0, 0].item() == 39999
    _assert_same_selection(q, k, ref[2], idx)
    torch.testing.assert_close(out, ref[0], atol=2e-5, rtol=0)
    torch.testing.assert_close(lse, ref[1], atol=2e-5, rtol=0)


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import kcore.kernels.memory_attention as km

select = dict(Q="*fp32", KN="*bf16", CAND_V="*fp32", CAND_I="*i32", nq="i32", mem_len="i32",
              keys_per_split="i32", num_splits="i32", stride_kh="i32", stride_km="i32")
select_c = dict(HEAD_DIM=128, TOPK=10, K_PAD=16, BLOCK_Q=4, BLOCK_N=32, BLOCK_D=32)
attend = dict(Q="*fp32", K="*i8", V="*i8", KS="*fp32", VS="*fp32", CAND_V="*fp32", CAND_I="*i32",
              OUT="*fp32", LSE="*fp32", IDX="*i64", nq="i32", mem_len="i32", num_cand="i32",
              stride_kh="i32", stride_km="i32", stride_vh="i32", stride_vm="i32", scale="fp32", min_cos="fp32")
attend_c = dict(USE_THRESHOLD=True, HAS_SCALES=True, HEAD_DIM=80, TOPK=10, K_PAD=16, C_PAD=256, D_PAD=128)
for fn, sig, const in ((km._select_kernel, select, select_c), (km._attend_kernel, attend, attend_c)):
    sig = {**sig, **{name: "constexpr" for name in const}}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm.get("cubin"), fn.__name__
print("compiled")
"""


def test_triton_kernels_compile_for_sm90():
    """The interpreter does not lower kernels; compile both for an H100/H200 (sm_90) ahead of
    time, which needs no GPU, so a kernel that only the interpreter accepts fails here. Runs in
    a subprocess: under TRITON_INTERPRET=1 (set by conftest) Triton cannot compile."""
    triton = pytest.importorskip("triton")
    if "nvidia" not in getattr(triton.backends, "backends", {}):
        pytest.skip("Triton's NVIDIA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# the op family: custom ops, merge backends, context attention
# ----------------------------------------------------------------------------------------------


def test_memory_attention_custom_ops_opcheck():
    q, k, v = _make(2, 4, 2, 3, 16, 40)
    kn = normalize_keys(k)
    torch.library.opcheck(torch.ops.kcore.memory_attention.default, (q, k, v, kn, None, None, 5, 0.25, None, "cpu"))
    torch.library.opcheck(torch.ops.kcore.memory_attention.default, (q, k, v, kn, None, None, 50, 0.25, 0.1, "torch"))
    k8, ks = torch.randint(-127, 128, (2, 40, 16), dtype=torch.int8), torch.rand(2, 40) / 100
    torch.library.opcheck(torch.ops.kcore.memory_attention.default, (q, k8, k8, kn, ks, ks, 5, 0.25, None, "cpu"))
    oa, ob = torch.randn(2, 4, 3, 16), torch.randn(2, 4, 3, 16)
    la, lb = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    for backend in ("cpu", "torch"):
        torch.library.opcheck(torch.ops.kcore.merge_attention_states.default, (oa, la, ob, lb, backend))


def test_memory_attention_under_torch_compile():
    q, k, v = _make(1, 4, 2, 1, 16, 30)
    kn = normalize_keys(k)

    def step(q, k, v, kn):
        out_m, lse_m, _ = memory_attention(q, k, v, topk=4, mem_keys_normed=kn, backend="cpu")
        return merge_attention_states(q, torch.zeros(q.shape[:3]), out_m, lse_m, backend="cpu")

    want = step(q, k, v, kn)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, k, v, kn)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_merge_backends_agree(dtype):
    g = torch.Generator().manual_seed(5)
    oa, ob = torch.randn(2, 3, 4, 8, generator=g).to(dtype), torch.randn(2, 3, 4, 8, generator=g).to(dtype)
    la, lb = torch.randn(2, 3, 4, generator=g) * 5, torch.randn(2, 3, 4, generator=g) * 5
    la[0, 0, 0] = -math.inf
    out_c, lse_c = merge_attention_states(oa, la, ob, lb, backend="cpu")
    out_t, lse_t = merge_attention_states(oa, la, ob, lb, backend="torch")
    assert out_c.dtype == out_t.dtype == dtype and lse_c.dtype == lse_t.dtype == torch.float32
    torch.testing.assert_close(lse_c, lse_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_c.float(), out_t.float(), atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=1e-2)
    for backend in ("cpu", "torch"):
        bad = lb.clone()
        bad[1, 2, 3] = math.nan
        with pytest.raises(InvalidInputError, match="lse_b must be finite or -inf"):
            merge_attention_states(oa, la, ob, bad, backend=backend)
    with pytest.raises(InvalidInputError, match="backend"):
        merge_attention_states(oa, la, ob, lb, backend="numpy")
    with pytest.raises(BackendUnavailableError):
        merge_attention_states(oa, la, ob, lb, backend="triton")


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_context_attention_backends_agree(q_len, mask_kind):
    from kcore.ops import context_attention

    g = torch.Generator().manual_seed(7)
    q = torch.randn(2, 6, q_len, 16, generator=g)
    k, v = torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    mask = None
    if mask_kind != "none":
        allowed = torch.rand(2, 1, q_len, 9, generator=g) > 0.3
        allowed[1, :, 0] = False  # one query row sees no key: zeros and -inf
        mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill(~allowed, -math.inf)
    out_c, lse_c = context_attention(q, k, v, mask, 0.3, backend="cpu")
    out_t, lse_t = context_attention(q, k, v, mask, 0.3, backend="torch")
    torch.testing.assert_close(out_c, out_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse_c, lse_t, atol=1e-5, rtol=1e-5)
    if mask_kind != "none":
        assert bool(torch.isneginf(lse_c[1, :, 0]).all()) and not bool(out_c[1, :, 0].any())


def test_context_attention_rejects_bad_arguments():
    from kcore.ops import context_attention

    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(InvalidInputError, match="key must have 4 dims"):
        context_attention(q, k[0], k)
    with pytest.raises(InvalidInputError, match="multiple"):
        context_attention(q, torch.randn(1, 3, 5, 8), torch.randn(1, 3, 5, 8))
    with pytest.raises(InvalidInputError, match="attention_mask must have shape"):
        context_attention(q, k, k, torch.ones(1, 1, 2, 4, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="scale"):
        context_attention(q, k, k, None, float("nan"))
    with pytest.raises(InvalidInputError, match="key must have dtype"):
        context_attention(q, k.half(), k.half())


def test_package_attribute_stays_the_op_after_importing_the_module():
    code = (
        "import importlib, kcore.ops.memory_attention as m, kcore.ops as ops\n"
        "mod = importlib.import_module('kcore.ops.memory_attention')\n"
        "print(callable(ops.memory_attention) and ops.memory_attention is mod.memory_attention)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True"]
