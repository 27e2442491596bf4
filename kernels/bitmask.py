"""Triton kernel applying a token bitmask to logits in place (kcore.ops.apply_token_bitmask_).

Same semantics as xgrammar's Triton kernel: each program handles one row and ``BLOCK`` tokens,
expands the row's bitmask words to one bit per token and writes -inf with a masked store, so the
logits themselves are never read.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Tokens per program. The interpreter (CPU) runs one numpy program at a time, so it gets bigger
# blocks; on a GPU 4096 tokens = 16 KiB of fp32 per program keeps enough programs in flight.
_BLOCK_GPU = 4096
_BLOCK_INTERPRETER = 16384


@triton.jit
def _apply_token_bitmask_kernel(
    logits_ptr,  # (rows, logits_row_stride) fp32/fp16/bf16, modified in place
    bitmask_ptr,  # (bitmask_rows, bitmask_row_stride) int32
    indices_ptr,  # (num_rows,) int64, read only when HAS_INDICES
    vocab,
    logits_row_stride,
    bitmask_row_stride,
    HAS_INDICES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_INDICES:
        row = tl.load(indices_ptr + tl.program_id(0)).to(tl.int64)
    else:
        row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,) token ids
    in_row = offs < vocab
    words = tl.load(bitmask_ptr + row * bitmask_row_stride + offs // 32, mask=in_row, other=-1)
    allowed = (words >> (offs % 32)) & 1
    neg_inf = tl.full((BLOCK,), float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * logits_row_stride + offs, neg_inf, mask=in_row & (allowed == 0))


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, indices: Optional[torch.Tensor]) -> None:
    """Launch the kernel. Arguments are already validated by kcore.ops.apply_token_bitmask_:
    logits ``(batch, vocab)`` with unit last stride, int32 bitmask ``(bitmask_batch, >= ceil(vocab/32))``
    on the same device, indices None or int64 ``(num_rows,)`` with values in range."""
    rows = logits.shape[0] if indices is None else indices.numel()
    vocab = logits.shape[1]
    if rows == 0 or vocab == 0:
        return
    block = _BLOCK_GPU if logits.is_cuda else _BLOCK_INTERPRETER
    grid = (rows, triton.cdiv(vocab, block))
    _apply_token_bitmask_kernel[grid](
        logits,
        bitmask,
        indices if indices is not None else bitmask,  # any valid pointer: not read when HAS_INDICES is False
        vocab,
        logits.stride(0),
        bitmask.stride(0),
        HAS_INDICES=indices is not None,
        BLOCK=block,
    )
