// Exact kNN search on the CPU: keys are streamed once in blocks, each block widened to fp32 in a
// small cache-resident buffer, scored against every query with a register-tiled dot-product
// kernel (4 queries x 4 keys, 16 lanes), and filtered per query against the current k-th best
// score; survivors go to a buffer of 2k candidates that nth_element cuts back to k when full.
// Threads take disjoint ranges of keys (the job is memory-bound at few queries), their top-k
// lists are merged at the end.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/cpu_dispatch.h"  // compiled once per CPU variant, into namespace KCORE_ISA
#include "core/knn.h"
#include "core/simd.h"
#include "core/parallel.h"

namespace kcore {
namespace KCORE_ISA {
namespace {

using simd::v16f;

constexpr int64_t kKeyBlock = 32;        // keys widened per block: 32 x dim x 4 B stays in L2
constexpr int64_t kMinKeysPerChunk = 8192;  // below this a thread costs more than it saves

struct Cand {
  float cost;  // smaller is better: ||x||^2 - 2<q,x> (L2) or -<q,x> (IP)
  int64_t id;
};

inline bool cand_less(const Cand& a, const Cand& b) {
  return a.cost < b.cost || (a.cost == b.cost && a.id < b.id);
}

// Per-query running top-k of one key range: candidates below `thresh` are appended; when the
// buffer is full it is cut back to the k best and `thresh` becomes the k-th best cost.
struct TopK {
  std::vector<Cand> buf;
  int64_t count = 0;
  float thresh = std::numeric_limits<float>::infinity();

  void init(int64_t cap) { buf.resize(static_cast<size_t>(cap)); }

  void shrink(int64_t k) {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.begin() + count, cand_less);
    count = k;
    thresh = buf[static_cast<size_t>(k - 1)].cost;
  }

  void push(float cost, int64_t id, int64_t k) {
    if (cost < thresh) {
      buf[static_cast<size_t>(count++)] = Cand{cost, id};
      if (count == static_cast<int64_t>(buf.size())) shrink(k);
    }
  }
};

// Widen rows [0, rows) of a key block to fp32 into `dst` (rows x dp, zero-padded to dp columns)
// and write their squared norms. Rows [rows, kKeyBlock) of `dst` are left zero by the caller.
template <ElemType DT>
void widen_block(const void* keys, int64_t first, int64_t rows, int64_t dim, int64_t dp, int64_t stride,
                 float* dst, float* norms) {
  const int64_t full = dim / simd::kLanes * simd::kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * dp;
    // Four partial sums: one FMA chain would stall on its latency for every vector.
    v16f acc[4] = {};
    if constexpr (DT == ElemType::kFloat32) {
      const float* src = static_cast<const float*>(keys) + (first + r) * stride;
      int64_t i = 0;
      for (; i + 4 * simd::kLanes <= full; i += 4 * simd::kLanes) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          v16f v = simd::load(src + i + u * simd::kLanes);
          acc[u] += v * v;
          simd::store(out + i + u * simd::kLanes, v);
        }
      }
      for (; i < full; i += simd::kLanes) {
        v16f v = simd::load(src + i);
        acc[0] += v * v;
        simd::store(out + i, v);
      }
      for (int64_t i = full; i < dim; ++i) out[i] = src[i];
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(keys) + (first + r) * stride;
      int64_t i = 0;
      for (; i + 4 * simd::kLanes <= full; i += 4 * simd::kLanes) {
#pragma GCC unroll 4
        for (int u = 0; u < 4; ++u) {
          const uint16_t* p = src + i + u * simd::kLanes;
          v16f v = DT == ElemType::kFloat16 ? simd::load_f16(p) : simd::load_bf16(p);
          acc[u] += v * v;
          simd::store(out + i + u * simd::kLanes, v);
        }
      }
      for (; i < full; i += simd::kLanes) {
        v16f v = DT == ElemType::kFloat16 ? simd::load_f16(src + i) : simd::load_bf16(src + i);
        acc[0] += v * v;
        simd::store(out + i, v);
      }
      for (int64_t i = full; i < dim; ++i)
        out[i] = DT == ElemType::kFloat16 ? f16_to_float(src[i]) : bf16_to_float(src[i]);
    }
    float norm = simd::hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (int64_t i = full; i < dim; ++i) norm += out[i] * out[i];
    for (int64_t i = dim; i < dp; ++i) out[i] = 0.f;
    norms[r] = norm;
  }
}

