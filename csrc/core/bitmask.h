// Applying a token bitmask to logits in place (the structured-generation step of xgrammar,
// llguidance and outlines-core): logits[r, j] = -inf wherever bit j % 32 of word j / 32 of the
// row's bitmask is 0. Pure C++ on raw pointers; the binding layer validates shapes first.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace kcore {

struct BitmaskArgs {
  void* logits;                 // (rows, logits_row_stride) elements of `dtype`
  ElemType dtype;               // kFloat32, kFloat16 or kBFloat16
  int64_t rows;                 // rows of logits
  int64_t vocab;                // tokens per logits row (logits.shape[1])
  int64_t logits_row_stride;    // elements between consecutive logits rows
  const int32_t* bitmask;       // (bitmask_rows, bitmask_row_stride) words
  int64_t bitmask_rows;
  int64_t bitmask_words;        // words per bitmask row; >= ceil(vocab / 32), extra bits ignored
  int64_t bitmask_row_stride;   // words between consecutive bitmask rows (0 broadcasts one row)
  const int64_t* indices;       // rows to mask (row r uses bitmask row r); nullptr = every row
  int64_t num_indices;
};

// Sets the masked logits to -inf in place. Rows not listed in `indices` (when given) are left
// untouched, and so are logits whose bit is 1. Bits for tokens >= vocab are ignored. Large
// batches are split over threads with parallel_for. Arguments must already be validated
// (validate_bitmask_args); indices are checked again here and raise InvalidInput.
void apply_token_bitmask_cpu(const BitmaskArgs& args);

// Throws kcore::InvalidInput naming the offending argument if `args` is inconsistent. The index
// values are range-checked only when `indices_on_host` (device indices are checked by the caller).
void validate_bitmask_args(const BitmaskArgs& args, bool indices_on_host);

}  // namespace kcore
