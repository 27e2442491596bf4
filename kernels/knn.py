"""Triton kernels of kcore.ops.knn (backend ``"triton"``): fused exact kNN search and fused kNN-LM
interpolation. Raw ``@triton.jit`` kernels first, launch wrappers at the end. On CPU they run only
under ``TRITON_INTERPRET=1``; arguments are checked by :mod:`kcore.ops.knn` before they get here.

Search: each program takes ``BLOCK_Q`` queries and a contiguous chunk of keys, computes float32
scores tile by tile (``tl.dot`` in IEEE fp32: keys are widened, never the queries narrowed) and
keeps a running top-``K2`` per query in registers. Scores and key ids travel packed in one int64
(order-preserving float bits << 32 | id), so a plain ``tl.sort`` orders (score, id) pairs; a tile
is merged by sorting it, reversing it and taking the element-wise minimum with the running list
(the ``K2`` smallest of the union, as in a bitonic merge), then sorting again. The per-chunk
lists are merged by ``torch.topk`` on the packed values (small: chunks x K2 per query).

Interpolation: one program per row: an online max / sum-of-exponentials pass over the logits, a
pass writing ``log(1 - lmbda) + log_softmax``, then the k neighbours are grouped by token (sort),
a segmented scan gives each token's exact log-sum-exp of scores, and ``atomic_max`` writes
``logaddexp(base, log(lmbda) + log p_knn)`` (monotone in the kNN term, so the maximum over a
group's prefixes is the group's full value).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kcore.errors import InvalidInputError

# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _float_to_ordered_i32(x):
    """float32 -> int32 whose signed order is the float order (negatives: flip magnitude bits)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _knn_search_kernel(
    q_ptr, k_ptr, out_ptr,  # queries fp32 (nq, dim); keys (n, dim) row stride stride_k; out int64 (nq, chunks, K2)
    nq, n, dim, stride_k, keys_per_chunk, num_chunks,
    IS_IP: tl.constexpr, BLOCK_Q: tl.constexpr, K2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_q = tl.program_id(0)
    chunk = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BLOCK_Q,)
    offs_t = tl.arange(0, K2)  # (K2,) position of a key inside a tile
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = offs_q < nq
    start = chunk * keys_per_chunk
    end = tl.minimum(start + keys_per_chunk, n)
    inf_key = _float_to_ordered_i32(tl.full((BLOCK_Q, K2), float("inf"), tl.float32))
    best = (inf_key.to(tl.int64) << 32) | 0x7FFFFFFF  # (BLOCK_Q, K2) packed (cost, id), ascending
    for t0 in range(start, end, K2):
        ids = t0 + offs_t  # (K2,)
        k_mask = ids < end
        acc = tl.zeros((BLOCK_Q, K2), dtype=tl.float32)  # <q, x>
        xnorm = tl.zeros((K2,), dtype=tl.float32)  # ||x||^2
        for d0 in range(0, dim, BLOCK_D):
            d_mask = (d0 + offs_d) < dim
            q = tl.load(q_ptr + offs_q[:, None] * dim + (d0 + offs_d)[None, :],
                        mask=q_mask[:, None] & d_mask[None, :], other=0.0)  # (BLOCK_Q, BLOCK_D)
            x = tl.load(k_ptr + ids[None, :].to(tl.int64) * stride_k + (d0 + offs_d)[:, None],
                        mask=k_mask[None, :] & d_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_D, K2)
            acc = tl.dot(q, x, acc, input_precision="ieee")
            xnorm += tl.sum(x * x, axis=0)
        if IS_IP:
            cost = -acc
        else:
            cost = xnorm[None, :] - 2.0 * acc
        cost = tl.where(k_mask[None, :], cost, float("inf"))
        packed = (_float_to_ordered_i32(cost).to(tl.int64) << 32) | ids[None, :].to(tl.int64)
        tile = tl.flip(tl.sort(packed, dim=1), dim=1)  # descending
        best = tl.sort(tl.minimum(best, tile), dim=1)
    out = out_ptr + (offs_q[:, None].to(tl.int64) * num_chunks + chunk) * K2 + offs_t[None, :]
    tl.store(out, best, mask=q_mask[:, None])