// out[qi * out_stride + kj] = <q_qi, x_kj> for QT queries x KT keys, rows of dp floats
// (dp % 16 == 0). QT * KT independent accumulators hide the FMA latency.
template <int QT, int KT>
inline void dot_tile(const float* q, const float* x, int64_t dp, float* out, int64_t out_stride) {
  v16f acc[QT][KT] = {};
  for (int64_t i = 0; i < dp; i += simd::kLanes) {
    v16f xv[KT];
#pragma GCC unroll 16
    for (int kj = 0; kj < KT; ++kj) xv[kj] = simd::load(x + kj * dp + i);
#pragma GCC unroll 4
    for (int qi = 0; qi < QT; ++qi) {
      v16f qv = simd::load(q + qi * dp + i);
#pragma GCC unroll 16
      for (int kj = 0; kj < KT; ++kj) acc[qi][kj] += qv * xv[kj];
    }
  }
  static_assert(QT * KT <= 16, "one hsum16 per tile");
  v16f flat[16] = {};
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) flat[qi * KT + kj] = acc[qi][kj];
  const v16f sums = simd::hsum16(flat);
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) out[qi * out_stride + kj] = sums[qi * KT + kj];
}

template <ElemType DT>
inline v16f load_key(const void* keys, int64_t offset) {
  if constexpr (DT == ElemType::kFloat32) return simd::load(static_cast<const float*>(keys) + offset);
  else if constexpr (DT == ElemType::kFloat16) return simd::load_f16(static_cast<const uint16_t*>(keys) + offset);
  else return simd::load_bf16(static_cast<const uint16_t*>(keys) + offset);
}

// Few queries: the job is streaming the keys, so they are widened in registers and used at once
// (no buffer round trip): dots[qi * kKeyBlock + kj] = <q_qi, x_kj> and norms[kj] = ||x_kj||^2
// for KT keys starting at row `first`. Needs dim % 16 == 0.
template <ElemType DT, int QT, int KT>
inline void direct_tile(const float* q, int64_t dp, const void* keys, int64_t first, int64_t stride, float* dots,
                        float* norms) {
  static_assert(QT * KT + KT <= 16, "one hsum16 per tile");
  v16f acc[QT][KT] = {}, nacc[KT] = {};
  for (int64_t i = 0; i < dp; i += simd::kLanes) {
    v16f xv[KT];
#pragma GCC unroll 8
    for (int kj = 0; kj < KT; ++kj) {
      xv[kj] = load_key<DT>(keys, (first + kj) * stride + i);
      nacc[kj] += xv[kj] * xv[kj];
    }
#pragma GCC unroll 2
    for (int qi = 0; qi < QT; ++qi) {
      v16f qv = simd::load(q + qi * dp + i);
#pragma GCC unroll 8
      for (int kj = 0; kj < KT; ++kj) acc[qi][kj] += qv * xv[kj];
    }
  }
  v16f flat[16] = {};
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) flat[qi * KT + kj] = acc[qi][kj];
  for (int kj = 0; kj < KT; ++kj) flat[QT * KT + kj] = nacc[kj];
  const v16f sums = simd::hsum16(flat);
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) dots[qi * kKeyBlock + kj] = sums[qi * KT + kj];
  for (int kj = 0; kj < KT; ++kj) norms[kj] = sums[QT * KT + kj];
}

// Lanes [0, n) of a 16-lane block (all of them when n >= 16).
inline uint32_t lane_mask(int64_t n) { return n >= simd::kLanes ? 0xffffu : (1u << n) - 1u; }

