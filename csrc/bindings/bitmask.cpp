// Bindings of the token-bitmask op family: kcore.ops.apply_token_bitmask_ calls these with raw
// pointers after its Python-side checks; everything is checked again here (and in
// kcore::validate_bitmask_args) so a bad call raises kcore.InvalidInputError instead of crashing.
#include <cstdint>
#include <string>

#include "bindings/registry.h"
#include "core/bitmask.h"
#include "core/errors.h"

#ifdef KCORE_WITH_CUDA
#include "cuda/bitmask.h"
#endif

namespace py = pybind11;

namespace kcore::bindings {
namespace {

BitmaskArgs make_args(uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t logits_row_stride,
                      uintptr_t bitmask, int64_t bitmask_rows, int64_t bitmask_words, int64_t bitmask_row_stride,
                      uintptr_t indices, int64_t num_indices) {
  if (dtype < 0 || dtype > 2)
    throw InvalidInput("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
  BitmaskArgs a;
  a.logits = reinterpret_cast<void*>(logits);  // (rows, vocab), row stride logits_row_stride
  a.dtype = static_cast<LogitsDtype>(dtype);
  a.rows = rows;
  a.vocab = vocab;
  a.logits_row_stride = logits_row_stride;
  a.bitmask = reinterpret_cast<const int32_t*>(bitmask);  // (bitmask_rows, >= ceil(vocab / 32))
  a.bitmask_rows = bitmask_rows;
  a.bitmask_words = bitmask_words;
  a.bitmask_row_stride = bitmask_row_stride;
  a.indices = reinterpret_cast<const int64_t*>(indices);  // (num_indices,) or null
  a.num_indices = num_indices;
  return a;
}

}  // namespace

void register_bitmask(py::module_& m) {
  m.def(
      "apply_token_bitmask_cpu",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t logits_row_stride, uintptr_t bitmask,
         int64_t bitmask_rows, int64_t bitmask_words, int64_t bitmask_row_stride, uintptr_t indices,
         int64_t num_indices) {
        BitmaskArgs a = make_args(logits, dtype, rows, vocab, logits_row_stride, bitmask, bitmask_rows,
                                  bitmask_words, bitmask_row_stride, indices, num_indices);
        py::gil_scoped_release release;
        apply_token_bitmask_cpu(a);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("logits_row_stride"),
      py::arg("bitmask"), py::arg("bitmask_rows"), py::arg("bitmask_words"), py::arg("bitmask_row_stride"), py::arg("indices"),
      py::arg("num_indices"),
      "Set logits (host pointer, (rows, vocab), dtype code 0=fp32 1=fp16 2=bf16) to -inf in place where the "
      "int32 bitmask bit is 0. indices (int64 host pointer or 0) selects rows. Strides are in elements.");

#ifdef KCORE_WITH_CUDA
  m.def(
      "apply_token_bitmask_cuda",
      [](uintptr_t logits, int dtype, int64_t rows, int64_t vocab, int64_t logits_row_stride, uintptr_t bitmask,
         int64_t bitmask_rows, int64_t bitmask_words, int64_t bitmask_row_stride, uintptr_t indices,
         int64_t num_indices, uintptr_t stream) {
        BitmaskArgs a = make_args(logits, dtype, rows, vocab, logits_row_stride, bitmask, bitmask_rows,
                                  bitmask_words, bitmask_row_stride, indices, num_indices);
        // Device indices cannot be read here: their values were range-checked in Python.
        validate_bitmask_args(a, /*indices_on_host=*/false);
        std::string error;
        {
          py::gil_scoped_release release;
          error = cuda::apply_token_bitmask(a, reinterpret_cast<void*>(stream));
        }
        if (!error.empty()) throw std::runtime_error("apply_token_bitmask_cuda: " + error);
      },
      py::arg("logits"), py::arg("dtype"), py::arg("rows"), py::arg("vocab"), py::arg("logits_row_stride"),
      py::arg("bitmask"), py::arg("bitmask_rows"), py::arg("bitmask_words"), py::arg("bitmask_row_stride"), py::arg("indices"),
      py::arg("num_indices"), py::arg("stream"),
      "CUDA version of apply_token_bitmask_cpu: device pointers, launched on `stream` (cudaStream_t as int).");
#endif
}

}  // namespace kcore::bindings
