#include "core/fact_step.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "core/errors.h"

namespace kcore {
namespace {

constexpr uint32_t kNegInfF32 = 0xFF800000u;
constexpr uint16_t kNegInfF16 = 0xFC00u;
constexpr uint16_t kNegInfBF16 = 0xFF80u;
constexpr uint16_t kZero16 = 0;

// True when every allowed token of the row has score -inf (after masking, the whole row is -inf):
// then the allowed tokens get score 0, so sampling stays finite and constrained.
template <typename Bits>
void keep_finite(Bits* row, const uint32_t* mask, int64_t vocab, Bits neg_inf, Bits zero) {
  const int64_t words = (vocab + 31) / 32;
  for (int64_t w = 0; w < words; ++w) {
    for (uint32_t m = mask[w]; m != 0; m &= m - 1) {
      const int64_t j = 32 * w + __builtin_ctz(m);
      if (j < vocab && row[j] != neg_inf) return;
    }
  }
  for (int64_t w = 0; w < words; ++w) {
    for (uint32_t m = mask[w]; m != 0; m &= m - 1) {
      const int64_t j = 32 * w + __builtin_ctz(m);
      if (j < vocab) row[j] = zero;
    }
  }
}

}  // namespace

int64_t fact_step(const Trie& trie, const FactStepArgs& a) {
  const int64_t n = a.rows;
  // 1. Advance the states of rows that moved inside a fact, and list the constrained rows.
  // fill_states: the trie state to fill from (-1, an all-zero row, for other rows).
  thread_local std::vector<int64_t> fill_states;
  fill_states.assign(static_cast<size_t>(n), -1);
  int64_t num_constrained = 0;
  for (int64_t i = 0; i < n; ++i) {
    a.first[i] = -1;
    a.flags[i] = 0;
    if (a.mode[i] == kFactFree) continue;
    a.constrained[num_constrained++] = i;
    if (a.mode[i] == kFactInside) {
      if (a.step_token[i] >= 0) a.state[i] = trie.step(a.state[i], a.step_token[i]);
      fill_states[static_cast<size_t>(i)] = a.state[i];
    } else if (a.state[i] < 0 || a.state[i] >= a.terminator_len) {
      throw InvalidInput("terminator index " + std::to_string(a.state[i]) + " of row " + std::to_string(i) +
                         " out of range [0, " + std::to_string(a.terminator_len) + ")");
    }
  }
  if (num_constrained == 0) return 0;
  // 2. The trie's allowed tokens of every row, whole rows written (free rows all zero).
  trie.fill_bitmask(fill_states.data(), n, a.bitmask, a.words, a.written_offsets, a.written_ids);
  // 3. Terminator bits: after a complete fact not written yet, or at a dead end; forced in
  // terminator mode.
  uint32_t* mask = reinterpret_cast<uint32_t*>(a.bitmask);
  const int64_t t0 = a.terminator[0];
  for (int64_t k = 0; k < num_constrained; ++k) {
    const int64_t i = a.constrained[k];
    uint32_t* row = mask + i * a.words;
    if (a.mode[i] == kFactTerminator) {
      const int64_t tok = a.terminator[a.state[i]];
      std::memset(row, 0, static_cast<size_t>(a.words) * sizeof(uint32_t));
      row[tok >> 5] |= 1u << (tok & 31);
      continue;
    }
    const int64_t s = a.state[i];
    const int64_t* w_begin = a.written_offsets ? a.written_ids + a.written_offsets[i] : nullptr;
    const int64_t* w_end = a.written_offsets ? a.written_ids + a.written_offsets[i + 1] : nullptr;
    const bool has_written = a.avoid_duplicates && w_begin != w_end;
    const bool complete = trie.is_complete(s);
    bool term_ok = complete && s >= 0;
    if (complete && a.avoid_duplicates) {
      int64_t f = -1, count = 0;
      trie.fact_range(s, &f, &count);
      a.first[i] = f;
      if (has_written && std::binary_search(w_begin, w_end, f)) term_ok = false;
    }
    // A live trie state always has a continuation or is a whole fact, so only a dead state, or
    // written facts masking every branch, leave nothing allowed.
    bool dead_end = false;
    if (!term_ok) {
      dead_end = s < 0 || (has_written && std::all_of(row, row + a.words, [](uint32_t v) { return v == 0; }));
    }
    a.flags[i] = static_cast<uint8_t>((term_ok ? kFactTermOk : 0) | (dead_end ? kFactDeadEnd : 0));
    if (term_ok || dead_end) row[t0 >> 5] |= 1u << (t0 & 31);
  }
  if (a.logits == nullptr) return num_constrained;
  // 4. Mask the constrained rows' logits, then keep each of them finite.
  BitmaskArgs b;
  b.logits = a.logits;
  b.dtype = a.dtype;
  b.rows = n;
  b.vocab = a.vocab;
  b.logits_row_stride = a.logits_row_stride;
  b.bitmask = a.bitmask;
  b.bitmask_rows = n;
  b.bitmask_words = a.words;
  b.bitmask_row_stride = a.words;
  b.indices = num_constrained == n ? nullptr : a.constrained;
  b.num_indices = num_constrained == n ? 0 : num_constrained;
  validate_bitmask_args(b, /*indices_on_host=*/true);
  apply_token_bitmask_cpu(b);
  for (int64_t k = 0; k < num_constrained; ++k) {
    const int64_t i = a.constrained[k];
    const uint32_t* row_mask = mask + i * a.words;
    if (a.dtype == LogitsDtype::kFloat32) {
      uint32_t* row = static_cast<uint32_t*>(a.logits) + i * a.logits_row_stride;
      keep_finite<uint32_t>(row, row_mask, a.vocab, kNegInfF32, 0u);
    } else {
      uint16_t* row = static_cast<uint16_t*>(a.logits) + i * a.logits_row_stride;
      keep_finite<uint16_t>(row, row_mask, a.vocab, a.dtype == LogitsDtype::kFloat16 ? kNegInfF16 : kNegInfBF16, kZero16);
    }
  }
  return num_constrained;
}

}  // namespace kcore
