// Fused kNN-LM interpolation on the CPU. Per row: one vectorised pass for the max of the logits,
// one for the sum of exponentials, one that writes log(1 - lmbda) + log_softmax; then only the
// k neighbours' tokens are touched: their scores are grouped by token (sorted), each group's
// log-sum-exp is exact (no underflow to -inf), and the kNN side is log-added onto those tokens.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "core/errors.h"
#include "core/cpu_dispatch.h"  // compiled once per CPU variant, into namespace KCORE_ISA
#include "core/knn.h"
#include "core/simd.h"
#include "core/parallel.h"

namespace kcore {
namespace KCORE_ISA {
namespace {

using simd::v16f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// log(exp(a) + exp(b)), exact when either side is -inf.
inline double log_add_exp(double a, double b) {
  if (a == -INFINITY) return b;
  if (b == -INFINITY) return a;
  const double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::fabs(a - b)));
}

template <ElemType DT>
inline v16f load_logits(const void* row, int64_t i) {
  if constexpr (DT == ElemType::kFloat32) return simd::load(static_cast<const float*>(row) + i);
  else if constexpr (DT == ElemType::kFloat16) return simd::load_f16(static_cast<const uint16_t*>(row) + i);
  else return simd::load_bf16(static_cast<const uint16_t*>(row) + i);
}

template <ElemType DT>
inline float logit_at(const void* row, int64_t i) {
  if constexpr (DT == ElemType::kFloat32) return static_cast<const float*>(row)[i];
  else if constexpr (DT == ElemType::kFloat16) return f16_to_float(static_cast<const uint16_t*>(row)[i]);
  else return bf16_to_float(static_cast<const uint16_t*>(row)[i]);
}

// out = logits - lse + offset; lse = log(sum(exp(logits))). Returns false (out undefined) when lse
// is not finite: a NaN or +inf logit, or every logit -inf, where log_softmax has no meaning.
template <ElemType DT>
bool log_softmax_row(const void* row, int64_t vocab, float offset, float* out) {
  const int64_t full = vocab / simd::kLanes * simd::kLanes;
  constexpr int64_t kStep = 4 * simd::kLanes;  // four independent chains hide the latencies
  const int64_t full4 = vocab / kStep * kStep;
  v16f vm[4] = {simd::splat(kNegInf), simd::splat(kNegInf), simd::splat(kNegInf), simd::splat(kNegInf)};
  for (int64_t i = 0; i < full4; i += kStep)
    for (int u = 0; u < 4; ++u) vm[u] = simd::vmax(vm[u], load_logits<DT>(row, i + u * simd::kLanes));
  for (int64_t i = full4; i < full; i += simd::kLanes) vm[0] = simd::vmax(vm[0], load_logits<DT>(row, i));
  float m = simd::hmax(simd::vmax(simd::vmax(vm[0], vm[1]), simd::vmax(vm[2], vm[3])));
  for (int64_t i = full; i < vocab; ++i) m = std::max(m, logit_at<DT>(row, i));
  const v16f vmx = simd::splat(m);
  v16f vs[4] = {};
  for (int64_t i = 0; i < full4; i += kStep)
    for (int u = 0; u < 4; ++u) vs[u] += simd::exp(load_logits<DT>(row, i + u * simd::kLanes) - vmx);
  for (int64_t i = full4; i < full; i += simd::kLanes) vs[0] += simd::exp(load_logits<DT>(row, i) - vmx);
  double s = simd::hsum((vs[0] + vs[1]) + (vs[2] + vs[3]));
  for (int64_t i = full; i < vocab; ++i) s += std::exp(static_cast<double>(logit_at<DT>(row, i)) - m);
  const float shift = static_cast<float>(m + std::log(s)) - offset;
  if (!std::isfinite(shift)) return false;
  const v16f vsh = simd::splat(shift);
  for (int64_t i = 0; i < full; i += simd::kLanes) simd::store(out + i, load_logits<DT>(row, i) - vsh);
  for (int64_t i = full; i < vocab; ++i) out[i] = logit_at<DT>(row, i) - shift;
  return true;
}

template <ElemType DT>
void log_softmax_row_checked(const void* row, int64_t vocab, float offset, float* out, int64_t b) {
  if (!log_softmax_row<DT>(row, vocab, offset, out))
    throw InvalidInput("lm_logits row " + std::to_string(b) +
                       " has no finite log-sum-exp (a NaN or +inf logit, or every logit -inf)");
}

// Per-thread scratch for one row's kNN side. `acc` (vocab floats) is all zero between rows: only
// the neighbours' tokens are touched and they are reset after use.
struct RowScratch {
  std::vector<int64_t> tok, uniq;
  std::vector<float> score;
  std::vector<float>& acc;
  std::vector<std::pair<int64_t, double>> pairs;
};

// Zeroed once per thread and kept: zeroing vocab floats for every call would cost about as much
// as the kNN side itself.
std::vector<float>& zeroed_scratch(int64_t vocab) {
  thread_local std::vector<float> acc;
  if (static_cast<int64_t>(acc.size()) < vocab) acc.assign(static_cast<size_t>(vocab), 0.f);
  return acc;
}

// Exact grouping (sort by token, per-group max): used when exp(score - max) could underflow.
void mix_knn_exact(RowScratch& w, int64_t n, float log_lmbda, float* out) {
  auto& nb = w.pairs;
  nb.clear();
  double smax = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    nb.emplace_back(w.tok[static_cast<size_t>(j)], w.score[static_cast<size_t>(j)]);
    smax = std::max(smax, static_cast<double>(w.score[static_cast<size_t>(j)]));
  }
  double ssum = 0.0;
  for (auto& p : nb) ssum += std::exp(p.second - smax);
  // Scores are relative to smax before anything is added: with huge scores (tiny temperature)
  // gmax + (log_lmbda - smax) would lose log_lmbda to rounding.
  const double c = log_lmbda - std::log(ssum);
  std::sort(nb.begin(), nb.end());  // by token, then score ascending: the group max is last
  for (size_t a = 0; a < nb.size();) {
    size_t b = a;
    while (b < nb.size() && nb[b].first == nb[a].first) ++b;
    const double gmax = nb[b - 1].second;
    double gsum = 0.0;
    for (size_t j = a; j < b; ++j) gsum += std::exp(nb[j].second - gmax);
    float& o = out[nb[a].first];
    o = static_cast<float>(log_add_exp(static_cast<double>(o), (gmax - smax) + std::log(gsum) + c));
    a = b;
  }
}

