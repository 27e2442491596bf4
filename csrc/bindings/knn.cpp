// Bindings of the kNN CPU kernels (kcore.ops.knn, backend "cpu"). Tensors arrive as data pointers
// plus sizes, already validated by kcore/ops/_knn_cpu.py; the sizes are checked again here so a
// wrong call raises kcore.InvalidInputError instead of reading out of bounds.
#include <cstdint>
#include <string>

#include "bindings/registry.h"
#include "core/errors.h"
#include "core/knn.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

#define KCORE_CHECK_ARG(cond, msg)                                  \
  do {                                                              \
    if (!(cond)) throw kcore::InvalidInput(std::string("knn: ") + msg); \
  } while (0)

ElemType to_dtype(int code, const char* name) {
  KCORE_CHECK_ARG(code >= 0 && code <= 2, std::string(name) + " dtype code must be 0 (fp32), 1 (fp16) or 2 (bf16), got " +
                                              std::to_string(code));
  return static_cast<ElemType>(code);
}

KnnMetric to_metric(int code) {
  KCORE_CHECK_ARG(code == 0 || code == 1, "metric code must be 0 (l2) or 1 (ip), got " + std::to_string(code));
  return static_cast<KnnMetric>(code);
}

void search(uintptr_t queries, int64_t num_queries, int64_t dim, uintptr_t keys, int key_dtype, int64_t num_keys,
            int64_t key_stride, int64_t k, int metric, uintptr_t out_dists, uintptr_t out_ids) {
  KCORE_CHECK_ARG(num_queries >= 0 && num_keys >= 0, "num_queries and num_keys must be >= 0");
  KCORE_CHECK_ARG(dim >= 1, "dim must be >= 1, got " + std::to_string(dim));
  KCORE_CHECK_ARG(k >= 1, "k must be >= 1, got " + std::to_string(k));
  KCORE_CHECK_ARG(num_keys == 0 || key_stride >= dim,
                  "key_stride must be >= dim (" + std::to_string(dim) + "), got " + std::to_string(key_stride));
  KCORE_CHECK_ARG(num_queries == 0 || (queries && out_dists && out_ids), "null queries or output pointer");
  KCORE_CHECK_ARG(num_keys == 0 || keys, "null keys pointer");
  const ElemType dt = to_dtype(key_dtype, "keys");
  const KnnMetric me = to_metric(metric);
  py::gil_scoped_release release;
  knn_search_cpu(reinterpret_cast<const float*>(queries), num_queries, dim, reinterpret_cast<const void*>(keys), dt,
                 num_keys, key_stride, k, me, reinterpret_cast<float*>(out_dists), reinterpret_cast<int64_t*>(out_ids));
}

void interpolate(uintptr_t logits, int logits_dtype, int64_t batch, int64_t vocab, int64_t logits_stride,
                 uintptr_t dists, uintptr_t values, bool values_int64, int64_t k, double lmbda, double temperature,
                 int metric, uintptr_t out) {
  KCORE_CHECK_ARG(batch >= 0 && k >= 0, "batch and k must be >= 0");
  KCORE_CHECK_ARG(vocab >= 1, "vocab must be >= 1, got " + std::to_string(vocab));
  KCORE_CHECK_ARG(batch <= 1 || logits_stride >= vocab, "logits row stride must be >= vocab");
  KCORE_CHECK_ARG(batch == 0 || (logits && out), "null logits or output pointer");
  KCORE_CHECK_ARG(batch == 0 || k == 0 || (dists && values), "null dists or values pointer");
  KCORE_CHECK_ARG(lmbda >= 0.0 && lmbda <= 1.0, "lmbda must be in [0, 1], got " + std::to_string(lmbda));
  KCORE_CHECK_ARG(temperature > 0.0, "temperature must be > 0, got " + std::to_string(temperature));
  const ElemType dt = to_dtype(logits_dtype, "lm_logits");
  const KnnMetric me = to_metric(metric);
  py::gil_scoped_release release;
  knn_interpolate_cpu(reinterpret_cast<const void*>(logits), dt, batch, vocab, logits_stride,
                      reinterpret_cast<const float*>(dists), reinterpret_cast<const void*>(values), values_int64, k,
                      lmbda, temperature, me, reinterpret_cast<float*>(out));
}

}  // namespace

void register_knn(py::module_& m) {
  m.def("knn_search", &search, py::arg("queries"), py::arg("num_queries"), py::arg("dim"), py::arg("keys"),
        py::arg("key_dtype"), py::arg("num_keys"), py::arg("key_stride"), py::arg("k"), py::arg("metric"),
        py::arg("out_dists"), py::arg("out_ids"),
        "Exact kNN search (see csrc/core/knn.h); pointers are data_ptr() values, queries fp32 contiguous.");
  m.def("knn_interpolate", &interpolate, py::arg("logits"), py::arg("logits_dtype"), py::arg("batch"),
        py::arg("vocab"), py::arg("logits_stride"), py::arg("dists"), py::arg("values"), py::arg("values_int64"),
        py::arg("k"), py::arg("lmbda"), py::arg("temperature"), py::arg("metric"), py::arg("out"),
        "Fused kNN-LM interpolation (see csrc/core/knn.h); writes fp32 log-probabilities to out.");
}

}  // namespace kcore::bindings
