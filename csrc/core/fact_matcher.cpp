#include "core/fact_matcher.h"

#include <algorithm>
#include <climits>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <utility>

#include "core/errors.h"

namespace kcore {

// ---------------------------------------------------------------------------------------------
// Trigger automaton

TriggerAutomaton::TriggerAutomaton(const std::vector<std::vector<int64_t>>& sequences) {
  if (sequences.empty()) throw InvalidInput("triggers must hold at least one token sequence");
  // 1. The trie of the sequences (goto function), and the alphabet of token ids they use.
  std::vector<std::map<int64_t, int32_t>> go(1);
  std::vector<uint8_t> terminal(1, 0);
  std::map<int64_t, int32_t> columns;
  for (const auto& seq : sequences) {
    if (seq.empty()) throw InvalidInput("every trigger token sequence must be non-empty");
    int32_t s = 0;
    for (int64_t tok : seq) {
      if (tok < 0) throw InvalidInput("trigger token ids must be >= 0, got " + std::to_string(tok));
      columns.emplace(tok, static_cast<int32_t>(columns.size()));
      auto it = go[static_cast<size_t>(s)].find(tok);
      if (it == go[static_cast<size_t>(s)].end()) {
        const int32_t t = static_cast<int32_t>(go.size());
        go[static_cast<size_t>(s)].emplace(tok, t);
        go.emplace_back();
        terminal.push_back(0);
        s = t;
      } else {
        s = it->second;
      }
    }
    terminal[static_cast<size_t>(s)] = 1;
  }
  int64_t max_token = 0;
  for (const auto& [tok, c] : columns) max_token = std::max(max_token, tok);
  column_.assign(static_cast<size_t>(max_token) + 1, -1);
  for (const auto& [tok, c] : columns) column_[static_cast<size_t>(tok)] = c;
  alphabet_ = columns.size();
  // 2. Failure links in breadth-first order, folded into a dense transition table.
  const size_t n = go.size();
  delta_.assign(n * alphabet_, 0);
  accept_.assign(n, 0);
  std::vector<int32_t> fail(n, 0);
  std::deque<int32_t> queue;
  accept_[0] = terminal[0];
  for (const auto& [tok, t] : go[0]) {
    delta_[static_cast<size_t>(column_[static_cast<size_t>(tok)])] = t;
    fail[static_cast<size_t>(t)] = 0;
    queue.push_back(t);
  }
  while (!queue.empty()) {
    const int32_t s = queue.front();
    queue.pop_front();
    const size_t su = static_cast<size_t>(s);
    accept_[su] = terminal[su] | accept_[static_cast<size_t>(fail[su])];
    // Missing transitions follow the failure link (already complete: it is shallower).
    std::memcpy(&delta_[su * alphabet_], &delta_[static_cast<size_t>(fail[su]) * alphabet_], alphabet_ * sizeof(int32_t));
    for (const auto& [tok, t] : go[su]) {
      const size_t c = static_cast<size_t>(column_[static_cast<size_t>(tok)]);
      fail[static_cast<size_t>(t)] = s == 0 ? 0 : delta_[static_cast<size_t>(fail[su]) * alphabet_ + c];
      delta_[su * alphabet_ + c] = t;
      queue.push_back(t);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Matcher

namespace {

// True when every id of [first, first + count) is in the sorted id list (the test of
// Trie::fill_bitmask's duplicate avoidance, so accept and the mask agree).
bool range_written(const std::vector<int64_t>& ids, int64_t first, int64_t count) {
  if (count <= 0) return true;
  const auto a = std::lower_bound(ids.begin(), ids.end(), first);
  const auto b = std::lower_bound(a, ids.end(), first + count);
  return b - a >= count;  // ids are distinct
}

std::string row_token(int64_t row, int64_t token) {
  return "row " + std::to_string(row) + ", token " + std::to_string(token);
}

}  // namespace

FactMatcher::FactMatcher(std::shared_ptr<const Trie> trie, FactMatcherConfig config, int64_t batch_size)
    : trie_(std::move(trie)), config_(std::move(config)), triggers_(config_.triggers), root_(trie_->root_state()) {
  if (batch_size < 0) throw InvalidInput("batch_size must be >= 0, got " + std::to_string(batch_size));
  if (config_.terminator.empty()) throw InvalidInput("terminator must hold at least one token id");
  if (config_.terminator.size() > 64)
    throw InvalidInput("terminator must be at most 64 tokens, got " + std::to_string(config_.terminator.size()));
  for (int64_t t : config_.terminator)
    if (t < 0 || t >= vocab_size())
      throw InvalidInput("terminator token " + std::to_string(t) + " outside [0, trie.vocab_size=" +
                         std::to_string(vocab_size()) + ")");
  if (config_.max_rollback_tokens < 0)
    throw InvalidInput("max_rollback_tokens must be >= 0, got " + std::to_string(config_.max_rollback_tokens));
  std::sort(config_.end_tokens.begin(), config_.end_tokens.end());
  std::sort(config_.stop_tokens.begin(), config_.stop_tokens.end());
  rows_.resize(static_cast<size_t>(batch_size));
  for (Row& r : rows_) r.history.resize(static_cast<size_t>(config_.max_rollback_tokens));
  seen_.assign(static_cast<size_t>(batch_size), 0);
}

size_t FactMatcher::checked(int64_t row) const {
  if (row < 0 || row >= batch_size())
    throw InvalidInput("row " + std::to_string(row) + " out of range [0, batch_size=" + std::to_string(batch_size()) + ")");
  return static_cast<size_t>(row);
}

void FactMatcher::check_distinct(const int64_t* rows, int64_t n, const char* name) {
  if (++stamp_ == 0) {  // wrapped: clear the stamps once every 2^32 calls
    std::fill(seen_.begin(), seen_.end(), 0);
    stamp_ = 1;
  }
  for (int64_t i = 0; i < n; ++i) {
    const size_t r = checked(rows[i]);
    if (seen_[r] == stamp_)
      throw InvalidInput(std::string(name) + " must be distinct; row " + std::to_string(rows[i]) + " appears twice");
    seen_[r] = stamp_;
  }
}

bool FactMatcher::is_end_token(int64_t t) const {
  return t == config_.terminator[0] || std::binary_search(config_.end_tokens.begin(), config_.end_tokens.end(), t);
}

bool FactMatcher::is_stop_token(int64_t t) const {
  return std::binary_search(config_.stop_tokens.begin(), config_.stop_tokens.end(), t);
}

bool FactMatcher::terminator_allowed(const Row& r, int64_t s, int64_t* fact_id) const {
  *fact_id = -1;
  if (s < 0) return true;  // dead: nothing but the terminator
  const bool complete = trie_->is_complete(s);
  const bool avoid = config_.avoid_duplicates && !r.written.empty();
  if (!complete && !avoid) return false;  // a live incomplete state always has a continuation
  int64_t first = 0, count = 0;
  trie_->fact_range(s, &first, &count);
  if (complete) {
    *fact_id = first;  // a complete fact is the first (lexicographically smallest) below its state
    if (!avoid || !std::binary_search(r.written.begin(), r.written.end(), first)) return true;
  }
  // Dead end: every fact below a child is written already (the children's facts are
  // [first + complete, first + count), in order).
  return range_written(r.written, first + (complete ? 1 : 0), count - (complete ? 1 : 0));
}

bool FactMatcher::child_allowed(const Row& r, int64_t child) const {
  if (child < 0) return false;
  if (!config_.avoid_duplicates || r.written.empty()) return true;
  int64_t first = 0, count = 0;
  trie_->fact_range(child, &first, &count);
  return !range_written(r.written, first, count);
}

FactMatcher::Transition FactMatcher::transition(const Row& r, int64_t tok, bool strict, bool prompt) const {
  Transition t;
  Core& c = t.next;
  c = r.c;
  c.pos = r.c.pos + 1;
  c.ac = triggers_.next(r.c.ac, tok);
  if (r.c.terminated) {
    if (strict) t.ok = false;
    return t;
  }
  auto close = [&](int64_t fact_id) {
    t.closes = true;
    t.fact = MatcherFact{fact_id, r.c.fact_start, r.c.pos};
    c.num_facts = r.c.num_facts + 1;
    const bool multi = tok == config_.terminator[0] && config_.terminator.size() > 1;
    c.mode = multi ? kMatcherTerminator : kMatcherFree;
    c.term_k = multi ? 1 : 0;
    c.trie_state = -1;
  };
  switch (r.c.mode) {
    case kMatcherFree:
      if (!prompt && is_stop_token(tok)) {
        c.terminated = 1;
      } else if (triggers_.accepting(c.ac)) {
        c.mode = kMatcherInFact;
        c.trie_state = root_;
        c.fact_start = c.pos;
      }
      break;
    case kMatcherInFact: {
      const int64_t s = r.c.trie_state;
      int64_t fact_id = -1;
      if (tok == config_.terminator[0] && terminator_allowed(r, s, &fact_id)) {
        close(fact_id);
        break;
      }
      const int64_t child = s >= 0 ? trie_->step(s, tok) : -1;
      if (child_allowed(r, child)) {
        c.trie_state = child;
      } else if (strict) {
        t.ok = false;
      } else if (is_end_token(tok) || is_stop_token(tok)) {
        int64_t id = -1, count = 0;
        if (s >= 0 && trie_->is_complete(s)) trie_->fact_range(s, &id, &count);
        close(id);
        if (!prompt && is_stop_token(tok)) c.terminated = 1;
      } else {
        c.trie_state = -1;  // off the trie (a prompt, or text written without the mask)
      }
      break;
    }
    default: {  // terminator mode
      const size_t k = static_cast<size_t>(r.c.term_k);
      if (tok == config_.terminator[k]) {
        if (k + 1 < config_.terminator.size()) {
          c.term_k = static_cast<int8_t>(k + 1);
        } else {
          c.mode = kMatcherFree;
          c.term_k = 0;
        }
      } else if (strict) {
        t.ok = false;
      } else {
        c.mode = kMatcherFree;
        c.term_k = 0;
        if (!prompt && is_stop_token(tok)) c.terminated = 1;
      }
    }
  }
  return t;
}

void FactMatcher::apply(Row& r, const Transition& t) {
  if (!r.history.empty()) {
    r.history[static_cast<size_t>(r.hist_head)] = r.c;
    r.hist_head = (r.hist_head + 1) % static_cast<int64_t>(r.history.size());
    r.hist_len = std::min<int64_t>(r.hist_len + 1, static_cast<int64_t>(r.history.size()));
  }
  r.c = t.next;
  if (t.closes) {
    r.facts.push_back(t.fact);
    const int64_t id = t.fact.fact_id;
    if (config_.avoid_duplicates && id >= 0) {
      auto it = std::lower_bound(r.written.begin(), r.written.end(), id);
      if (it == r.written.end() || *it != id) r.written.insert(it, id);
    }
  }
}

void FactMatcher::accept(const int64_t* rows, const int64_t* tokens, int64_t n, bool strict) {
  check_distinct(rows, n, "rows");
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0) throw InvalidInput("token ids must be >= 0; " + row_token(rows[i], tokens[i]));
  if (n == 1) {  // the common decode step: no buffer
    Row& r = rows_[static_cast<size_t>(rows[0])];
    const Transition t = transition(r, tokens[0], strict, false);
    if (t.ok) {
      apply(r, t);
      return;
    }
    throw InvalidInput(std::string("token refused by the fact constraint: ") + row_token(rows[0], tokens[0]) +
                       (r.c.terminated ? " (the row is terminated)" : " is not allowed by the row's mask"));
  }
  scratch_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const Row& r = rows_[static_cast<size_t>(rows[i])];
    scratch_[static_cast<size_t>(i)] = transition(r, tokens[i], strict, false);
    if (!scratch_[static_cast<size_t>(i)].ok)
      throw InvalidInput(std::string("token refused by the fact constraint: ") + row_token(rows[i], tokens[i]) +
                         (r.c.terminated ? " (the row is terminated)" : " is not allowed by the row's mask") +
                         "; no row of the call was changed");
  }
  for (int64_t i = 0; i < n; ++i) apply(rows_[static_cast<size_t>(rows[i])], scratch_[static_cast<size_t>(i)]);
}

void FactMatcher::accept_sequence(int64_t row, const int64_t* tokens, int64_t n, bool strict) {
  Row& r = rows_[checked(row)];
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0) throw InvalidInput("token ids must be >= 0; " + row_token(row, tokens[i]));
  if (!strict) {
    for (int64_t i = 0; i < n; ++i) apply(r, transition(r, tokens[i], false, false));
    return;
  }
  const Row backup = r;
  for (int64_t i = 0; i < n; ++i) {
    const Transition t = transition(r, tokens[i], true, false);
    if (!t.ok) {
      const bool terminated = r.c.terminated != 0;
      r = backup;
      throw InvalidInput(std::string("token refused by the fact constraint: ") + row_token(row, tokens[i]) + " at index " +
                         std::to_string(i) + (terminated ? " (the row is terminated)" : " is not allowed by the row's mask") +
                         "; the row was left unchanged");
    }
    apply(r, t);
  }
}

void FactMatcher::resize(int64_t batch_size) {
  if (batch_size < 0) throw InvalidInput("batch_size must be >= 0, got " + std::to_string(batch_size));
  const size_t old = rows_.size();
  rows_.resize(static_cast<size_t>(batch_size));
  for (size_t i = old; i < rows_.size(); ++i) rows_[i].history.resize(static_cast<size_t>(config_.max_rollback_tokens));
  seen_.assign(rows_.size(), 0);
  stamp_ = 0;
}

void FactMatcher::prefill(int64_t row, const int64_t* tokens, int64_t n) {
  Row& r = rows_[checked(row)];
  for (int64_t i = 0; i < n; ++i)
    if (tokens[i] < 0) throw InvalidInput("token ids must be >= 0; " + row_token(row, tokens[i]));
  for (int64_t i = 0; i < n; ++i) {
    const Transition t = transition(r, tokens[i], /*strict=*/false, /*prompt=*/true);
    r.c = t.next;  // no history, no facts: the prompt's facts do not count as written
  }
  r.facts.clear();
  r.written.clear();
  r.c.num_facts = 0;
  r.c.fact_start -= r.c.pos;  // an open fact started inside the prompt: negative start
  r.c.pos = 0;
  r.hist_len = 0;
}

void FactMatcher::fill_next_token_bitmask(const int64_t* rows, int64_t n, int32_t* bitmask, int64_t words,
                                          bool* out) const {
  if (words < bitmask_words())
    throw InvalidInput("bitmask has " + std::to_string(words) + " words per row, expected at least ceil(" +
                       std::to_string(vocab_size()) + " / 32) = " + std::to_string(bitmask_words()));
  for (int64_t i = 0; i < n; ++i) checked(rows[i]);
  const int64_t t0 = config_.terminator[0];
  for (int64_t i = 0; i < n; ++i) {
    const Row& r = rows_[static_cast<size_t>(rows[i])];
    int32_t* row32 = bitmask + i * words;
    uint32_t* row = reinterpret_cast<uint32_t*>(row32);
    if (r.c.terminated || r.c.mode == kMatcherFree) {
      out[i] = false;
      continue;
    }
    out[i] = true;
    if (r.c.mode == kMatcherTerminator) {
      const int64_t tok = config_.terminator[static_cast<size_t>(r.c.term_k)];
      std::memset(row, 0, static_cast<size_t>(words) * sizeof(uint32_t));
      row[tok >> 5] |= 1u << (tok & 31);
      continue;
    }
    const int64_t s = r.c.trie_state;
    if (s < 0) {
      std::memset(row, 0, static_cast<size_t>(words) * sizeof(uint32_t));
    } else if (config_.avoid_duplicates && !r.written.empty()) {
      const int64_t offsets[2] = {0, static_cast<int64_t>(r.written.size())};
      trie_->fill_bitmask(&s, 1, row32, words, offsets, r.written.data());
    } else {
      trie_->fill_bitmask(&s, 1, row32, words, nullptr, nullptr);
    }
    int64_t fact_id = -1;
    if (terminator_allowed(r, s, &fact_id)) row[t0 >> 5] |= 1u << (t0 & 31);
  }
}

bool FactMatcher::is_allowed(int64_t row, int64_t token) const {
  const Row& r = rows_[checked(row)];
  if (token < 0) return false;
  return transition(r, token, /*strict=*/true, false).ok;
}

void FactMatcher::fork(const int64_t* src, const int64_t* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) checked(src[i]);
  check_distinct(dst, n, "dst_rows");
  // A gather: copy the sources first, so a permutation of the rows onto themselves works.
  if (scratch_rows_.size() < static_cast<size_t>(n)) scratch_rows_.resize(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) scratch_rows_[static_cast<size_t>(i)] = rows_[static_cast<size_t>(src[i])];
  for (int64_t i = 0; i < n; ++i) std::swap(rows_[static_cast<size_t>(dst[i])], scratch_rows_[static_cast<size_t>(i)]);
}

