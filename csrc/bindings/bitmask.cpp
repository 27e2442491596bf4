// Bindings of the token-bitmask op family: kcore.ops.apply_token_bitmask_ calls these with tensor
// descriptors (checks.h) after its Python-side checks; the descriptors are checked again here (and
// the sizes in kcore::validate_bitmask_args) so a bad call raises kcore.InvalidInputError instead
// of crashing.
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings/checks.h"
#include "bindings/registry.h"
#include "core/bitmask.h"

#ifdef KCORE_WITH_CUDA
#include "cuda/bitmask.h"
#endif

namespace py = pybind11;

namespace kcore::bindings {
namespace {

BitmaskArgs make_args(const TensorArg& logits, const TensorArg& bitmask, const std::optional<TensorArg>& indices) {
  CHECK_DIM(2, logits);  // (rows, vocab)
  CHECK_DTYPE(logits, ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16);
  CHECK_CONTIGUOUS_LAST(logits);
  CHECK_DIM(2, bitmask);  // (bitmask_rows, >= ceil(vocab / 32))
  CHECK_DTYPE(bitmask, ElemType::kInt32);
  CHECK_CONTIGUOUS_LAST(bitmask);
  CHECK_SAME_DEVICE(bitmask, logits);
  BitmaskArgs a;
  a.logits = logits.data;
  a.dtype = logits.dtype;
  a.rows = logits.size(0);
  a.vocab = logits.size(1);
  a.logits_row_stride = logits.stride(0);
  a.bitmask = bitmask.ptr<const int32_t>();
  a.bitmask_rows = bitmask.size(0);
  a.bitmask_words = bitmask.size(1);
  a.bitmask_row_stride = bitmask.stride(0);
  a.indices = nullptr;
  a.num_indices = 0;
  if (indices) {
    CHECK_DIM(1, *indices);  // (num_indices,)
    CHECK_DTYPE(*indices, ElemType::kInt64);
    CHECK_CONTIGUOUS(*indices);
    CHECK_SAME_DEVICE(*indices, logits);
    a.indices = indices->ptr<const int64_t>();
    a.num_indices = indices->size(0);
  }
  return a;
}

}  // namespace

void register_bitmask(py::module_& m) {
  m.def(
      "apply_token_bitmask_cpu",
      [](const TensorArg& logits, const TensorArg& bitmask, const std::optional<TensorArg>& indices) {
        CHECK_HOST(logits);
        BitmaskArgs a = make_args(logits, bitmask, indices);
        if (indices && a.num_indices == 0) return;  // no row selected (its data pointer may be null)
        py::gil_scoped_release release;
        apply_token_bitmask_cpu(a);
      },
      py::arg("logits"), py::arg("bitmask"), py::arg("indices") = py::none(),
      "Set logits ((rows, vocab) float32/float16/bfloat16, host) to -inf in place where the int32 bitmask "
      "bit is 0. indices (int64 (num_indices,) or None) selects rows. Tensors as kcore._native.tensor_arg.");

#ifdef KCORE_WITH_CUDA
  m.def(
      "apply_token_bitmask_cuda",
      [](const TensorArg& logits, const TensorArg& bitmask, const std::optional<TensorArg>& indices, uintptr_t stream) {
        CHECK_ARG(logits.device >= 0, "logits must be on a CUDA device, got host memory");
        BitmaskArgs a = make_args(logits, bitmask, indices);
        if (indices && a.num_indices == 0) return;  // no row selected (its data pointer may be null)
        // Device indices cannot be read here: their values were range-checked in Python.
        validate_bitmask_args(a, /*indices_on_host=*/false);
        std::string error;
        {
          py::gil_scoped_release release;
          error = cuda::apply_token_bitmask(a, reinterpret_cast<void*>(stream));
        }
        if (!error.empty()) throw std::runtime_error("apply_token_bitmask_cuda: " + error);
      },
      py::arg("logits"), py::arg("bitmask"), py::arg("indices"), py::arg("stream"),
      "CUDA version of apply_token_bitmask_cpu: device tensors, launched on `stream` (cudaStream_t as int).");
#endif
}

}  // namespace kcore::bindings
