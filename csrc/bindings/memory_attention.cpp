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
             int normed_dtype, int kv_dtype, uintptr_t keys_normed, int64_t kn_stride_head, int64_t kn_stride_row, uintptr_t keys,
             int64_t k_stride_head, int64_t k_stride_row, uintptr_t values, int64_t v_stride_head,
             int64_t v_stride_row, uintptr_t key_scales, uintptr_t value_scales, int64_t topk, double scale,
             std::optional<double> similarity_threshold, uintptr_t out, uintptr_t lse, uintptr_t indices) {
  if (normed_dtype < 0 || normed_dtype > 2) {
    throw kcore::InvalidInput("memory_attention: mem_keys_normed dtype code must be 0 (f32), 1 (f16) or 2 (bf16), got " +
                              std::to_string(normed_dtype));
  }
  if (kv_dtype < 0 || kv_dtype > 3) {
    throw kcore::InvalidInput("memory_attention: mem_keys dtype code must be 0 (f32), 1 (f16), 2 (bf16) or 3 (int8), got " +
                              std::to_string(kv_dtype));
  }
  kcore::MemoryAttentionArgs a;
  a.query = as_ptr<const float>(query, "query");
  a.num_kv_heads = num_kv_heads;
  a.queries_per_head = queries_per_head;
  a.head_dim = head_dim;
  a.mem_len = mem_len;
  a.normed_dtype = static_cast<kcore::ElemType>(normed_dtype);
  a.kv_dtype = static_cast<kcore::ElemType>(kv_dtype);
  if (a.kv_dtype == kcore::ElemType::kInt8) {
    a.key_scales = as_ptr<const float>(key_scales, "mem_key_scales");
    a.value_scales = as_ptr<const float>(value_scales, "mem_value_scales");
  }
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

int merge(uintptr_t out_a, uintptr_t lse_a, uintptr_t out_b, uintptr_t lse_b, int64_t rows, int64_t head_dim,
          uintptr_t out, uintptr_t lse) {
  if (rows == 0) return 0;
  return kcore::merge_attention_states_f32(
      as_ptr<const float>(out_a, "out_a"), as_ptr<const float>(lse_a, "lse_a"), as_ptr<const float>(out_b, "out_b"),
      as_ptr<const float>(lse_b, "lse_b"), rows, head_dim, as_ptr<float>(out, "out"), as_ptr<float>(lse, "lse"));
}

}  // namespace

void register_memory_attention(py::module_& m) {
  m.def("merge_attention_states_f32", &merge, py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"),
        py::arg("rows"), py::arg("head_dim"), py::arg("out"), py::arg("lse"),
        "Merge two attention states over raw float32 contiguous pointers: out_* (rows, head_dim), lse_* (rows). "
        "Returns 0, or 1 / 2 when lse_a / lse_b holds NaN or +inf (nothing written).");
  m.def("memory_attention_forward", &forward, py::arg("query"), py::arg("num_kv_heads"), py::arg("queries_per_head"),
        py::arg("head_dim"), py::arg("mem_len"), py::arg("normed_dtype"), py::arg("kv_dtype"), py::arg("keys_normed"), py::arg("kn_stride_head"),
        py::arg("kn_stride_row"), py::arg("keys"), py::arg("k_stride_head"), py::arg("k_stride_row"),
        py::arg("values"), py::arg("v_stride_head"), py::arg("v_stride_row"), py::arg("key_scales"),
        py::arg("value_scales"), py::arg("topk"), py::arg("scale"),
        py::arg("similarity_threshold"), py::arg("out"), py::arg("lse"), py::arg("indices"),
        "Top-k memory attention on CPU over raw pointers: query (num_kv_heads, queries_per_head, head_dim) "
        "float32 contiguous; memory tensors (num_kv_heads, mem_len, head_dim), last dim contiguous (keys/values "
        "may be int8 with (num_kv_heads, mem_len) float32 row scales, else 0 pointers); writes out "
        "(num_kv_heads, queries_per_head, head_dim) f32, lse (num_kv_heads, queries_per_head) f32, indices "
        "(num_kv_heads, queries_per_head, topk) int64. Releases the GIL.");
}

}  // namespace kcore::bindings