// Common case: all exp(score - max) are normal floats, so p_knn per token is a plain sum of them
// (scattered into the zeroed scratch), then logaddexp'd onto the LM side 16 tokens at a time.
void mix_knn_fast(RowScratch& w, int64_t n, float smax, float log_lmbda, float* out) {
  // e_j = exp(score_j - max) in place, 16 at a time
  float* sc = w.score.data();
  int64_t j0 = 0;
  const v16f vmx = simd::splat(smax);
  for (; j0 + simd::kLanes <= n; j0 += simd::kLanes) simd::store(sc + j0, simd::exp(simd::load(sc + j0) - vmx));
  for (; j0 < n; ++j0) sc[j0] = std::exp(sc[j0] - smax);
  float ssum = 0.f;
  w.uniq.clear();
  for (int64_t j = 0; j < n; ++j) {
    const float e = sc[j];
    ssum += e;
    float& a = w.acc[static_cast<size_t>(w.tok[static_cast<size_t>(j)])];
    if (a == 0.f) w.uniq.push_back(w.tok[static_cast<size_t>(j)]);
    a += e;
  }
  const float inv_sum = 1.f / ssum;
  const size_t nu = w.uniq.size();
  for (size_t u0 = 0; u0 < nu; u0 += simd::kLanes) {
    const size_t cnt = std::min<size_t>(simd::kLanes, nu - u0);
    v16f p = simd::splat(1.f), base = simd::splat(kNegInf);
    for (size_t i = 0; i < cnt; ++i) {
      const int64_t t = w.uniq[u0 + i];
      p[i] = w.acc[static_cast<size_t>(t)] * inv_sum;
      base[i] = out[t];
      w.acc[static_cast<size_t>(t)] = 0.f;
    }
    const v16f term = simd::log(p) + log_lmbda;
    const v16f hi = simd::vmax(base, term);
    const v16f lo = base < term ? base : term;
    // log(e^hi + e^lo) = hi + log(1 + e^(lo - hi)); e^(-inf) is 0 in simd::exp
    const v16f r = hi + simd::log(1.0f + simd::exp(lo - hi));
    for (size_t i = 0; i < cnt; ++i) out[w.uniq[u0 + i]] = r[i];
  }
}

