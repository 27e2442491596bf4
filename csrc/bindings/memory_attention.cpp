// Python binding of the CPU top-k memory attention and of the attention-state merge
// (csrc/core/memory_attention.h). Tensors arrive as descriptors (checks.h) already validated by
// kcore/ops/_memory_attention_cpu.py; they are checked again here and in the core so a bad call
// raises instead of crashing.
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings/checks.h"
#include "bindings/registry.h"
#include "core/memory_attention.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

// One layer's memory tensor, (num_kv_heads, mem_len, head_dim) with rows contiguous.
MemoryTensor memory_tensor(const TensorArg& t, const TensorArg& like, const char* name) {
  check_dim(t, 3, name);
  check_contiguous_last(t, name);
  check_device(t, -1, name);
  check_data(t, name);
  if (t.size(0) != like.size(0) || t.size(1) != like.size(1) || t.size(2) != like.size(2))
    throw InvalidInput(str(name, " must have shape ", shape_str(like), " like mem_keys, got ", shape_str(t)));
  return {t.data, t.stride(0), t.stride(1)};
}

const float* row_scales(const std::optional<TensorArg>& t, const TensorArg& keys, const char* name) {
  if (!t) throw InvalidInput(str("int8 keys and values need ", name, " (num_kv_heads, mem_len) float32"));
  check_dtype(*t, {ElemType::kFloat32}, name);
  check_device(*t, -1, name);
  check_contiguous(*t, name);
  if (t->ndim != 2 || t->size(0) != keys.size(0) || t->size(1) != keys.size(1))
    throw InvalidInput(str(name, " must have shape (", keys.size(0), ", ", keys.size(1), "), got ", shape_str(*t)));
  return t->ptr<const float>();
}

void forward(const TensorArg& query, const TensorArg& mem_keys_normed, const TensorArg& mem_keys,
             const TensorArg& mem_values, const std::optional<TensorArg>& mem_key_scales,
             const std::optional<TensorArg>& mem_value_scales, int64_t topk, double scale,
             std::optional<double> similarity_threshold, const TensorArg& out, const TensorArg& lse,
             const TensorArg& indices) {
  CHECK_DIM(3, query);  // (num_kv_heads, queries_per_head, head_dim)
  CHECK_DTYPE(query, ElemType::kFloat32);
  CHECK_CONTIGUOUS(query);
  CHECK_HOST(query);
  CHECK_DATA(query);
  CHECK_DIM(3, mem_keys);  // (num_kv_heads, mem_len, head_dim)
  CHECK_DTYPE(mem_keys, ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16, ElemType::kInt8);
  CHECK_DTYPE(mem_values, mem_keys.dtype);
  CHECK_DTYPE(mem_keys_normed, ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16);
  const int64_t hkv = query.size(0), nq = query.size(1), d = query.size(2);
  CHECK_ARG(mem_keys.size(0) == hkv && mem_keys.size(2) == d, "mem_keys must have shape (", hkv, ", mem_len, ", d,
            ") like query, got ", shape_str(mem_keys));
  MemoryAttentionArgs a;
  a.keys = memory_tensor(mem_keys, mem_keys, "mem_keys");
  a.values = memory_tensor(mem_values, mem_keys, "mem_values");
  a.keys_normed = memory_tensor(mem_keys_normed, mem_keys, "mem_keys_normed");
  a.query = query.ptr<const float>();
  a.num_kv_heads = hkv;
  a.queries_per_head = nq;
  a.head_dim = d;
  a.mem_len = mem_keys.size(1);
  a.normed_dtype = mem_keys_normed.dtype;
  a.kv_dtype = mem_keys.dtype;
  if (a.kv_dtype == ElemType::kInt8) {
    a.key_scales = row_scales(mem_key_scales, mem_keys, "mem_key_scales");
    a.value_scales = row_scales(mem_value_scales, mem_keys, "mem_value_scales");
  } else {
    CHECK_ARG(!mem_key_scales && !mem_value_scales, "mem_key_scales / mem_value_scales are for int8 mem_keys, got ",
              elem_type_name(mem_keys.dtype));
  }
  a.topk = topk;
  a.scale = static_cast<float>(scale);
  a.use_threshold = similarity_threshold.has_value();
  a.similarity_threshold = static_cast<float>(similarity_threshold.value_or(0.0));
  CHECK_SHAPE(out, hkv, nq, d);
  CHECK_DTYPE(out, ElemType::kFloat32);
  CHECK_CONTIGUOUS(out);
  CHECK_SHAPE(lse, hkv, nq);
  CHECK_DTYPE(lse, ElemType::kFloat32);
  CHECK_CONTIGUOUS(lse);
  CHECK_SHAPE(indices, hkv, nq, topk);
  CHECK_DTYPE(indices, ElemType::kInt64);
  CHECK_CONTIGUOUS(indices);
  CHECK_HOST(out);
  CHECK_HOST(lse);
  CHECK_HOST(indices);
  a.out = out.ptr<float>();
  a.lse = lse.ptr<float>();
  a.indices = indices.ptr<int64_t>();
  py::gil_scoped_release release;
  memory_attention_forward(a);
}

