// Argument checks of the bitmask kernels, compiled once (baseline): the CPU kernel variants
// (bitmask.cpp, compiled per instruction set), the CUDA binding and the fact step all call them.
#include <algorithm>
#include <string>

#include "core/bitmask.h"
#include "core/errors.h"

namespace kcore {

void validate_bitmask_args(const BitmaskArgs& a, bool indices_on_host) {
  if (!is_float(a.dtype))
    throw InvalidInput(std::string("logits must be float32, float16 or bfloat16, got ") + elem_type_name(a.dtype));
  if (a.rows < 0 || a.vocab < 0)
    throw InvalidInput("logits shape must be non-negative, got (" + std::to_string(a.rows) + ", " + std::to_string(a.vocab) + ")");
  const int64_t needed_words = (a.vocab + 31) / 32;
  if (a.bitmask_words < needed_words)
    throw InvalidInput("bitmask must have at least ceil(vocab / 32) = " + std::to_string(needed_words) +
                       " words per row for vocab = " + std::to_string(a.vocab) + ", got " + std::to_string(a.bitmask_words));
  if (a.bitmask_rows < 0 || a.bitmask_row_stride < 0)
    throw InvalidInput("bitmask rows and row stride must be >= 0, got " + std::to_string(a.bitmask_rows) + " and " +
                       std::to_string(a.bitmask_row_stride));
  if (a.rows > 1 && a.logits_row_stride < a.vocab)
    throw InvalidInput("logits row stride must be >= vocab = " + std::to_string(a.vocab) + ", got " +
                       std::to_string(a.logits_row_stride));
  if (a.num_indices < 0) throw InvalidInput("num_indices must be >= 0, got " + std::to_string(a.num_indices));
  if (a.indices == nullptr && a.bitmask_rows != a.rows)
    throw InvalidInput("bitmask must have as many rows as logits (" + std::to_string(a.rows) + ") when indices is None, got " +
                       std::to_string(a.bitmask_rows));
  const bool has_work = a.vocab > 0 && (a.indices ? a.num_indices > 0 : a.rows > 0);
  if (has_work && (a.logits == nullptr || a.bitmask == nullptr))
    throw InvalidInput("logits and bitmask pointers must not be null");
  if (a.indices == nullptr && a.num_indices != 0)
    throw InvalidInput("indices pointer is null but num_indices = " + std::to_string(a.num_indices));
  if (a.indices != nullptr && indices_on_host) {
    const int64_t limit = std::min(a.rows, a.bitmask_rows);
    for (int64_t i = 0; i < a.num_indices; ++i) {
      const int64_t r = a.indices[i];
      if (r < 0 || r >= limit)
        throw InvalidInput("indices[" + std::to_string(i) + "] = " + std::to_string(r) + " is out of range [0, " +
                           std::to_string(limit) + ") (rows of logits and bitmask)");
    }
  }
}

}  // namespace kcore
