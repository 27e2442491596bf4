#include "core/memory_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "core/cpu_dispatch.h"  // compiled once per CPU variant, into namespace KCORE_ISA
#include "core/errors.h"
#include "core/parallel.h"
#include "core/simd.h"

namespace kcore {
namespace KCORE_ISA {
namespace {

using simd::load8;
using simd::splat8;
using simd::store8;
using simd::v16f;
using simd::v8f;

constexpr int64_t kKeyBlock = 32;     // keys scored per block (transposed into an L1 tile)
constexpr int64_t kQueryTile = 32;    // queries sharing one pass over a key range
constexpr int64_t kMinSplitKeys = 2048;  // fewest keys a thread streams when a range is split
// Below this many bytes of keys streamed per call (measured: 7.7 MB at decode), starting threads
// costs more than it saves.
constexpr int64_t kMinParallelBytes = int64_t{8} << 20;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <ElemType T>
struct Elem;
template <>
struct Elem<ElemType::kFloat32> {
  using type = float;
  static float to_f32(float x) { return x; }
};
template <>
struct Elem<ElemType::kFloat16> {
  using type = uint16_t;
  static float to_f32(uint16_t x) { return f16_to_float(x); }
};
template <>
struct Elem<ElemType::kBFloat16> {
  using type = uint16_t;
  static float to_f32(uint16_t x) { return bf16_to_float(x); }
};
template <>
struct Elem<ElemType::kInt8> {  // times the row's scale, applied by the caller
  using type = int8_t;
  static float to_f32(int8_t x) { return static_cast<float>(x); }
};

// Converts one memory row (head_dim elements) to float32, 16 lanes at a time for the half types
// (F16C / AVX-512 conversions under -march=native, see core/simd.h).
template <ElemType T>
inline void row_to_f32(const typename Elem<T>::type* src, int64_t n, float* dst) {
  int64_t d = 0;
  if constexpr (T == ElemType::kFloat16) {
    for (; d + simd::kLanes <= n; d += simd::kLanes) simd::store(dst + d, simd::load_f16(src + d));
  } else if constexpr (T == ElemType::kBFloat16) {
    for (; d + simd::kLanes <= n; d += simd::kLanes) simd::store(dst + d, simd::load_bf16(src + d));
  }
  for (; d < n; ++d) dst[d] = Elem<T>::to_f32(src[d]);
}

template <ElemType T>
inline const typename Elem<T>::type* row_ptr(const MemoryTensor& t, int64_t head, int64_t row) {
  return static_cast<const typename Elem<T>::type*>(t.data) + head * t.stride_head + row * t.stride_row;
}

// Scores of 4 queries (rows of q, stride head_dim) against 16 keys of a transposed block kt
// (head_dim, kKeyBlock): s (4, kKeyBlock) row-major. The 8 accumulators stay in registers.
inline void score_4x16(const float* q, int64_t d_len, const float* kt, float* s) {
  v8f c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{};
  const float *q0 = q, *q1 = q + d_len, *q2 = q + 2 * d_len, *q3 = q + 3 * d_len;
  for (int64_t d = 0; d < d_len; ++d) {
    const v8f k0 = load8(kt + d * kKeyBlock), k1 = load8(kt + d * kKeyBlock + 8);
    const v8f b0 = splat8(q0[d]), b1 = splat8(q1[d]), b2 = splat8(q2[d]), b3 = splat8(q3[d]);
    c00 += b0 * k0;
    c01 += b0 * k1;
    c10 += b1 * k0;
    c11 += b1 * k1;
    c20 += b2 * k0;
    c21 += b2 * k1;
    c30 += b3 * k0;
    c31 += b3 * k1;
  }
  store8(s, c00);
  store8(s + 8, c01);
  store8(s + kKeyBlock, c10);
  store8(s + kKeyBlock + 8, c11);
  store8(s + 2 * kKeyBlock, c20);
  store8(s + 2 * kKeyBlock + 8, c21);
  store8(s + 3 * kKeyBlock, c30);
  store8(s + 3 * kKeyBlock + 8, c31);
}

// 16 elements of a memory row as float32 lanes, converted in registers.
template <ElemType T>
inline v16f load16_f32(const typename Elem<T>::type* p) {
  if constexpr (T == ElemType::kFloat32) {
    return simd::load(p);
  } else if constexpr (T == ElemType::kBFloat16) {
    return simd::load_bf16(p);
  } else if constexpr (T == ElemType::kFloat16) {
    return simd::load_f16(p);
  } else {
    float tmp[16];
    for (int i = 0; i < 16; ++i) tmp[i] = Elem<T>::to_f32(p[i]);
    return simd::load(tmp);
  }
}

// Scores of NQ queries (rows of q, stride head_dim) against one key row k: s[i * s_stride].
// Decode has 1-4 queries per KV head; the key row is loaded and converted once for all of them.
template <ElemType T, int NQ>
inline void score_rows(const float* q, int64_t d_len, const typename Elem<T>::type* k, float* s, int64_t s_stride) {
  v16f c[NQ] = {};
  int64_t d = 0;
  for (; d + 16 <= d_len; d += 16) {
    const v16f kv = load16_f32<T>(k + d);
    for (int i = 0; i < NQ; ++i) c[i] += simd::load(q + i * d_len + d) * kv;
  }
  for (int i = 0; i < NQ; ++i) {
    float acc = simd::hsum_pairwise(c[i]);
    for (int64_t t = d; t < d_len; ++t) acc += q[i * d_len + t] * Elem<T>::to_f32(k[t]);
    s[i * s_stride] = acc;
  }
}

// Inserts (score, id) into the descending list vals/ids of length k; the caller checked that
// score beats the last entry. Equal scores keep the earlier entry first.
inline void topk_insert(float* vals, int32_t* ids, int64_t k, float score, int32_t id) {
  int64_t p = k - 1;
  while (p > 0 && vals[p - 1] < score) {
    vals[p] = vals[p - 1];
    ids[p] = ids[p - 1];
    --p;
  }
  vals[p] = score;
  ids[p] = id;
}

// Phase 1: the running top-k of queries [q0, q0 + nq) of KV head h over memory rows [m0, m1),
// written to cand_vals/cand_ids at (query, split) slots of k entries.
template <ElemType T>
void score_and_select(const MemoryAttentionArgs& a, int64_t h, int64_t q0, int64_t nq, int64_t m0, int64_t m1,
                      int64_t split, int64_t num_splits, float* cand_vals, int32_t* cand_ids) {
  const int64_t d_len = a.head_dim, k = a.topk;
  const int64_t nq_pad = (nq + 3) / 4 * 4;
  std::vector<float> qbuf(static_cast<size_t>(nq_pad * d_len), 0.0f);  // zero rows pad the tile
  std::memcpy(qbuf.data(), a.query + (h * a.queries_per_head + q0) * d_len, sizeof(float) * nq * d_len);
  std::vector<float> kt(static_cast<size_t>(d_len * kKeyBlock), 0.0f);  // (head_dim, kKeyBlock)
  std::vector<float> scores(static_cast<size_t>(nq_pad * kKeyBlock));
  std::vector<float> top_vals(static_cast<size_t>(nq * k), kNegInf);
  std::vector<int32_t> top_ids(static_cast<size_t>(nq * k), -1);

  std::vector<float> rowbuf(static_cast<size_t>(d_len));
  // Decode (at most 4 queries per KV head): dot products straight on the key rows. More queries:
  // transpose each key block once and score it with the 4x16 register tile, reused by all queries.
  const bool row_path = nq <= 4;
  for (int64_t mb = m0; mb < m1; mb += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, m1 - mb);
    if (row_path) {
      for (int64_t j = 0; j < nb; ++j) {
        const auto* row = row_ptr<T>(a.keys_normed, h, mb + j);
        switch (nq) {
          case 1:
            score_rows<T, 1>(qbuf.data(), d_len, row, &scores[j], kKeyBlock);
            break;
          case 2:
            score_rows<T, 2>(qbuf.data(), d_len, row, &scores[j], kKeyBlock);
            break;
          case 3:
            score_rows<T, 3>(qbuf.data(), d_len, row, &scores[j], kKeyBlock);
            break;
          default:
            score_rows<T, 4>(qbuf.data(), d_len, row, &scores[j], kKeyBlock);
        }
      }
    } else {
      for (int64_t j = 0; j < nb; ++j) {
        row_to_f32<T>(row_ptr<T>(a.keys_normed, h, mb + j), d_len, rowbuf.data());
        for (int64_t d = 0; d < d_len; ++d) kt[d * kKeyBlock + j] = rowbuf[d];
      }
      if (nb < kKeyBlock) {  // last partial block: stale columns must not leak into the scores
        for (int64_t d = 0; d < d_len; ++d) std::fill_n(&kt[d * kKeyBlock + nb], kKeyBlock - nb, 0.0f);
      }
      for (int64_t i0 = 0; i0 < nq_pad; i0 += 4) {
        for (int64_t j0 = 0; j0 < kKeyBlock; j0 += 16) {
          score_4x16(&qbuf[i0 * d_len], d_len, &kt[j0], &scores[i0 * kKeyBlock + j0]);
        }
      }
    }
    for (int64_t i = 0; i < nq; ++i) {
      float* vals = &top_vals[i * k];
      int32_t* ids = &top_ids[i * k];
      const float* s = &scores[i * kKeyBlock];
      float worst = vals[k - 1];
      for (int64_t j = 0; j < nb; ++j) {
        if (s[j] > worst) {  // false for NaN: a NaN key is never selected
          topk_insert(vals, ids, k, s[j], static_cast<int32_t>(mb + j));
          worst = vals[k - 1];
        }
      }
    }
  }
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t slot = ((h * a.queries_per_head + q0 + i) * num_splits + split) * k;
    std::memcpy(cand_vals + slot, &top_vals[i * k], sizeof(float) * k);
    std::memcpy(cand_ids + slot, &top_ids[i * k], sizeof(int32_t) * k);
  }
}

// Phase 2 for one query: merge the splits' candidates, drop those under the threshold, and
// attend over the selected raw keys and values.
template <ElemType T>
void attend_one(const MemoryAttentionArgs& a, int64_t h, int64_t qi, int64_t num_splits, const float* cand_vals,
                const int32_t* cand_ids, float* vals, int32_t* ids, float* logits, float* acc) {
  const int64_t d_len = a.head_dim, k = a.topk;
  const int64_t row = h * a.queries_per_head + qi;
  std::fill_n(vals, k, kNegInf);
  std::fill_n(ids, k, -1);
  for (int64_t c = 0; c < num_splits * k; ++c) {
    const float v = cand_vals[row * num_splits * k + c];
    const int32_t id = cand_ids[row * num_splits * k + c];
    if (id >= 0 && v > vals[k - 1]) topk_insert(vals, ids, k, v, id);
  }
  const float* q = a.query + row * d_len;
  float min_score = kNegInf;
  if (a.use_threshold) {
    double qq = 0.0;
    for (int64_t d = 0; d < d_len; ++d) qq += static_cast<double>(q[d]) * q[d];
    min_score = a.similarity_threshold * static_cast<float>(std::sqrt(qq));
  }
  float max_logit = kNegInf;
  for (int64_t r = 0; r < k; ++r) {
    if (ids[r] < 0 || vals[r] < min_score) {
      ids[r] = -1;
      logits[r] = kNegInf;
      continue;
    }
    const auto* krow = row_ptr<T>(a.keys, h, ids[r]);
    float dot = 0.0f;
    for (int64_t d = 0; d < d_len; ++d) dot += q[d] * Elem<T>::to_f32(krow[d]);
    if constexpr (T == ElemType::kInt8) dot *= a.key_scales[h * a.mem_len + ids[r]];
    logits[r] = dot * a.scale;
    max_logit = std::max(max_logit, logits[r]);
  }
  float* out = a.out + row * d_len;
  int64_t* out_ids = a.indices + row * k;
  for (int64_t r = 0; r < k; ++r) out_ids[r] = ids[r];
  if (max_logit == kNegInf) {  // nothing attended: zero output, empty log-sum-exp
    std::fill_n(out, d_len, 0.0f);
    a.lse[row] = kNegInf;
    return;
  }
  std::fill_n(acc, d_len, 0.0f);
  float sum = 0.0f;
  for (int64_t r = 0; r < k; ++r) {
    if (ids[r] < 0) continue;
    const float p = std::exp(logits[r] - max_logit);
    sum += p;
    const auto* vrow = row_ptr<T>(a.values, h, ids[r]);
    float w = p;
    if constexpr (T == ElemType::kInt8) w *= a.value_scales[h * a.mem_len + ids[r]];
    for (int64_t d = 0; d < d_len; ++d) acc[d] += w * Elem<T>::to_f32(vrow[d]);
  }
  const float inv = 1.0f / sum;
  for (int64_t d = 0; d < d_len; ++d) out[d] = acc[d] * inv;
  a.lse[row] = max_logit + std::log(sum);
}

template <ElemType TN, ElemType TKV>
void forward_typed(const MemoryAttentionArgs& a) {
  const int64_t nq_head = a.queries_per_head, k = a.topk;
  const int64_t tile = std::min(kQueryTile, nq_head);
  const int64_t num_tiles = (nq_head + tile - 1) / tile;
  const int64_t base_tasks = a.num_kv_heads * num_tiles;
  // Decode has few queries per head: split the memory so every thread streams a share of it.
  const int64_t want = 2 * static_cast<int64_t>(num_threads());
  int64_t num_splits = 1;
  if (base_tasks < want && a.mem_len * a.head_dim * a.num_kv_heads * 4 >= kMinParallelBytes) {
    num_splits = std::min((want + base_tasks - 1) / base_tasks, std::max<int64_t>(1, a.mem_len / kMinSplitKeys));
  }
  const int64_t num_rows = a.num_kv_heads * nq_head;
  std::vector<float> cand_vals(static_cast<size_t>(num_rows * num_splits * k));
  std::vector<int32_t> cand_ids(static_cast<size_t>(num_rows * num_splits * k));

  const int64_t streamed_bytes =
      num_tiles * a.num_kv_heads * a.mem_len * a.head_dim * static_cast<int64_t>(sizeof(typename Elem<TN>::type));
  const int64_t grain = streamed_bytes < kMinParallelBytes ? base_tasks * num_splits : 1;
  parallel_for(base_tasks * num_splits, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t split = t % num_splits, ht = t / num_splits;
      const int64_t h = ht / num_tiles, q0 = (ht % num_tiles) * tile;
      const int64_t nq = std::min(tile, nq_head - q0);
      const int64_t m0 = a.mem_len * split / num_splits, m1 = a.mem_len * (split + 1) / num_splits;
      score_and_select<TN>(a, h, q0, nq, m0, m1, split, num_splits, cand_vals.data(), cand_ids.data());
    }
  });
  parallel_for(num_rows, 64, [&](int64_t begin, int64_t end) {
    std::vector<float> vals(static_cast<size_t>(k)), logits(static_cast<size_t>(k)), acc(static_cast<size_t>(a.head_dim));
    std::vector<int32_t> ids(static_cast<size_t>(k));
    for (int64_t r = begin; r < end; ++r) {
      attend_one<TKV>(a, r / nq_head, r % nq_head, num_splits, cand_vals.data(), cand_ids.data(), vals.data(), ids.data(),
                    logits.data(), acc.data());
    }
  });
}