// Scores of all queries against one widened block of kKeyBlock keys: dots (nq x kKeyBlock).
void block_dots(const float* qbuf, int64_t nq, int64_t dp, const float* kbuf, float* dots) {
  for (int64_t q0 = 0; q0 < nq; q0 += 4) {
    const int64_t qt = std::min<int64_t>(4, nq - q0);
    const float* q = qbuf + q0 * dp;
    float* out = dots + q0 * kKeyBlock;
    switch (qt) {
      case 4:
        for (int64_t j = 0; j < kKeyBlock; j += 4) dot_tile<4, 4>(q, kbuf + j * dp, dp, out + j, kKeyBlock);
        break;
      case 3:
        for (int64_t j = 0; j < kKeyBlock; j += 4) dot_tile<3, 4>(q, kbuf + j * dp, dp, out + j, kKeyBlock);
        break;
      case 2:
        for (int64_t j = 0; j < kKeyBlock; j += 8) dot_tile<2, 8>(q, kbuf + j * dp, dp, out + j, kKeyBlock);
        break;
      default:
        for (int64_t j = 0; j < kKeyBlock; j += 16) dot_tile<1, 16>(q, kbuf + j * dp, dp, out + j, kKeyBlock);
        break;
    }
  }
}

template <ElemType DT>
void search_range(const float* qbuf, int64_t nq, int64_t dim, int64_t dp, const void* keys, int64_t stride,
                  int64_t begin, int64_t end, int64_t k, KnnMetric metric, std::vector<TopK>& tops) {
  std::vector<float> kbuf(static_cast<size_t>(kKeyBlock * dp), 0.f);
  std::vector<float> norms(kKeyBlock, 0.f);
  std::vector<float> dots(static_cast<size_t>(nq * kKeyBlock));
  const bool l2 = metric == KnnMetric::L2;
  for (int64_t first = begin; first < end; first += kKeyBlock) {
    const int64_t rows = std::min(kKeyBlock, end - first);
    if (nq <= 2 && dim == dp && rows == kKeyBlock) {
      for (int64_t j = 0; j < kKeyBlock; j += (nq == 1 ? 8 : 4)) {
        if (nq == 1)
          direct_tile<DT, 1, 8>(qbuf, dp, keys, first + j, stride, dots.data() + j, norms.data() + j);
        else
          direct_tile<DT, 2, 4>(qbuf, dp, keys, first + j, stride, dots.data() + j, norms.data() + j);
      }
    } else {
      if (rows < kKeyBlock) std::fill(kbuf.begin() + rows * dp, kbuf.end(), 0.f);
      widen_block<DT>(keys, first, rows, dim, dp, stride, kbuf.data(), norms.data());
      block_dots(qbuf, nq, dp, kbuf.data(), dots.data());
    }
    for (int64_t q = 0; q < nq; ++q) {
      TopK& t = tops[static_cast<size_t>(q)];
      const float* d = dots.data() + q * kKeyBlock;
      // 16 keys at a time against the threshold; most blocks have no key to keep
      for (int64_t j0 = 0; j0 < rows; j0 += simd::kLanes) {
        const v16f dv = simd::load(d + j0);
        const v16f cost = l2 ? simd::load(norms.data() + j0) - 2.f * dv : -dv;
        uint32_t bits = simd::movemask(cost < t.thresh) & lane_mask(rows - j0);
        while (bits) {
          const int j = __builtin_ctz(bits);
          bits &= bits - 1;
          t.push(cost[j], first + j0 + j, k);
        }
      }
    }
  }
}

#if defined(__AVX512F__)
// ---- bf16 keys, several queries: the compute-bound case -----------------------------------
// Compiled into the AVX-512 variants for CPUs with AVX512_BF16 (Zen 4, Sapphire Rapids) and taken
// only when cpuid reports it (has_avx512bf16), so the same variant still runs on Skylake-X.
// vdpbf16ps multiplies bf16 pairs at twice the rate of fp32 FMAs, but needs bf16 queries. So the
// queries are rounded to bf16 for a first pass, which gives each score with a rigorous error
// bound; keys whose bound interval can still reach the top k are kept as candidates and re-scored
// exactly in fp32 at the end. The result is the same as the fp32 path (exact search).
//   |<q, x> - <q_bf16, x>| <= ||q - q_bf16|| ||x||   (Cauchy-Schwarz; x is exactly bf16)
// plus the fp32 accumulation error of the dot product, <= gamma ||q_bf16|| ||x||.

constexpr int64_t kBf16MinQueries = 4;

