// Binding of the fused fact-constrained decoding step (kcore._C.fact_step), called by
// kcore.hf.FactLogitsProcessor once per generation step with arrays it preallocated. Every array
// is checked here (dtype, shape, C-contiguity, no copy: state and the outputs are written in
// place) so a bad call raises kcore.InvalidInputError instead of crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "bindings/registry.h"
#include "core/errors.h"
#include "core/fact_step.h"
#include "core/trie.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

// The data pointer of a C-contiguous array of dtype T with `size` elements (`rows` x `cols` when
// cols >= 0), or InvalidInput naming the argument.
template <typename T>
T* data_of(const py::array& a, const char* name, int64_t size, int64_t cols = -1) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw InvalidInput(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + ", got " +
                       std::string(py::str(a.dtype())));
  if (!(a.flags() & py::array::c_style)) throw InvalidInput(std::string(name) + " must be C-contiguous");
  if (cols >= 0) {
    if (a.ndim() != 2 || a.shape(0) * a.shape(1) != size || a.shape(1) != cols)
      throw InvalidInput(std::string(name) + " must have shape (" + std::to_string(size / (cols ? cols : 1)) + ", " +
                         std::to_string(cols) + ")");
  } else if (a.ndim() != 1 || a.shape(0) < size) {
    throw InvalidInput(std::string(name) + " must be 1-D with at least " + std::to_string(size) + " elements");
  }
  return static_cast<T*>(const_cast<void*>(a.data()));
}

}  // namespace

void register_facts(py::module_& m) {
  m.def(
      "fact_step",
      [](const Trie& trie, int64_t rows, const py::array& mode, const py::array& state, const py::array& step_token,
         const std::optional<py::array>& written_offsets, const std::optional<py::array>& written_ids,
         bool avoid_duplicates, const py::array& terminator, const py::array& bitmask, const py::array& first,
         const py::array& flags, const py::array& constrained, uintptr_t logits, int dtype, int64_t vocab,
         int64_t logits_row_stride) {
        if (rows < 0) throw InvalidInput("rows must be >= 0, got " + std::to_string(rows));
        FactStepArgs a;
        a.rows = rows;
        a.mode = data_of<int8_t>(mode, "mode", rows);
        a.state = data_of<int64_t>(state, "state", rows);
        a.step_token = data_of<int64_t>(step_token, "step_token", rows);
        a.written_offsets = nullptr;
        a.written_ids = nullptr;
        if (written_offsets.has_value() != written_ids.has_value())
          throw InvalidInput("written_offsets and written_ids must be given together");
        if (written_offsets) {
          a.written_offsets = data_of<int64_t>(*written_offsets, "written_offsets", rows + 1);
          const int64_t nids = written_ids->ndim() == 1 ? written_ids->shape(0) : 0;
          a.written_ids = data_of<int64_t>(*written_ids, "written_ids", nids);
          const int64_t* wo = a.written_offsets;
          if (wo[0] != 0) throw InvalidInput("written_offsets must start at 0");
          for (int64_t r = 0; r < rows; ++r) {
            if (wo[r + 1] < wo[r] || wo[r + 1] > nids)
              throw InvalidInput("written_offsets must be non-decreasing and at most len(written_ids)=" +
                                 std::to_string(nids) + " (row " + std::to_string(r) + ")");
            for (int64_t k = wo[r] + 1; k < wo[r + 1]; ++k)
              if (a.written_ids[k] < a.written_ids[k - 1])
                throw InvalidInput("written_ids must be sorted within each row; row " + std::to_string(r) + " is not");
          }
        }
        a.avoid_duplicates = avoid_duplicates;
        a.terminator_len = terminator.ndim() == 1 ? terminator.shape(0) : 0;
        if (a.terminator_len < 1) throw InvalidInput("terminator must be a non-empty 1-D array");
        a.terminator = data_of<int64_t>(terminator, "terminator", a.terminator_len);
        a.words = bitmask.ndim() == 2 ? bitmask.shape(1) : 0;
        a.bitmask = data_of<int32_t>(bitmask, "bitmask", rows * a.words, a.words);
        for (int64_t k = 0; k < a.terminator_len; ++k)
          if (a.terminator[k] < 0 || a.terminator[k] >= static_cast<int64_t>(trie.vocab_size()))
            throw InvalidInput("terminator token " + std::to_string(a.terminator[k]) + " outside [0, trie.vocab_size)");
        a.first = data_of<int64_t>(first, "first", rows);
        a.flags = data_of<uint8_t>(flags, "flags", rows);
        a.constrained = data_of<int64_t>(constrained, "constrained", rows);
        if (dtype < 0 || dtype > 2)
          throw InvalidInput("dtype must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(dtype));
        a.logits = reinterpret_cast<void*>(logits);
        a.dtype = static_cast<LogitsDtype>(dtype);
        a.vocab = vocab;
        a.logits_row_stride = logits_row_stride;
        if (a.logits != nullptr && (vocab < static_cast<int64_t>(trie.vocab_size()) || 32 * a.words < vocab))
          throw InvalidInput("logits vocab " + std::to_string(vocab) + " must be >= trie.vocab_size and <= 32 * bitmask words");
        py::gil_scoped_release release;
        return fact_step(trie, a);
      },
      py::arg("trie"), py::arg("rows"), py::arg("mode"), py::arg("state"), py::arg("step_token"),
      py::arg("written_offsets"), py::arg("written_ids"), py::arg("avoid_duplicates"), py::arg("terminator"),
      py::arg("bitmask"), py::arg("first"), py::arg("flags"), py::arg("constrained"), py::arg("logits"),
      py::arg("dtype"), py::arg("vocab"), py::arg("logits_row_stride"),
      "One fact-constrained decoding step for every row (see csrc/core/fact_step.h): advances states, fills "
      "the bitmask, sets terminator bits and, when logits (host pointer, (rows, vocab), dtype code 0=fp32 1=fp16 "
      "2=bf16, row stride in elements) is not 0, masks them in place. Returns the number of constrained rows.");
}

}  // namespace kcore::bindings
