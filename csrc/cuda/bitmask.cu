// CUDA kernel applying a token bitmask to logits in place (same semantics as the CPU kernel in
// core/bitmask.cpp and xgrammar's apply_token_bitmask_inplace_cuda).
//
// Each thread owns one 16-byte vector of logits (4 fp32 or 8 fp16/bf16 tokens) and the matching
// 4 or 8 bits of its row's bitmask. All-allowed vectors are skipped (no memory traffic), all-masked
// vectors are stored without being read, mixed ones are read, blended and stored.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/bitmask.h"

namespace kcore::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVecBytes = 16;
constexpr int kMaxGridY = 65535;

template <typename Bits>
struct alignas(kVecBytes) Vec {
  Bits lane[kVecBytes / sizeof(Bits)];
};

// Bits = uint32_t for fp32, uint16_t for fp16/bf16: logits are handled as raw bit patterns.
template <typename Bits>
__global__ void apply_token_bitmask_kernel(Bits* __restrict__ logits, const int32_t* __restrict__ bitmask,
                                           const int64_t* __restrict__ indices, int64_t n_rows, int64_t vocab,
                                           int64_t logits_row_stride, int64_t bitmask_row_stride, Bits neg_inf,
                                           bool vector_ok) {
  constexpr int kLanes = kVecBytes / sizeof(Bits);  // 4 (fp32) or 8 (16-bit): divides 32
  const int64_t start = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * kLanes;
  if (start >= vocab) return;
  for (int64_t i = blockIdx.y; i < n_rows; i += gridDim.y) {
    const int64_t r = indices ? indices[i] : i;
    Bits* row = logits + r * logits_row_stride;
    const uint32_t word = static_cast<uint32_t>(__ldg(bitmask + r * bitmask_row_stride + start / 32));
    constexpr uint32_t kLaneMask = (1u << kLanes) - 1u;
    const uint32_t keep = (word >> (start % 32)) & kLaneMask;
    if (keep == kLaneMask) continue;
    if (vector_ok && start + kLanes <= vocab) {
      Vec<Bits>* p = reinterpret_cast<Vec<Bits>*>(row + start);
      Vec<Bits> v;
      if (keep != 0) v = *p;
#pragma unroll
      for (int k = 0; k < kLanes; ++k)
        if (!((keep >> k) & 1u)) v.lane[k] = neg_inf;
      *p = v;
    } else {
      // Row tail or unaligned rows: element by element.
      for (int k = 0; k < kLanes && start + k < vocab; ++k)
        if (!((keep >> k) & 1u)) row[start + k] = neg_inf;
    }
  }
}

template <typename Bits>
cudaError_t launch(const BitmaskArgs& a, Bits neg_inf, cudaStream_t stream) {
  constexpr int kLanes = kVecBytes / sizeof(Bits);
  const int64_t n_rows = a.indices ? a.num_indices : a.rows;
  if (n_rows == 0 || a.vocab == 0) return cudaSuccess;
  // 16-byte vectors need every row start 16-byte aligned.
  const bool vector_ok = reinterpret_cast<uintptr_t>(a.logits) % kVecBytes == 0 &&
                         (a.logits_row_stride * static_cast<int64_t>(sizeof(Bits))) % kVecBytes == 0;
  const int64_t per_block = static_cast<int64_t>(kThreads) * kLanes;
  dim3 grid(static_cast<unsigned>((a.vocab + per_block - 1) / per_block),
            static_cast<unsigned>(n_rows < kMaxGridY ? n_rows : kMaxGridY));
  apply_token_bitmask_kernel<Bits><<<grid, kThreads, 0, stream>>>(
      static_cast<Bits*>(a.logits), a.bitmask, a.indices, n_rows, a.vocab, a.logits_row_stride,
      a.bitmask_row_stride, neg_inf, vector_ok);
  return cudaGetLastError();
}

}  // namespace

std::string apply_token_bitmask(const BitmaskArgs& a, void* stream_ptr) {
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  cudaError_t err = cudaSuccess;
  switch (a.dtype) {
    case ElemType::kFloat32:
      err = launch<uint32_t>(a, kNegInfBitsF32, stream);
      break;
    case ElemType::kFloat16:
      err = launch<uint16_t>(a, kNegInfBitsF16, stream);
      break;
    case ElemType::kBFloat16:
      err = launch<uint16_t>(a, kNegInfBitsBF16, stream);
      break;
    default:
      return "logits must be float32, float16 or bfloat16";
  }
  return err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err));
}

}  // namespace kcore::cuda