void check(bool ok, const std::string& what) {
  if (!ok) throw InvalidInput("memory_attention: " + what);
}

template <ElemType TN>
void dispatch_kv(const MemoryAttentionArgs& a) {
  switch (a.kv_dtype) {
    case ElemType::kFloat32:
      return forward_typed<TN, ElemType::kFloat32>(a);
    case ElemType::kFloat16:
      return forward_typed<TN, ElemType::kFloat16>(a);
    case ElemType::kBFloat16:
      return forward_typed<TN, ElemType::kBFloat16>(a);
    case ElemType::kInt8:
      return forward_typed<TN, ElemType::kInt8>(a);
    default:
      break;
  }
  throw InvalidInput("memory_attention: unknown dtype code " + std::to_string(static_cast<int>(a.kv_dtype)));
}

}  // namespace

void memory_attention_forward(const MemoryAttentionArgs& a) {
  check(a.query && a.out && a.lse && a.indices, "null query or output pointer");
  check(a.num_kv_heads >= 1 && a.queries_per_head >= 1 && a.head_dim >= 1,
        "num_kv_heads, queries_per_head and head_dim must be >= 1");
  check(a.mem_len >= 1 && a.mem_len <= std::numeric_limits<int32_t>::max(),
        "mem_len must be in [1, 2^31 - 1], got " + std::to_string(a.mem_len));
  check(a.topk >= 1 && a.topk <= a.mem_len,
        "topk must be in [1, mem_len=" + std::to_string(a.mem_len) + "], got " + std::to_string(a.topk));
  for (const MemoryTensor* t : {&a.keys_normed, &a.keys, &a.values}) {
    check(t->data != nullptr, "null memory tensor");
    check(t->stride_row >= a.head_dim && t->stride_head >= 0, "memory rows must not overlap");
  }
  check(a.normed_dtype != ElemType::kInt8, "mem_keys_normed must be a float tensor");
  if (a.kv_dtype == ElemType::kInt8) check(a.key_scales && a.value_scales, "int8 keys and values need row scales");
  switch (a.normed_dtype) {
    case ElemType::kFloat32:
      return dispatch_kv<ElemType::kFloat32>(a);
    case ElemType::kFloat16:
      return dispatch_kv<ElemType::kFloat16>(a);
    case ElemType::kBFloat16:
      return dispatch_kv<ElemType::kBFloat16>(a);
    default:
      break;
  }
  throw InvalidInput("memory_attention: unknown dtype code " + std::to_string(static_cast<int>(a.normed_dtype)));
}