void FactMatcher::reset(const int64_t* rows, int64_t n) {
  for (int64_t i = 0; i < n; ++i) checked(rows[i]);
  for (int64_t i = 0; i < n; ++i) {
    Row& r = rows_[static_cast<size_t>(rows[i])];
    r.c = Core();
    r.facts.clear();
    r.written.clear();
    r.hist_head = r.hist_len = 0;
  }
}

int64_t FactMatcher::rollback_available(int64_t row) const { return rows_[checked(row)].hist_len; }

void FactMatcher::rollback(int64_t row, int64_t n) {
  Row& r = rows_[checked(row)];
  if (n < 0 || n > r.hist_len)
    throw InvalidInput("rollback of row " + std::to_string(row) + ": n must be in [0, " + std::to_string(r.hist_len) +
                       "] (tokens accepted since reset/prefill, at most max_rollback_tokens=" +
                       std::to_string(config_.max_rollback_tokens) + "), got " + std::to_string(n));
  if (n == 0) return;
  const int64_t size = static_cast<int64_t>(r.history.size());
  r.hist_head = ((r.hist_head - n) % size + size) % size;
  r.hist_len -= n;
  r.c = r.history[static_cast<size_t>(r.hist_head)];
  if (static_cast<int64_t>(r.facts.size()) != r.c.num_facts) {
    r.facts.resize(static_cast<size_t>(r.c.num_facts));
    r.written.clear();
    if (config_.avoid_duplicates) {
      for (const MatcherFact& f : r.facts)
        if (f.fact_id >= 0) r.written.push_back(f.fact_id);
      std::sort(r.written.begin(), r.written.end());
      r.written.erase(std::unique(r.written.begin(), r.written.end()), r.written.end());
    }
  }
}

