#include "core/bitmask.h"

#include <algorithm>
#include <cstring>
#include <string>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define KCORE_BITMASK_AVX512 1
#endif

#include "core/cpu_dispatch.h"  // compiled once per CPU variant, into namespace KCORE_ISA
#include "core/errors.h"
#include "core/parallel.h"

namespace kcore {
namespace KCORE_ISA {
namespace {

// Above this many bytes of logits per call, fully masked lines are streamed past the cache.
constexpr int64_t kStreamingBytes = int64_t{24} << 20;

#ifdef KCORE_BITMASK_AVX512
// A fully masked, 64-byte aligned cache line: with kStream it is written with a non-temporal
// store, which skips reading the line from memory first (half the traffic once the logits do not
// fit in cache); otherwise with a plain store that keeps it in cache for the sampler.
template <bool kStream>
inline void store_line(void* p, __m512i v) {
  if (kStream && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
    _mm512_stream_si512(static_cast<__m512i*>(p), v);
  } else {
    _mm512_storeu_si512(p, v);
  }
}
#endif

// One row: `n` logits of 32-bit elements; `words` holds ceil(n / 32) mask words.
template <bool kStream>
void mask_row_32bit(uint32_t* row, const int32_t* words, int64_t n) {
  const int64_t full = n / 32;
#ifdef KCORE_BITMASK_AVX512
  const __m512i neg_inf = _mm512_set1_epi32(static_cast<int>(kNegInfBitsF32));
  for (int64_t w = 0; w < full; ++w) {
    // Masked stores write only the disallowed lanes and never read the logits.
    const uint32_t drop = ~static_cast<uint32_t>(words[w]);
    if (drop == 0) continue;
    if (drop == 0xFFFFFFFFu) {
      store_line<kStream>(row + 32 * w, neg_inf);
      store_line<kStream>(row + 32 * w + 16, neg_inf);
      continue;
    }
    _mm512_mask_storeu_epi32(row + 32 * w, static_cast<__mmask16>(drop), neg_inf);
    _mm512_mask_storeu_epi32(row + 32 * w + 16, static_cast<__mmask16>(drop >> 16), neg_inf);
  }
  const int64_t rem = n - 32 * full;
  if (rem > 0) {
    // Lanes past the row end are masked off (masked stores do not fault on them).
    const uint32_t drop = ~static_cast<uint32_t>(words[full]) & ((1u << rem) - 1u);
    _mm512_mask_storeu_epi32(row + 32 * full, static_cast<__mmask16>(drop), neg_inf);
    _mm512_mask_storeu_epi32(row + 32 * full + 16, static_cast<__mmask16>(drop >> 16), neg_inf);
  }
#else
  // Branch-free select (a random mask mispredicts every other branch), which the compiler
  // vectorises for each variant: variable shifts + blends with AVX2, shifts and masks with SSE.
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t keep = static_cast<uint32_t>(words[w]);
    if (keep == 0xFFFFFFFFu) continue;
    uint32_t* p = row + 32 * w;
    if (keep == 0) {  // the common word of a constrained row: plain stores, no read
      std::fill_n(p, 32, kNegInfBitsF32);
      continue;
    }
    for (int b = 0; b < 32; ++b) {
      const uint32_t m = 0u - ((keep >> b) & 1u);  // all ones where allowed
      p[b] = (p[b] & m) | (kNegInfBitsF32 & ~m);
    }
  }
  for (int64_t j = 32 * full; j < n; ++j)
    if (!((static_cast<uint32_t>(words[full]) >> (j - 32 * full)) & 1u)) row[j] = kNegInfBitsF32;
#endif
}

// One row of 16-bit logits (fp16 or bf16, told apart only by the -inf pattern).
template <bool kStream>
void mask_row_16bit(uint16_t* row, const int32_t* words, int64_t n, uint16_t neg_inf_bits) {
  const int64_t full = n / 32;
#ifdef KCORE_BITMASK_AVX512
  const __m512i neg_inf = _mm512_set1_epi16(static_cast<short>(neg_inf_bits));
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t drop = ~static_cast<uint32_t>(words[w]);
    if (drop == 0) continue;
    if (drop == 0xFFFFFFFFu) {
      store_line<kStream>(row + 32 * w, neg_inf);
      continue;
    }
    _mm512_mask_storeu_epi16(row + 32 * w, static_cast<__mmask32>(drop), neg_inf);
  }
  const int64_t rem = n - 32 * full;
  if (rem > 0) {
    const uint32_t drop = ~static_cast<uint32_t>(words[full]) & ((1u << rem) - 1u);
    _mm512_mask_storeu_epi16(row + 32 * full, static_cast<__mmask32>(drop), neg_inf);
  }
#else
  for (int64_t w = 0; w < full; ++w) {
    const uint32_t keep = static_cast<uint32_t>(words[w]);
    if (keep == 0xFFFFFFFFu) continue;
    uint16_t* p = row + 32 * w;
    if (keep == 0) {
      std::fill_n(p, 32, neg_inf_bits);
      continue;
    }
    for (int b = 0; b < 32; ++b) {
      const uint16_t m = static_cast<uint16_t>(0u - ((keep >> b) & 1u));
      p[b] = static_cast<uint16_t>((p[b] & m) | (neg_inf_bits & ~m));
    }
  }
  for (int64_t j = 32 * full; j < n; ++j)
    if (!((static_cast<uint32_t>(words[full]) >> (j - 32 * full)) & 1u)) row[j] = neg_inf_bits;
#endif
}

template <bool kStream>
void mask_row(const BitmaskArgs& a, int64_t r) {
  const int32_t* words = a.bitmask + r * a.bitmask_row_stride;
  switch (a.dtype) {
    case ElemType::kFloat32:
      mask_row_32bit<kStream>(static_cast<uint32_t*>(a.logits) + r * a.logits_row_stride, words, a.vocab);
      break;
    case ElemType::kFloat16:
      mask_row_16bit<kStream>(static_cast<uint16_t*>(a.logits) + r * a.logits_row_stride, words, a.vocab, kNegInfBitsF16);
      break;
    case ElemType::kBFloat16:
      mask_row_16bit<kStream>(static_cast<uint16_t*>(a.logits) + r * a.logits_row_stride, words, a.vocab, kNegInfBitsBF16);
      break;
    default:  // validate_bitmask_args admits float logits only
      break;
  }
}

}  // namespace