// out[qi * out_stride + kj] = <q_bf16_qi, x_kj> with vdpbf16ps (fp32 accumulation), dim % 32 == 0.
#define KCORE_TARGET_BF16 __attribute__((target("avx512bf16")))

inline bool has_avx512bf16() { return (cpu_info().features & cpu::bit(cpu::kAvx512bf16)) != 0; }

template <int QT, int KT>
KCORE_TARGET_BF16 inline void dot_tile_bf16(const uint16_t* q, int64_t dim, const uint16_t* x, int64_t stride, float* out,
                          int64_t out_stride) {
  __m512 acc[QT][KT];
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) acc[qi][kj] = _mm512_setzero_ps();
  for (int64_t i = 0; i < dim; i += 32) {
    __m512bh xv[KT];
#pragma GCC unroll 4
    for (int kj = 0; kj < KT; ++kj) xv[kj] = (__m512bh)_mm512_loadu_si512(x + kj * stride + i);
#pragma GCC unroll 4
    for (int qi = 0; qi < QT; ++qi) {
      const __m512bh qv = (__m512bh)_mm512_loadu_si512(q + qi * dim + i);
#pragma GCC unroll 4
      for (int kj = 0; kj < KT; ++kj) acc[qi][kj] = _mm512_dpbf16_ps(acc[qi][kj], qv, xv[kj]);
    }
  }
  v16f flat[16] = {};
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) flat[qi * KT + kj] = (v16f)acc[qi][kj];
  const v16f sums = simd::hsum16(flat);
  for (int qi = 0; qi < QT; ++qi)
    for (int kj = 0; kj < KT; ++kj) out[qi * out_stride + kj] = sums[qi * KT + kj];
}

// Candidates of one query in the bound pass: (lower bound of the cost, upper bound, id).
struct BoundCand {
  float lower, upper;
  int64_t id;
};

struct BoundTopK {
  std::vector<BoundCand> buf;
  std::vector<float> scratch;
  int64_t count = 0;
  float thresh = std::numeric_limits<float>::infinity();  // k-th smallest upper bound seen

  // Tighten the threshold to the k-th smallest upper bound and drop candidates that cannot make
  // it; grow the buffer when most survive (many near-equal keys) so that pushes stay amortised.
  void prune(int64_t k) {
    if (count >= k) {
      scratch.resize(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) scratch[static_cast<size_t>(i)] = buf[static_cast<size_t>(i)].upper;
      std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end());
      thresh = std::min(thresh, scratch[static_cast<size_t>(k - 1)]);
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < count; ++i)
      if (buf[static_cast<size_t>(i)].lower <= thresh) buf[static_cast<size_t>(kept++)] = buf[static_cast<size_t>(i)];
    count = kept;
    if (2 * count > static_cast<int64_t>(buf.size())) buf.resize(buf.size() * 2);
  }

  void push(float lower, float upper, int64_t id, int64_t k) {
    if (lower <= thresh) {
      buf[static_cast<size_t>(count++)] = BoundCand{lower, upper, id};
      if (count == static_cast<int64_t>(buf.size())) prune(k);
    }
  }
};