int64_t FactMatcher::open_fact_start(int64_t row) const {
  const Row& r = rows_[checked(row)];
  return r.c.mode == kMatcherInFact ? r.c.fact_start : INT64_MIN;
}

bool FactMatcher::same_state(int64_t a, int64_t b) const {
  const Row& x = rows_[checked(a)];
  const Row& y = rows_[checked(b)];
  if (x.c.mode != y.c.mode || x.c.ac != y.c.ac || x.c.terminated != y.c.terminated) return false;
  if (x.c.mode == kMatcherInFact && x.c.trie_state != y.c.trie_state) return false;
  if (x.c.mode == kMatcherTerminator && x.c.term_k != y.c.term_k) return false;
  return x.written == y.written;
}

// ---------------------------------------------------------------------------------------------
// Masking CPU logits

namespace {

constexpr uint32_t kNegInfF32 = 0xFF800000u;
constexpr uint16_t kNegInfF16 = 0xFC00u;
constexpr uint16_t kNegInfBF16 = 0xFF80u;

template <typename Bits>
void keep_finite(Bits* row, const uint32_t* mask, int64_t vocab, Bits neg_inf) {
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
      if (j < vocab) row[j] = Bits(0);
    }
  }
}

}  // namespace

void apply_bitmask_keep_finite(const BitmaskArgs& a) {
  validate_bitmask_args(a, /*indices_on_host=*/true);
  apply_token_bitmask_cpu(a);
  const int64_t n = a.indices ? a.num_indices : a.rows;
  for (int64_t k = 0; k < n; ++k) {
    const int64_t i = a.indices ? a.indices[k] : k;
    const uint32_t* mask = reinterpret_cast<const uint32_t*>(a.bitmask + i * a.bitmask_row_stride);
    if (a.dtype == ElemType::kFloat32) {
      keep_finite<uint32_t>(static_cast<uint32_t*>(a.logits) + i * a.logits_row_stride, mask, a.vocab, kNegInfF32);
    } else {
      keep_finite<uint16_t>(static_cast<uint16_t*>(a.logits) + i * a.logits_row_stride, mask, a.vocab,
                            a.dtype == ElemType::kFloat16 ? kNegInfF16 : kNegInfBF16);
    }
  }
}

}  // namespace kcore