// out_* (*batch_dims, head_dim) and lse_* (*batch_dims), float32 contiguous host tensors.
int merge(const TensorArg& out_a, const TensorArg& lse_a, const TensorArg& out_b, const TensorArg& lse_b,
          const TensorArg& out, const TensorArg& lse) {
  CHECK_ARG(out_a.ndim >= 1, "out_a must have a head_dim axis, got shape ", shape_str(out_a));
  for (const auto& [t, name] : {std::pair{&out_a, "out_a"}, {&out_b, "out_b"}, {&out, "out"},
                                {&lse_a, "lse_a"}, {&lse_b, "lse_b"}, {&lse, "lse"}}) {
    const bool is_lse = name[0] == 'l';
    bool same = t->ndim == out_a.ndim - (is_lse ? 1 : 0);
    for (int d = 0; same && d < t->ndim; ++d) same = t->shape[d] == out_a.shape[d];
    if (!same)
      throw InvalidInput(str(name, " must have shape ", shape_str(out_a), is_lse ? " without its last dim" : "",
                             ", got ", shape_str(*t)));
    check_dtype(*t, {ElemType::kFloat32}, name);
    check_contiguous(*t, name);
    check_device(*t, -1, name);
  }
  const int64_t rows = lse_a.numel(), head_dim = out_a.size(-1);
  CHECK_ARG(head_dim >= 1, "head_dim must be >= 1, got shape ", shape_str(out_a));
  if (rows == 0) return 0;
  return merge_attention_states_f32(out_a.ptr<const float>(), lse_a.ptr<const float>(), out_b.ptr<const float>(),
                                    lse_b.ptr<const float>(), rows, head_dim, out.ptr<float>(), lse.ptr<float>());
}

}  // namespace

void register_memory_attention(py::module_& m) {
  m.def("merge_attention_states_f32", &merge, py::arg("out_a"), py::arg("lse_a"), py::arg("out_b"), py::arg("lse_b"),
        py::arg("out"), py::arg("lse"),
        "Merge two attention states, float32 contiguous host tensors: out_* (*batch_dims, head_dim), lse_* "
        "(*batch_dims). "
        "Returns 0, or 1 / 2 when lse_a / lse_b holds NaN or +inf (nothing written).");
  m.def("memory_attention_forward", &forward, py::arg("query"), py::arg("mem_keys_normed"), py::arg("mem_keys"),
        py::arg("mem_values"), py::arg("mem_key_scales"), py::arg("mem_value_scales"), py::arg("topk"),
        py::arg("scale"), py::arg("similarity_threshold"), py::arg("out"), py::arg("lse"), py::arg("indices"),
        "Top-k memory attention on CPU: query (num_kv_heads, queries_per_head, head_dim) float32 contiguous; "
        "memory tensors (num_kv_heads, mem_len, head_dim), last dim contiguous (keys/values may be int8 with "
        "(num_kv_heads, mem_len) float32 row scales, else None); writes out (num_kv_heads, queries_per_head, "
        "head_dim) float32, lse (num_kv_heads, queries_per_head) float32, indices (num_kv_heads, "
        "queries_per_head, topk) int64. Releases the GIL.");
}

}  // namespace kcore::bindings