@triton.jit
def _segmented_lse(t1, m1, s1, t2, m2, s2):
    """Combine of a left-to-right scan computing a running log-sum-exp per run of equal tokens,
    carried as (token, max, sum of exp(score - max))."""
    same = t1 == t2
    m = tl.where(same, tl.maximum(m1, m2), m2)
    s = tl.where(same, s1 * tl.exp(tl.where(same, m1 - m, 0.0)) + s2 * tl.exp(m2 - m), s2)
    return t2, m, s


@triton.jit
def _knn_interpolate_kernel(
    logits_ptr, dists_ptr, values_ptr, out_ptr,
    vocab, stride_l, k, log_lmbda, log_1m_lmbda, score_scale,
    BLOCK_V: tl.constexpr, K2: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, K2)
    k_mask = offs_k < k
    tok = tl.load(values_ptr + row * k + offs_k, mask=k_mask, other=-1).to(tl.int64)  # (K2,)
    valid = tok >= 0
    num_valid = tl.sum(valid.to(tl.int32), axis=0)
    mix = (num_valid > 0) & (log_lmbda > float("-inf"))
    offset = tl.where(mix, log_1m_lmbda, 0.0)

    # log-sum-exp of the logits: one online pass, then the pass that writes the LM side.
    offs_v = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        x = tl.load(logits_ptr + row * stride_l + v0 + offs_v, mask=(v0 + offs_v) < vocab,
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - safe) + tl.exp(x - safe)
        m = m_new
    m_all = tl.max(m, axis=0)
    lse = m_all + tl.log(tl.sum(s * tl.exp(m - m_all), axis=0))
    shift = lse - offset
    for v0 in range(0, vocab, BLOCK_V):
        vm = (v0 + offs_v) < vocab
        x = tl.load(logits_ptr + row * stride_l + v0 + offs_v, mask=vm, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * vocab + v0 + offs_v, x - shift, mask=vm)

    if mix:
        tl.debug_barrier()  # the gathers below read values other threads just stored
        d = tl.load(dists_ptr + row * k + offs_k, mask=k_mask, other=0.0)
        score = tl.where(valid, d * score_scale, float("-inf"))
        smax = tl.max(score, axis=0)
        lse_knn = smax + tl.log(tl.sum(tl.where(valid, tl.exp(score - smax), 0.0), axis=0))
        # group neighbours by token: sort packed (token << 32 | position); padding sorts last
        key_tok = tl.where(valid, tok, vocab)
        packed = tl.sort((key_tok << 32) | offs_k.to(tl.int64), dim=0)
        pos = (packed & 0xFFFFFFFF).to(tl.int32)
        s_tok = packed >> 32
        s_valid = s_tok < vocab
        s_d = tl.load(dists_ptr + row * k + pos, mask=s_valid, other=0.0)
        s_score = tl.where(s_valid, s_d * score_scale, -1.0e30)  # finite: no inf - inf in the scan
        _, run_m, run_s = tl.associative_scan((s_tok, s_score, tl.full((K2,), 1.0, tl.float32)), 0, _segmented_lse)
        knn_logp = run_m + tl.log(run_s) - lse_knn
        base = tl.load(out_ptr + row * vocab + s_tok, mask=s_valid, other=0.0)
        term = log_lmbda + knn_logp
        hi = tl.maximum(base, term)
        lo = tl.minimum(base, term)
        cand = tl.where(lo == float("-inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))
        tl.atomic_max(out_ptr + row * vocab + s_tok, cand, mask=s_valid)


# ----------------------------------------------------------------------------------------------
# launch wrappers
# ----------------------------------------------------------------------------------------------


def _ordered_i32_to_float(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.int32)
    return (x ^ ((x >> 31) & 0x7FFFFFFF)).view(torch.float32)


def knn_search(queries: torch.Tensor, keys: torch.Tensor, k: int, metric: str):
    """Exact kNN search; see kcore.ops.knn_search (arguments already validated)."""
    nq, dim = queries.shape
    n = keys.shape[0]
    device = queries.device
    pad = math.inf if metric == "l2" else -math.inf
    if nq == 0 or n == 0:
        return (torch.full((nq, k), pad, dtype=torch.float32, device=device),
                torch.full((nq, k), -1, dtype=torch.int64, device=device))
    if n >= 2**31 - 1:
        raise InvalidInputError(f"keys: the triton knn_search packs key ids in 31 bits, at most 2**31 - 2 keys, got {n}")
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    q = queries.to(torch.float32).contiguous()
    k2 = max(64, triton.next_power_of_2(k))
    block_q = 16
    block_d = 16 if k2 >= 1024 else (32 if k2 >= 512 else 64)  # the (BLOCK_D, K2) key tile stays in registers
    q_blocks = triton.cdiv(nq, block_q)
    # enough chunks to fill the device, each at least one tile of K2 keys
    # (the interpreter gets 3 chunks so that tests exercise the merge of chunks)
    target = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
    num_chunks = max(1, min(triton.cdiv(n, k2), triton.cdiv(target, q_blocks)))
    keys_per_chunk = triton.cdiv(triton.cdiv(n, num_chunks), k2) * k2
    num_chunks = triton.cdiv(n, keys_per_chunk)
    cand = torch.empty((nq, num_chunks, k2), dtype=torch.int64, device=device)
    _knn_search_kernel[(q_blocks, num_chunks)](
        q, keys, cand, nq, n, dim, keys.stride(0), keys_per_chunk, num_chunks,
        IS_IP=metric == "ip", BLOCK_Q=block_q, K2=k2, BLOCK_D=block_d,
        num_warps=8 if k2 >= 512 else 4,
    )
    cand = cand.view(nq, num_chunks * k2)
    kk = min(k, cand.shape[1])
    best = torch.topk(cand, kk, dim=1, largest=False, sorted=True).values
    cost = _ordered_i32_to_float(best >> 32)
    ids = best & 0x7FFFFFFF
    missing = torch.isinf(cost)  # masked slots (only +inf is possible: queries and keys are finite)
    if metric == "l2":
        qn = (q * q).sum(1, keepdim=True)
        dists = (cost + qn).clamp_min(0.0)
    else:
        dists = -cost
    dists = torch.where(missing, torch.full_like(dists, pad), dists)
    ids = torch.where(missing, torch.full_like(ids, -1), ids)
    if kk < k:
        dists = torch.cat([dists, torch.full((nq, k - kk), pad, device=device)], dim=1)
        ids = torch.cat([ids, torch.full((nq, k - kk), -1, dtype=torch.int64, device=device)], dim=1)
    return dists.contiguous(), ids.contiguous()


def knn_interpolate(lm_logits, dists, values, lmbda: float, temperature: float, metric: str):
    """Fused kNN-LM interpolation; see kcore.ops.knn_interpolate (arguments already validated)."""
    batch, vocab = lm_logits.shape
    k = dists.shape[1]
    if lm_logits.stride(1) != 1:
        lm_logits = lm_logits.contiguous()
    dists = dists.contiguous()
    values = values.contiguous()
    out = torch.empty((batch, vocab), dtype=torch.float32, device=lm_logits.device)
    if batch == 0:
        return out
    log_lmbda = math.log(lmbda) if lmbda > 0 else -math.inf
    log_1m = math.log1p(-lmbda) if lmbda < 1 else -math.inf
    scale = (-1.0 if metric == "l2" else 1.0) / temperature
    _knn_interpolate_kernel[(batch,)](
        lm_logits, dists, values, out, vocab, lm_logits.stride(0), k, log_lmbda, log_1m, scale,
        BLOCK_V=1024, K2=max(16, triton.next_power_of_2(max(k, 1))), num_warps=4,
    )
    return out
