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

#include "core/knn.h"
#include "core/knn_simd.h"
#include "core/parallel.h"

namespace kcore {
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
};

// Widen rows [0, rows) of a key block to fp32 into `dst` (rows x dp, zero-padded to dp columns)
// and write their squared norms. Rows [rows, kKeyBlock) of `dst` are left zero by the caller.
template <KnnDType DT>
void widen_block(const void* keys, int64_t first, int64_t rows, int64_t dim, int64_t dp, int64_t stride,
                 float* dst, float* norms) {
  const int64_t full = dim / simd::kLanes * simd::kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * dp;
    // Four partial sums: one FMA chain would stall on its latency for every vector.
    v16f acc[4] = {};
    if constexpr (DT == KnnDType::F32) {
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
          v16f v = DT == KnnDType::F16 ? simd::load_f16(p) : simd::load_bf16(p);
          acc[u] += v * v;
          simd::store(out + i + u * simd::kLanes, v);
        }
      }
      for (; i < full; i += simd::kLanes) {
        v16f v = DT == KnnDType::F16 ? simd::load_f16(src + i) : simd::load_bf16(src + i);
        acc[0] += v * v;
        simd::store(out + i, v);
      }
      for (int64_t i = full; i < dim; ++i)
        out[i] = DT == KnnDType::F16 ? simd::f16_to_float(src[i]) : simd::bf16_to_float(src[i]);
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

template <KnnDType DT>
inline v16f load_key(const void* keys, int64_t offset) {
  if constexpr (DT == KnnDType::F32) return simd::load(static_cast<const float*>(keys) + offset);
  else if constexpr (DT == KnnDType::F16) return simd::load_f16(static_cast<const uint16_t*>(keys) + offset);
  else return simd::load_bf16(static_cast<const uint16_t*>(keys) + offset);
}

// Few queries: the job is streaming the keys, so they are widened in registers and used at once
// (no buffer round trip): dots[qi * kKeyBlock + kj] = <q_qi, x_kj> and norms[kj] = ||x_kj||^2
// for KT keys starting at row `first`. Needs dim % 16 == 0.
template <KnnDType DT, int QT, int KT>
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

template <KnnDType DT>
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
      for (int64_t j = 0; j < rows; ++j) {
        const float cost = l2 ? norms[j] - 2.f * d[j] : -d[j];
        if (cost < t.thresh) {
          t.buf[static_cast<size_t>(t.count++)] = Cand{cost, first + j};
          if (t.count == static_cast<int64_t>(t.buf.size())) t.shrink(k);
        }
      }
    }
  }
}

}  // namespace

void knn_search_cpu(const float* queries, int64_t num_queries, int64_t dim, const void* keys,
                    KnnDType key_dtype, int64_t num_keys, int64_t key_stride, int64_t k, KnnMetric metric,
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
  const int64_t cap = std::max<int64_t>(2 * k, k + 256);
  std::vector<std::vector<TopK>> tops(static_cast<size_t>(chunks));
  parallel_for(chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      auto& t = tops[static_cast<size_t>(c)];
      t.resize(static_cast<size_t>(num_queries));
      for (auto& x : t) x.init(cap);
      const int64_t begin = c * per_chunk, end = std::min(num_keys, begin + per_chunk);
      if (begin >= end) continue;
      switch (key_dtype) {
        case KnnDType::F32:
          search_range<KnnDType::F32>(qbuf.data(), num_queries, dim, dp, keys, key_stride, begin, end, k, metric, t);
          break;
        case KnnDType::F16:
          search_range<KnnDType::F16>(qbuf.data(), num_queries, dim, dp, keys, key_stride, begin, end, k, metric, t);
          break;
        case KnnDType::BF16:
          search_range<KnnDType::BF16>(qbuf.data(), num_queries, dim, dp, keys, key_stride, begin, end, k, metric, t);
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

}  // namespace kcore