int merge_attention_states_f32(const float* out_a, const float* lse_a, const float* out_b, const float* lse_b,
                               int64_t rows, int64_t head_dim, float* out, float* lse) {
  check(rows >= 0 && head_dim >= 1, "merge: rows must be >= 0 and head_dim >= 1");
  check(rows == 0 || (out_a && lse_a && out_b && lse_b && out && lse), "merge: null pointer");
  // Validate first, so that a bad input leaves the outputs untouched.
  for (int side = 0; side < 2; ++side) {
    const float* l = side == 0 ? lse_a : lse_b;
    for (int64_t r = 0; r < rows; ++r) {
      if (std::isnan(l[r]) || l[r] == std::numeric_limits<float>::infinity()) return side + 1;
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float la = lse_a[r], lb = lse_b[r];
    float m = std::max(la, lb);
    if (std::isinf(m)) m = 0.0f;  // both sides empty (-inf): exp() gives 0 instead of NaN
    const float wa = std::exp(la - m), wb = std::exp(lb - m);
    const float total = wa + wb;
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    const float ca = wa * inv, cb = wb * inv;
    const float* a = out_a + r * head_dim;
    const float* b = out_b + r * head_dim;
    float* o = out + r * head_dim;
    for (int64_t d = 0; d < head_dim; ++d) o[d] = a[d] * ca + b[d] * cb;
    lse[r] = m + std::log(total);
  }
  return 0;
}

}  // namespace KCORE_ISA
}  // namespace kcore
