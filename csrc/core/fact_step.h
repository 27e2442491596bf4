// One generation step of fact-constrained decoding (kcore.hf.FactLogitsProcessor) for every row
// of a batch in one call: advance the rows' trie states by their new token, fill each row's
// allowed-token bitmask (with duplicate avoidance), add the terminator where a fact may end or
// nothing else is allowed, apply the mask to the logits in place, and keep a row whose allowed
// tokens all had score -inf finite (allowed tokens set to 0). Method: ReFactX (Pezzotti et al.
// 2025) with the int32 token bitmask of xgrammar (Dong et al. 2024).
#pragma once
#include <cstdint>

#include "core/bitmask.h"
#include "core/trie.h"

namespace kcore {

// Row modes, as in kcore/hf/facts.py.
enum FactMode : int8_t { kFactFree = 0, kFactInside = 1, kFactTerminator = 2 };
// Bits of FactStepArgs::flags.
constexpr uint8_t kFactTermOk = 1;   // the fact is complete (and not yet written): terminator allowed
constexpr uint8_t kFactDeadEnd = 2;  // nothing is allowed but the terminator

struct FactStepArgs {
  int64_t rows;
  const int8_t* mode;               // (rows,) FactMode
  int64_t* state;                   // (rows,) in/out: trie state (inside a fact) or terminator index
  const int64_t* step_token;        // (rows,) >= 0: state = trie.step(state, token) first; -1: none
  const int64_t* written_offsets;   // (rows + 1,) CSR of the facts each row wrote, or null
  const int64_t* written_ids;       // sorted within each row
  bool avoid_duplicates;
  const int64_t* terminator;        // (terminator_len,) token ids
  int64_t terminator_len;
  int32_t* bitmask;                 // (rows, words) filled for constrained rows
  int64_t words;
  int64_t* first;                   // (rows,) out: id of the complete fact (dedup only), else -1
  uint8_t* flags;                   // (rows,) out: kFactTermOk | kFactDeadEnd
  int64_t* constrained;             // (rows,) out: indices of the rows not in free text
  // Logits to mask in place (null: only fill the bitmask); rows, vocab as in BitmaskArgs.
  void* logits;
  LogitsDtype dtype;
  int64_t vocab;
  int64_t logits_row_stride;
};

// Returns the number of constrained rows (their indices in args.constrained). Throws
// InvalidInput for a state that is not one of the trie's or a terminator index out of range.
int64_t fact_step(const Trie& trie, const FactStepArgs& args);

}  // namespace kcore
