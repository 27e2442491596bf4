// Bindings of the kNN CPU kernels (kcore.ops.knn, backend "cpu"). Tensors arrive as descriptors
// (checks.h) already validated by kcore/ops/_knn_cpu.py; they are checked again here so a wrong
// call raises kcore.InvalidInputError instead of reading out of bounds.
#include <cstdint>
#include <string>

#include "bindings/checks.h"
#include "bindings/registry.h"
#include "core/knn.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

KnnMetric to_metric(int code) {
  CHECK_ARG(code == 0 || code == 1, "metric code must be 0 (l2) or 1 (ip), got ", code);
  return static_cast<KnnMetric>(code);
}

void search(const TensorArg& queries, const TensorArg& keys, int64_t k, int metric, const TensorArg& out_dists,
            const TensorArg& out_ids) {
  CHECK_DIM(2, queries);  // (num_queries, dim)
  CHECK_DTYPE(queries, ElemType::kFloat32);
  CHECK_CONTIGUOUS(queries);
  CHECK_DIM(2, keys);  // (num_keys, dim), row i at keys + i * keys.stride(0)
  CHECK_DTYPE(keys, ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16);
  CHECK_CONTIGUOUS_LAST(keys);
  CHECK_HOST(queries);
  CHECK_HOST(keys);
  CHECK_HOST(out_dists);
  CHECK_HOST(out_ids);
  const int64_t nq = queries.size(0), dim = queries.size(1), num_keys = keys.size(0);
  CHECK_ARG(dim >= 1, "dim must be >= 1, got ", dim);
  CHECK_ARG(keys.size(1) == dim, "keys must have dim ", dim, " like queries, got shape ", shape_str(keys));
  CHECK_ARG(k >= 1, "k must be >= 1, got ", k);
  const int64_t key_stride = num_keys > 1 ? keys.stride(0) : dim;
  CHECK_ARG(key_stride >= dim, "keys rows must not overlap: row stride ", key_stride, " < dim ", dim);
  CHECK_SHAPE(out_dists, nq, k);
  CHECK_DTYPE(out_dists, ElemType::kFloat32);
  CHECK_CONTIGUOUS(out_dists);
  CHECK_SHAPE(out_ids, nq, k);
  CHECK_DTYPE(out_ids, ElemType::kInt64);
  CHECK_CONTIGUOUS(out_ids);
  CHECK_DATA(queries);
  CHECK_DATA(keys);
  CHECK_DATA(out_dists);
  CHECK_DATA(out_ids);
  const KnnMetric me = to_metric(metric);
  py::gil_scoped_release release;
  knn_search_cpu(queries.ptr<const float>(), nq, dim, keys.data, keys.dtype, num_keys, key_stride, k, me,
                 out_dists.ptr<float>(), out_ids.ptr<int64_t>());
}

void interpolate(const TensorArg& logits, const TensorArg& dists, const TensorArg& values, double lmbda,
                 double temperature, int metric, const TensorArg& out) {
  CHECK_DIM(2, logits);  // (batch, vocab)
  CHECK_DTYPE(logits, ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16);
  CHECK_CONTIGUOUS_LAST(logits);
  CHECK_HOST(logits);
  CHECK_HOST(dists);
  CHECK_HOST(values);
  CHECK_HOST(out);
  const int64_t batch = logits.size(0), vocab = logits.size(1);
  CHECK_ARG(vocab >= 1, "vocab must be >= 1, got ", vocab);
  const int64_t logits_stride = batch > 1 ? logits.stride(0) : vocab;
  CHECK_ARG(logits_stride >= vocab, "logits rows must not overlap: row stride ", logits_stride, " < vocab ", vocab);
  CHECK_DIM(2, dists);  // (batch, k)
  CHECK_DTYPE(dists, ElemType::kFloat32);
  CHECK_CONTIGUOUS(dists);
  const int64_t k = dists.size(1);
  CHECK_SHAPE(dists, batch, k);
  CHECK_SHAPE(values, batch, k);
  CHECK_DTYPE(values, ElemType::kInt32, ElemType::kInt64);
  CHECK_CONTIGUOUS(values);
  CHECK_SHAPE(out, batch, vocab);
  CHECK_DTYPE(out, ElemType::kFloat32);
  CHECK_CONTIGUOUS(out);
  CHECK_DATA(logits);
  CHECK_DATA(dists);
  CHECK_DATA(values);
  CHECK_DATA(out);
  CHECK_ARG(lmbda >= 0.0 && lmbda <= 1.0, "lmbda must be in [0, 1], got ", lmbda);
  CHECK_ARG(temperature > 0.0, "temperature must be > 0, got ", temperature);
  const KnnMetric me = to_metric(metric);
  py::gil_scoped_release release;
  knn_interpolate_cpu(logits.data, logits.dtype, batch, vocab, logits_stride, dists.ptr<const float>(), values.data,
                      values.dtype == ElemType::kInt64, k, lmbda, temperature, me, out.ptr<float>());
}

}  // namespace

void register_knn(py::module_& m) {
  m.def("knn_search", &search, py::arg("queries"), py::arg("keys"), py::arg("k"), py::arg("metric"),
        py::arg("out_dists"), py::arg("out_ids"),
        "Exact kNN search (see csrc/core/knn.h): queries (num_queries, dim) float32 contiguous, keys (num_keys, dim) "
        "float, rows contiguous; writes out_dists float32 and out_ids int64 (num_queries, k). Metric 0 = l2, 1 = ip.");
  m.def("knn_interpolate", &interpolate, py::arg("logits"), py::arg("dists"), py::arg("values"), py::arg("lmbda"),
        py::arg("temperature"), py::arg("metric"), py::arg("out"),
        "Fused kNN-LM interpolation (see csrc/core/knn.h): logits (batch, vocab) float, dists (batch, k) float32, "
        "values (batch, k) int32/int64; writes float32 log-probabilities (batch, vocab) to out.");
}

}  // namespace kcore::bindings