void apply_token_bitmask_cpu(const BitmaskArgs& a) {
  validate_bitmask_args(a, /*indices_on_host=*/true);
  const int64_t n_rows = a.indices ? a.num_indices : a.rows;
  if (n_rows == 0 || a.vocab == 0) return;
  // Threads cost tens of microseconds to start: split only when each gets >= 2 MiB of logits.
  const int64_t row_bytes = a.vocab * elem_size(a.dtype);
  const int64_t grain = std::max<int64_t>(1, (int64_t{2} << 20) / row_bytes);
  // Logits much larger than the last-level cache will not be read back from cache by the sampler
  // anyway: write fully masked lines with non-temporal stores there (see store_line).
  const bool stream = n_rows * row_bytes >= kStreamingBytes;
  auto rows = [&](int64_t begin, int64_t end) {
    if (stream) {
      for (int64_t i = begin; i < end; ++i) mask_row<true>(a, a.indices ? a.indices[i] : i);
#ifdef KCORE_BITMASK_AVX512
      _mm_sfence();  // non-temporal stores are weakly ordered: publish them before returning
#endif
    } else {
      for (int64_t i = begin; i < end; ++i) mask_row<false>(a, a.indices ? a.indices[i] : i);
    }
  };
  // Waking pool threads costs microseconds, more than a small batch takes in total.
  if (n_rows <= grain) {
    rows(0, n_rows);
  } else {
    parallel_for(n_rows, grain, rows);
  }
}

}  // namespace KCORE_ISA
}  // namespace kcore