// DT = BF16: the keys are used as they are. DT = F16: each block is rounded to bf16 into a buffer
// and each key's rounding error ||x - x_bf16|| enters the bound:
//   |<q, x> - <q_bf16, x_bf16>| <= ||q|| ||x - x_bf16|| + (||q - q_bf16|| + gamma ||q_bf16||) ||x_bf16||.
template <ElemType DT>
KCORE_TARGET_BF16 void search_range_bf16(const float* qbuf, int64_t nq, int64_t dim, const uint16_t* keys, int64_t stride,
                       int64_t begin, int64_t end, int64_t k, KnnMetric metric, std::vector<TopK>& tops) {
  static_assert(DT == ElemType::kBFloat16 || DT == ElemType::kFloat16, "half-precision keys only");
  const bool l2 = metric == KnnMetric::L2;
  // bf16 queries, the norm of their rounding error and their own norm
  std::vector<uint16_t> qb(static_cast<size_t>(nq * dim));
  std::vector<float> q_err(static_cast<size_t>(nq)), q_bn(static_cast<size_t>(nq)), q_len(static_cast<size_t>(nq));
  for (int64_t q = 0; q < nq; ++q) {
    double e2 = 0.0, n2 = 0.0, l2q = 0.0;
    for (int64_t i = 0; i < dim; ++i) {
      const float v = qbuf[q * dim + i];
      const uint16_t h = float_to_bf16_rne(v);
      qb[static_cast<size_t>(q * dim + i)] = h;
      const double r = bf16_to_float(h);
      e2 += (v - r) * (v - r);
      n2 += r * r;
      l2q += static_cast<double>(v) * v;
    }
    q_len[static_cast<size_t>(q)] = static_cast<float>(1.0001 * std::sqrt(l2q));
    // gamma = 2 d u bounds the fp32 accumulation of d products (u = 2^-24), doubled for safety;
    // 1.0001 covers the rounding of the bound itself.
    const double gamma = 4.0 * static_cast<double>(dim) * std::ldexp(1.0, -24);
    q_err[static_cast<size_t>(q)] = static_cast<float>(1.0001 * (std::sqrt(e2) + gamma * std::sqrt(n2)));
    q_bn[static_cast<size_t>(q)] = static_cast<float>(std::sqrt(n2));
  }
  const double cost_eps = 8.0 * std::ldexp(1.0, -24);  // rounding of norm - 2 dot
  std::vector<BoundTopK> cands(static_cast<size_t>(nq));
  for (auto& c : cands) c.buf.resize(static_cast<size_t>(std::min<int64_t>(std::max<int64_t>(4 * k, 1024), end - begin + 1)));
  std::vector<float> dots(static_cast<size_t>(nq * kKeyBlock)), norms(kKeyBlock), xlen(kKeyBlock);
  std::vector<float> xerr(kKeyBlock, 0.f);
  std::vector<uint16_t> block(DT == ElemType::kFloat16 ? static_cast<size_t>(kKeyBlock * dim) : 0);

  for (int64_t first = begin; first < end; first += kKeyBlock) {
    const int64_t rows = std::min(kKeyBlock, end - first);
    const uint16_t* xb = keys + first * stride;
    int64_t xs = stride;  // row stride of the bf16 keys the dot products read
    for (int64_t j = 0; j < rows; ++j) {  // exact fp32 norms of the keys (and bf16 rounding of fp16)
      const uint16_t* x = xb + j * stride;
      v16f a0{}, a1{}, e0{}, e1{};
      for (int64_t i = 0; i < dim; i += 32) {
        if constexpr (DT == ElemType::kBFloat16) {
          const v16f u = simd::load_bf16(x + i), w = simd::load_bf16(x + i + 16);
          a0 += u * u;
          a1 += w * w;
        } else {
          const v16f u = simd::load_f16(x + i), w = simd::load_f16(x + i + 16);
          a0 += u * u;
          a1 += w * w;
          const __m512bh r = _mm512_cvtne2ps_pbh(reinterpret_cast<const __m512&>(w), reinterpret_cast<const __m512&>(u));
          uint16_t* dst = block.data() + j * dim + i;
          _mm512_storeu_si512(dst, (__m512i)r);
          const v16f du = u - simd::load_bf16(dst), dw = w - simd::load_bf16(dst + 16);
          e0 += du * du;
          e1 += dw * dw;
        }
      }
      norms[static_cast<size_t>(j)] = simd::hsum(a0 + a1);
      xlen[static_cast<size_t>(j)] = std::sqrt(norms[static_cast<size_t>(j)]);
      if constexpr (DT == ElemType::kFloat16) xerr[static_cast<size_t>(j)] = 1.0001f * std::sqrt(simd::hsum(e0 + e1));
    }
    if constexpr (DT == ElemType::kFloat16) {
      xb = block.data();
      xs = dim;
    }
    for (int64_t q0 = 0; q0 < nq; q0 += 4) {
      const int64_t qt = std::min<int64_t>(4, nq - q0);
      for (int64_t j = 0; j < rows; j += 4) {
        // a short last block re-reads rows of this block instead of running past `end`
        const int64_t jj = std::min(j, rows - 4 < 0 ? 0 : rows - 4);
        float* out = dots.data() + q0 * kKeyBlock + jj;
        const uint16_t* x = xb + jj * xs;
        const uint16_t* q = qb.data() + q0 * dim;
        if (rows < 4) {
          for (int64_t r = 0; r < rows; ++r)
            switch (qt) {
              case 4: dot_tile_bf16<4, 1>(q, dim, x + r * xs, xs, out + r, kKeyBlock); break;
              case 3: dot_tile_bf16<3, 1>(q, dim, x + r * xs, xs, out + r, kKeyBlock); break;
              case 2: dot_tile_bf16<2, 1>(q, dim, x + r * xs, xs, out + r, kKeyBlock); break;
              default: dot_tile_bf16<1, 1>(q, dim, x + r * xs, xs, out + r, kKeyBlock); break;
            }
          break;
        }
        switch (qt) {
          case 4: dot_tile_bf16<4, 4>(q, dim, x, xs, out, kKeyBlock); break;
          case 3: dot_tile_bf16<3, 4>(q, dim, x, xs, out, kKeyBlock); break;
          case 2: dot_tile_bf16<2, 4>(q, dim, x, xs, out, kKeyBlock); break;
          default: dot_tile_bf16<1, 4>(q, dim, x, xs, out, kKeyBlock); break;
        }
      }
    }
    for (int64_t q = 0; q < nq; ++q) {
      BoundTopK& c = cands[static_cast<size_t>(q)];
      const float* d = dots.data() + q * kKeyBlock;
      const float qe = q_err[static_cast<size_t>(q)], ql = q_len[static_cast<size_t>(q)];
      for (int64_t j0 = 0; j0 < rows; j0 += simd::kLanes) {
        const v16f dv = simd::load(d + j0), nv = simd::load(norms.data() + j0);
        const v16f approx = l2 ? nv - 2.f * dv : -dv;
        const v16f adv = dv < 0.f ? -dv : dv;
        const v16f xe = simd::load(xerr.data() + j0);
        const v16f bound = (l2 ? 2.f : 1.f) * (qe * (simd::load(xlen.data() + j0) + xe) + ql * xe) +
                           static_cast<float>(cost_eps) * (nv + 2.f * adv) + 1e-30f;
        const v16f lower = approx - bound, upper = approx + bound;
        uint32_t bits = simd::movemask(lower <= c.thresh) & lane_mask(rows - j0);
        while (bits) {
          const int j = __builtin_ctz(bits);
          bits &= bits - 1;
          c.push(lower[j], upper[j], first + j0 + j, k);
        }
      }
    }
  }
  // exact fp32 re-scoring of the surviving candidates
  for (int64_t q = 0; q < nq; ++q) {
    BoundTopK& c = cands[static_cast<size_t>(q)];
    c.prune(k);
    TopK& t = tops[static_cast<size_t>(q)];
    const float* qv = qbuf + q * dim;
    for (int64_t i = 0; i < c.count; ++i) {
      const int64_t id = c.buf[static_cast<size_t>(i)].id;
      const uint16_t* x = keys + id * stride;
      v16f dot0{}, dot1{}, nn0{}, nn1{};
      for (int64_t e = 0; e < dim; e += 32) {
        const v16f u = DT == ElemType::kBFloat16 ? simd::load_bf16(x + e) : simd::load_f16(x + e);
        const v16f w = DT == ElemType::kBFloat16 ? simd::load_bf16(x + e + 16) : simd::load_f16(x + e + 16);
        dot0 += simd::load(qv + e) * u;
        dot1 += simd::load(qv + e + 16) * w;
        nn0 += u * u;
        nn1 += w * w;
      }
      const float dot = simd::hsum(dot0 + dot1);
      t.push(l2 ? simd::hsum(nn0 + nn1) - 2.f * dot : -dot, id, k);
    }
  }
}
#endif  // __AVX512F__

}  // namespace

