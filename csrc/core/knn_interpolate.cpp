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
#include "core/knn.h"
#include "core/knn_simd.h"
#include "core/parallel.h"

namespace kcore {
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

template <KnnDType DT>
inline v16f load_logits(const void* row, int64_t i) {
  if constexpr (DT == KnnDType::F32) return simd::load(static_cast<const float*>(row) + i);
  else if constexpr (DT == KnnDType::F16) return simd::load_f16(static_cast<const uint16_t*>(row) + i);
  else return simd::load_bf16(static_cast<const uint16_t*>(row) + i);
}

template <KnnDType DT>
inline float logit_at(const void* row, int64_t i) {
  if constexpr (DT == KnnDType::F32) return static_cast<const float*>(row)[i];
  else if constexpr (DT == KnnDType::F16) return simd::f16_to_float(static_cast<const uint16_t*>(row)[i]);
  else return simd::bf16_to_float(static_cast<const uint16_t*>(row)[i]);
}

// out = logits - lse + offset, returns nothing; lse = log(sum(exp(logits))).
template <KnnDType DT>
void log_softmax_row(const void* row, int64_t vocab, float offset, float* out) {
  const int64_t full = vocab / simd::kLanes * simd::kLanes;
  v16f vm = simd::splat(kNegInf);
  for (int64_t i = 0; i < full; i += simd::kLanes) vm = simd::vmax(vm, load_logits<DT>(row, i));
  float m = simd::hmax(vm);
  for (int64_t i = full; i < vocab; ++i) m = std::max(m, logit_at<DT>(row, i));
  const v16f vmx = simd::splat(m);
  v16f vs{};
  for (int64_t i = 0; i < full; i += simd::kLanes) vs += simd::exp(load_logits<DT>(row, i) - vmx);
  double s = simd::hsum(vs);
  for (int64_t i = full; i < vocab; ++i) s += std::exp(static_cast<double>(logit_at<DT>(row, i)) - m);
  const float shift = static_cast<float>(m + std::log(s)) - offset;
  const v16f vsh = simd::splat(shift);
  for (int64_t i = 0; i < full; i += simd::kLanes) simd::store(out + i, load_logits<DT>(row, i) - vsh);
  for (int64_t i = full; i < vocab; ++i) out[i] = logit_at<DT>(row, i) - shift;
}

template <KnnDType DT, typename IdT>
void interpolate_row(const void* row, int64_t vocab, const float* dists, const IdT* values, int64_t k,
                     double lmbda, double inv_temp_signed, float* out, std::vector<std::pair<int64_t, double>>& nb) {
  nb.clear();
  for (int64_t j = 0; j < k; ++j) {
    const int64_t v = static_cast<int64_t>(values[j]);
    if (v == -1) continue;
    if (v < -1 || v >= vocab)
      throw InvalidInput("values must be token ids in [0, " + std::to_string(vocab) + ") or -1 (padding), got " +
                         std::to_string(v));
    if (!std::isfinite(dists[j]))
      throw InvalidInput("dists must be finite for every valid neighbour (values >= 0), got " +
                         std::to_string(dists[j]) + " for token " + std::to_string(v));
    nb.emplace_back(v, static_cast<double>(dists[j]) * inv_temp_signed);
  }
  if (nb.empty() || lmbda == 0.0) {
    log_softmax_row<DT>(row, vocab, 0.f, out);
    return;
  }
  const float log_1m = lmbda < 1.0 ? static_cast<float>(std::log1p(-lmbda)) : kNegInf;
  if (lmbda < 1.0) {
    log_softmax_row<DT>(row, vocab, log_1m, out);
  } else {
    std::fill(out, out + vocab, kNegInf);
  }
  // log p_knn(w) = logsumexp_{j: v_j = w}(s_j) - logsumexp_j(s_j), one group per token.
  double smax = -INFINITY;
  for (auto& p : nb) smax = std::max(smax, p.second);
  double ssum = 0.0;
  for (auto& p : nb) ssum += std::exp(p.second - smax);
  const double log_lmbda_minus_lse = std::log(lmbda) - (smax + std::log(ssum));
  std::sort(nb.begin(), nb.end());  // by token, then score ascending: the group max is last
  for (size_t a = 0; a < nb.size();) {
    size_t b = a;
    while (b < nb.size() && nb[b].first == nb[a].first) ++b;
    const double gmax = nb[b - 1].second;
    double gsum = 0.0;
    for (size_t j = a; j < b; ++j) gsum += std::exp(nb[j].second - gmax);
    float& o = out[nb[a].first];
    o = static_cast<float>(log_add_exp(static_cast<double>(o), gmax + std::log(gsum) + log_lmbda_minus_lse));
    a = b;
  }
}

template <KnnDType DT, typename IdT>
void interpolate_all(const void* logits, int64_t batch, int64_t vocab, int64_t stride, const float* dists,
                     const IdT* values, int64_t k, double lmbda, double inv_temp_signed, float* out) {
  const size_t esize = DT == KnnDType::F32 ? 4 : 2;
  // Rows are independent; small batches run inline (a thread start costs more than a row).
  parallel_for(batch, 8, [&](int64_t b0, int64_t b1) {
    std::vector<std::pair<int64_t, double>> nb;
    nb.reserve(static_cast<size_t>(k));
    for (int64_t b = b0; b < b1; ++b) {
      const void* row = static_cast<const char*>(logits) + static_cast<size_t>(b * stride) * esize;
      interpolate_row<DT, IdT>(row, vocab, dists + b * k, values + b * k, k, lmbda, inv_temp_signed,
                               out + b * vocab, nb);
    }
  });
}

template <KnnDType DT>
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

void knn_interpolate_cpu(const void* logits, KnnDType logits_dtype, int64_t batch, int64_t vocab,
                         int64_t logits_stride, const float* dists, const void* values, bool values_int64,
                         int64_t k, double lmbda, double temperature, KnnMetric metric, float* out) {
  const double inv_temp_signed = (metric == KnnMetric::L2 ? -1.0 : 1.0) / temperature;
  switch (logits_dtype) {
    case KnnDType::F32:
      dispatch_ids<KnnDType::F32>(logits, batch, vocab, logits_stride, dists, values, values_int64, k, lmbda,
                                  inv_temp_signed, out);
      break;
    case KnnDType::F16:
      dispatch_ids<KnnDType::F16>(logits, batch, vocab, logits_stride, dists, values, values_int64, k, lmbda,
                                  inv_temp_signed, out);
      break;
    case KnnDType::BF16:
      dispatch_ids<KnnDType::BF16>(logits, batch, vocab, logits_stride, dists, values, values_int64, k, lmbda,
                                   inv_temp_signed, out);
      break;
  }
}

}  // namespace kcore