template <ElemType DT, typename IdT>
void interpolate_row(const void* row, int64_t b, int64_t vocab, const float* dists, const IdT* values, int64_t k,
                     double lmbda, float score_scale, float* out, RowScratch& w) {
  int64_t n = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t v = static_cast<int64_t>(values[j]);
    if (v == -1) continue;
    if (v < -1 || v >= vocab)
      throw InvalidInput("values must be token ids in [0, " + std::to_string(vocab) + ") or -1 (padding), got " +
                         std::to_string(v));
    if (!std::isfinite(dists[j]))
      throw InvalidInput("dists must be finite for every valid neighbour (values >= 0), got " +
                         std::to_string(dists[j]) + " for token " + std::to_string(v));
    w.tok[static_cast<size_t>(n)] = v;
    w.score[static_cast<size_t>(n)] = dists[j] * score_scale;
    ++n;
  }
  if (n == 0 || lmbda == 0.0) {
    log_softmax_row_checked<DT>(row, vocab, 0.f, out, b);
    return;
  }
  if (lmbda < 1.0) {
    log_softmax_row_checked<DT>(row, vocab, static_cast<float>(std::log1p(-lmbda)), out, b);
  } else {
    std::fill(out, out + vocab, kNegInf);
  }
  float smax = kNegInf, smin = INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    smax = std::max(smax, w.score[static_cast<size_t>(j)]);
    smin = std::min(smin, w.score[static_cast<size_t>(j)]);
  }
  const float log_lmbda = static_cast<float>(std::log(lmbda));
  if (smin - smax > -80.f) {
    mix_knn_fast(w, n, smax, log_lmbda, out);
  } else {
    mix_knn_exact(w, n, log_lmbda, out);
  }
}

template <ElemType DT, typename IdT>
void interpolate_all(const void* logits, int64_t batch, int64_t vocab, int64_t stride, const float* dists,
                     const IdT* values, int64_t k, double lmbda, double inv_temp_signed, float* out) {
  const size_t esize = DT == ElemType::kFloat32 ? 4 : 2;
  // Rows are independent; a single row runs inline (a thread start costs about as much).
  parallel_for(batch, 2, [&](int64_t b0, int64_t b1) {
    RowScratch w{{}, {}, {}, zeroed_scratch(vocab), {}};
    w.tok.resize(static_cast<size_t>(k));
    w.score.resize(static_cast<size_t>(k));
    for (int64_t b = b0; b < b1; ++b) {
      const void* row = static_cast<const char*>(logits) + static_cast<size_t>(b * stride) * esize;
      interpolate_row<DT, IdT>(row, b, vocab, dists + b * k, values + b * k, k, lmbda,
                               static_cast<float>(inv_temp_signed), out + b * vocab, w);
    }
  });
}

template <ElemType DT>
void dispatch_ids(const void* logits, int64_t batch, int64_t vocab, int64_t stride, const float* dists,
                  const void* values, bool values_int64, int64_t k, double lmbda, double inv_temp_signed,
                  float* out) {
  if (values_int64)
    interpolate_all<DT, int64_t>(logits, batch, vocab, stride, dists, static_cast<const int64_t*>(values), k,
                                 lmbda, inv_temp_signed, out);
  else
    interpolate_all<DT, int32_t>(logits, batch, vocab, stride, dists, static_cast<const int32_t*>(values), k,
                                 lmbda, inv_temp_signed, out);
}

}  // namespace

void knn_interpolate_cpu(const void* logits, ElemType logits_dtype, int64_t batch, int64_t vocab,
                         int64_t logits_stride, const float* dists, const void* values, bool values_int64,
                         int64_t k, double lmbda, double temperature, KnnMetric metric, float* out) {
  const double inv_temp_signed = (metric == KnnMetric::L2 ? -1.0 : 1.0) / temperature;
  switch (logits_dtype) {
    case ElemType::kFloat32:
      dispatch_ids<ElemType::kFloat32>(logits, batch, vocab, logits_stride, dists, values, values_int64, k, lmbda,
                                  inv_temp_signed, out);
      break;
    case ElemType::kFloat16:
      dispatch_ids<ElemType::kFloat16>(logits, batch, vocab, logits_stride, dists, values, values_int64, k, lmbda,
                                  inv_temp_signed, out);
      break;
    case ElemType::kBFloat16:
      dispatch_ids<ElemType::kBFloat16>(logits, batch, vocab, logits_stride, dists, values, values_int64, k, lmbda,
                                   inv_temp_signed, out);
      break;
    default:  // the binding admits float logits only
      break;
  }
}

}  // namespace KCORE_ISA
}  // namespace kcore
