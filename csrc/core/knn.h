// Exact k-nearest-neighbour search and kNN-LM interpolation on the CPU (kcore.ops.knn's `cpu`
// backend). Pure C++ on raw pointers; the binding (csrc/bindings/knn.cpp) checks the arguments.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace kcore {

enum class KnnMetric : int { L2 = 0, IP = 1 };

// For each of the `num_queries` fp32 rows of `queries` (contiguous, `dim` columns), the `k` best
// rows of `keys` (`num_keys` rows of `dim` elements of `key_dtype`, row i at keys + i * key_stride
// elements): metric L2 gives squared distances ascending, IP inner products descending, as in
// faiss IndexFlatL2 / IndexFlatIP. Writes out_dists (fp32) and out_ids (int64), both
// (num_queries, k) contiguous; missing neighbours (k > num_keys) get id -1 and +inf (IP: -inf).
// Equal distances come back ordered by id. Keys are streamed once, split across threads.
void knn_search_cpu(const float* queries, int64_t num_queries, int64_t dim, const void* keys,
                    ElemType key_dtype, int64_t num_keys, int64_t key_stride, int64_t k, KnnMetric metric,
                    float* out_dists, int64_t* out_ids);

// kNN-LM interpolation (Khandelwal et al. 2020) of `batch` rows: logits (`vocab` elements of
// `logits_dtype`, row b at logits + b * logits_stride), dists (fp32, batch x k contiguous) and
// values (token ids, int32 or int64, batch x k contiguous, -1 = padding). Writes
//   out = logaddexp(log(1 - lmbda) + log_softmax(logits), log(lmbda) + log p_knn)
// (fp32, batch x vocab contiguous), p_knn = softmax(-dist / temperature) (IP: +score) summed per
// token; a row without valid neighbour gets log_softmax(logits). Throws InvalidInput for a token
// id outside [-1, vocab) or a non-finite score of a valid neighbour.
void knn_interpolate_cpu(const void* logits, ElemType logits_dtype, int64_t batch, int64_t vocab,
                         int64_t logits_stride, const float* dists, const void* values, bool values_int64,
                         int64_t k, double lmbda, double temperature, KnnMetric metric, float* out);

}  // namespace kcore