void knn_search_cpu(const float* queries, int64_t num_queries, int64_t dim, const void* keys,
                    ElemType key_dtype, int64_t num_keys, int64_t key_stride, int64_t k, KnnMetric metric,
                    float* out_dists, int64_t* out_ids) {
  if (num_queries <= 0) return;
  const int64_t dp = (dim + simd::kLanes - 1) / simd::kLanes * simd::kLanes;
  std::vector<float> qbuf(static_cast<size_t>(num_queries * dp), 0.f);
  std::vector<float> qnorm(static_cast<size_t>(num_queries), 0.f);
  for (int64_t q = 0; q < num_queries; ++q) {
    double s = 0.0;
    for (int64_t i = 0; i < dim; ++i) {
      const float v = queries[q * dim + i];
      qbuf[static_cast<size_t>(q * dp + i)] = v;
      s += static_cast<double>(v) * v;
    }
    qnorm[static_cast<size_t>(q)] = static_cast<float>(s);
  }

  // Disjoint key ranges, one per thread; each keeps its own per-query top-k.
  const int64_t chunks = std::max<int64_t>(
      1, std::min<int64_t>(num_threads(), num_keys / kMinKeysPerChunk));
  const int64_t per_chunk = (num_keys + chunks - 1) / chunks;
  // candidate buffer per query: room for 2k (amortised nth_element), never more than a chunk holds
  const int64_t cap = std::min<int64_t>(std::max<int64_t>(2 * k, k + 256), per_chunk + 1);
  std::vector<std::vector<TopK>> tops(static_cast<size_t>(chunks));
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto& t = tops[static_cast<size_t>(c)];
      t.resize(static_cast<size_t>(num_queries));
      for (auto& x : t) x.init(cap);
      const int64_t begin = c * per_chunk, end = std::min(num_keys, begin + per_chunk);
      if (begin >= end) continue;
      switch (key_dtype) {
        case ElemType::kFloat32:
          search_range<ElemType::kFloat32>(qbuf.data(), num_queries, dim, dp, keys, key_stride, begin, end, k, metric, t);
          break;
        case ElemType::kFloat16:
#if defined(__AVX512F__)
          if (num_queries >= kBf16MinQueries && dim % 32 == 0 && has_avx512bf16()) {
            search_range_bf16<ElemType::kFloat16>(qbuf.data(), num_queries, dim, static_cast<const uint16_t*>(keys),
                                             key_stride, begin, end, k, metric, t);
            break;
          }
#endif
          search_range<ElemType::kFloat16>(qbuf.data(), num_queries, dim, dp, keys, key_stride, begin, end, k, metric, t);
          break;
        case ElemType::kBFloat16:
#if defined(__AVX512F__)
          if (num_queries >= kBf16MinQueries && dim % 32 == 0 && has_avx512bf16()) {
            search_range_bf16<ElemType::kBFloat16>(qbuf.data(), num_queries, dim, static_cast<const uint16_t*>(keys),
                                              key_stride, begin, end, k, metric, t);
            break;
          }
#endif
          search_range<ElemType::kBFloat16>(qbuf.data(), num_queries, dim, dp, keys, key_stride, begin, end, k, metric, t);
          break;
        default:  // the binding admits float keys only
          break;
      }
    }
  });

  // Merge the per-thread lists, best first, ties by id; pad with (-1, +-inf).
  const float pad = metric == KnnMetric::L2 ? std::numeric_limits<float>::infinity()
                                            : -std::numeric_limits<float>::infinity();
  std::vector<Cand> all;
  for (int64_t q = 0; q < num_queries; ++q) {
    all.clear();
    for (auto& t : tops) {
      const TopK& x = t[static_cast<size_t>(q)];
      all.insert(all.end(), x.buf.begin(), x.buf.begin() + x.count);
    }
    const int64_t n = std::min<int64_t>(k, static_cast<int64_t>(all.size()));
    std::partial_sort(all.begin(), all.begin() + n, all.end(), cand_less);
    float* od = out_dists + q * k;
    int64_t* oi = out_ids + q * k;
    const float qn = qnorm[static_cast<size_t>(q)];
    for (int64_t j = 0; j < n; ++j) {
      const Cand& c = all[static_cast<size_t>(j)];
      od[j] = metric == KnnMetric::L2 ? std::max(c.cost + qn, 0.f) : -c.cost;
      oi[j] = c.id;
    }
    for (int64_t j = n; j < k; ++j) {
      od[j] = pad;
      oi[j] = -1;
    }
  }
}

}  // namespace KCORE_ISA
}  // namespace kcore
