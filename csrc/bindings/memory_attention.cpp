// Python binding of the CPU top-k memory attention (csrc/core/memory_attention.h). Tensors arrive
// as data pointers + sizes + strides already validated by kcore/ops/_memory_attention_cpu.py; the
// sizes are checked again here and in the core so a bad call raises instead of crashing.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings/registry.h"
#include "core/errors.h"
#include "core/memory_attention.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

template <typename T>
T* as_ptr(uintptr_t p, const char* name) {
  if (p == 0) throw kcore::InvalidInput(std::string("memory_attention: ") + name + " is a null pointer");
  return reinterpret_cast<T*>(p);
}

void forward(uintptr_t query, int64_t num_kv_heads, int64_t queries_per_head, int64_t head_dim, int64_t mem_len,
             int dtype, uintptr_t keys_normed, int64_t kn_stride_head, int64_t kn_stride_row, uintptr_t keys,
             int64_t k_stride_head, int64_t k_stride_row, uintptr_t values, int64_t v_stride_head,
             int64_t v_stride_row, int64_t topk, double scale, std::optional<double> similarity_threshold,
             uintptr_t out, uintptr_t lse, uintptr_t indices) {
  if (dtype < 0 || dtype > 2) {
    throw kcore::InvalidInput("memory_attention: dtype code must be 0 (f32), 1 (f16) or 2 (bf16), got " +
                              std::to_string(dtype));
  }
  kcore::MemoryAttentionArgs a;
  a.query = as_ptr<const float>(query, "query");
  a.num_kv_heads = num_kv_heads;
  a.queries_per_head = queries_per_head;
  a.head_dim = head_dim;
  a.mem_len = mem_len;
  a.dtype = static_cast<kcore::MemElemType>(dtype);
  a.keys_normed = {as_ptr<const void>(keys_normed, "mem_keys_normed"), kn_stride_head, kn_stride_row};
  a.keys = {as_ptr<const void>(keys, "mem_keys"), k_stride_head, k_stride_row};
  a.values = {as_ptr<const void>(values, "mem_values"), v_stride_head, v_stride_row};
  a.topk = topk;
  a.scale = static_cast<float>(scale);
  a.use_threshold = similarity_threshold.has_value();
  a.similarity_threshold = static_cast<float>(similarity_threshold.value_or(0.0));
  a.out = as_ptr<float>(out, "out");
  a.lse = as_ptr<float>(lse, "lse");
  a.indices = as_ptr<int64_t>(indices, "indices");
  py::gil_scoped_release release;
  kcore::memory_attention_forward(a);
}

}  // namespace

void register_memory_attention(py::module_& m) {
  m.def("memory_attention_forward", &forward, py::arg("query"), py::arg("num_kv_heads"), py::arg("queries_per_head"),
        py::arg("head_dim"), py::arg("mem_len"), py::arg("dtype"), py::arg("keys_normed"), py::arg("kn_stride_head"),
        py::arg("kn_stride_row"), py::arg("keys"), py::arg("k_stride_head"), py::arg("k_stride_row"),
        py::arg("values"), py::arg("v_stride_head"), py::arg("v_stride_row"), py::arg("topk"), py::arg("scale"),
        py::arg("similarity_threshold"), py::arg("out"), py::arg("lse"), py::arg("indices"),
        "Top-k memory attention on CPU over raw pointers: query (num_kv_heads, queries_per_head, head_dim) "
        "float32 contiguous; memory tensors (num_kv_heads, mem_len, head_dim), last dim contiguous; writes out "
        "(num_kv_heads, queries_per_head, head_dim) f32, lse (num_kv_heads, queries_per_head) f32, indices "
        "(num_kv_heads, queries_per_head, topk) int64. Releases the GIL.");
}

}  // namespace kcore::bindings
