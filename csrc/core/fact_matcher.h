// The native state machine of fact-constrained decoding (ReFactX, Pezzotti et al. 2025): for each
// row of a batch, free text until the row's tokens end with a trigger ("Fact:" in any
// tokenization), then only continuations of facts of an immutable FactTrie, then the terminator
// ("\n") once a fact is complete, then free text again. The API follows xgrammar's
// GrammarMatcher / BatchGrammarMatcher (Dong et al. 2024): accept tokens, fill the next token
// bitmask (int32 [rows, ceil(V/32)]), fork, reset, rollback. One FactMatcher owns `batch_size`
// row slots; the trie is shared (immutable, thread-safe), a matcher is driven by one thread at a
// time. Every operation costs O(rows) trie steps: nothing rescans a row's token history.
#pragma once
#include <cstdint>
#include <memory>
#include <vector>

#include "core/bitmask.h"
#include "core/trie.h"

namespace kcore {

// Aho-Corasick automaton over token ids: state after a token stream is the longest suffix of the
// stream that is a prefix of some trigger sequence; accepting when a whole trigger sequence ends
// at the last token. Transitions are a dense table over the few token ids the triggers use
// (every other token leads to the root), so a step is one or two loads.
class TriggerAutomaton {
 public:
  explicit TriggerAutomaton(const std::vector<std::vector<int64_t>>& sequences);
  int32_t next(int32_t state, int64_t token) const {
    if (token < 0 || token >= static_cast<int64_t>(column_.size())) return 0;
    const int32_t c = column_[static_cast<size_t>(token)];
    return c < 0 ? 0 : delta_[static_cast<size_t>(state) * alphabet_ + static_cast<size_t>(c)];
  }
  bool accepting(int32_t state) const { return accept_[static_cast<size_t>(state)] != 0; }
  int32_t num_states() const { return static_cast<int32_t>(accept_.size()); }

 private:
  std::vector<int32_t> column_;  // token id -> alphabet column, -1 when no trigger uses it
  size_t alphabet_ = 0;
  std::vector<int32_t> delta_;   // [state, column] -> state
  std::vector<uint8_t> accept_;
};

enum FactMatcherMode : int8_t { kMatcherFree = 0, kMatcherInFact = 1, kMatcherTerminator = 2 };

struct FactMatcherConfig {
  std::vector<std::vector<int64_t>> triggers;  // every token sequence spelling the trigger
  std::vector<int64_t> terminator;             // token ids forced after a complete fact
  std::vector<int64_t> end_tokens;             // tokens that close a fact in lenient accepts
  std::vector<int64_t> stop_tokens;            // tokens that terminate a row (EOS)
  bool avoid_duplicates = true;
  int64_t max_rollback_tokens = 16;            // tokens rollback can undo (history kept per row)
};

// One fact written by a row: trie fact id (-1 when the span is not a complete fact of the trie),
// token span [start, end) counted in tokens accepted since reset/prefill.
struct MatcherFact {
  int64_t fact_id;
  int64_t start;
  int64_t end;
};

class FactMatcher {
 public:
  FactMatcher(std::shared_ptr<const Trie> trie, FactMatcherConfig config, int64_t batch_size);

  int64_t batch_size() const { return static_cast<int64_t>(rows_.size()); }
  int64_t vocab_size() const { return trie_->vocab_size(); }
  int64_t bitmask_words() const { return (vocab_size() + 31) / 32; }
  const std::shared_ptr<const Trie>& trie() const { return trie_; }
  const FactMatcherConfig& config() const { return config_; }

  // Advances rows[i] by tokens[i]. strict: a token the row's mask forbids (or any token after
  // the row terminated) throws InvalidInput naming row and token, and no row of the call changes
  // (the whole call is checked before any row moves). lenient (strict = false, for prompts and
  // text written without the mask): never refuses; a forbidden token inside a fact makes the fact
  // dead (only the terminator stays allowed) unless it is an end token (the terminator, a token
  // holding the terminator's text, a special token), which closes the fact. Rows must be distinct.
  void accept(const int64_t* rows, const int64_t* tokens, int64_t n, bool strict);
  // Advances one row by a run of tokens (text written earlier, a draft). strict: all or nothing,
  // a refused token throws InvalidInput naming its index and leaves the row as it was.
  void accept_sequence(int64_t row, const int64_t* tokens, int64_t n, bool strict);
  // Changes the number of row slots; rows below min(old, new) keep their state, new rows are free.
  void resize(int64_t batch_size);
  // Feeds a prompt leniently, then forgets the facts it wrote and its rollback history: token
  // positions restart at 0 after it.
  void prefill(int64_t row, const int64_t* tokens, int64_t n);
  // Row i of the call is written at bitmask + i * words (words >= bitmask_words()) when the row
  // is constrained (inside a fact or forcing the terminator); out[i] says so. Free rows are not
  // touched.
  void fill_next_token_bitmask(const int64_t* rows, int64_t n, int32_t* bitmask, int64_t words, bool* out) const;
  // Whether the token is allowed now (the mask bit, without filling a mask); free rows allow all.
  bool is_allowed(int64_t row, int64_t token) const;
  // dst[i] = state of src[i] before the call (a gather: src and dst may overlap); dst distinct.
  void fork(const int64_t* src, const int64_t* dst, int64_t n);
  void reset(const int64_t* rows, int64_t n);
  void rollback(int64_t row, int64_t n);
  int64_t rollback_available(int64_t row) const;
  int8_t mode(int64_t row) const { return rows_[checked(row)].c.mode; }
  bool terminated(int64_t row) const { return rows_[checked(row)].c.terminated != 0; }
  int64_t trie_state(int64_t row) const { return rows_[checked(row)].c.trie_state; }
  int64_t position(int64_t row) const { return rows_[checked(row)].c.pos; }
  // Start of the fact being written (row inside a fact or its terminator), else INT64_MIN.
  int64_t open_fact_start(int64_t row) const;
  const std::vector<MatcherFact>& written_facts(int64_t row) const { return rows_[checked(row)].facts; }
  // True when the two rows would accept and mask every future token alike (same mode, trie and
  // trigger state, same facts written for duplicate avoidance).
  bool same_state(int64_t a, int64_t b) const;

 private:
  // Everything one token changes, except the lists of written facts (appended to only).
  struct Core {
    int64_t trie_state = -1;   // inside a fact: the trie cursor, -1 = dead (only the terminator)
    int64_t fact_start = 0;    // first token of the open fact
    int64_t pos = 0;           // tokens accepted since reset/prefill
    int32_t ac = 0;            // trigger automaton state
    int32_t num_facts = 0;     // facts.size() (rollback truncates to it)
    int8_t mode = kMatcherFree;
    int8_t term_k = 0;         // terminator mode: index of the next terminator token
    int8_t terminated = 0;
  };
  struct Row {
    Core c;
    std::vector<MatcherFact> facts;
    std::vector<int64_t> written;  // sorted ids of facts written (duplicate avoidance)
    std::vector<Core> history;     // ring of the cores before the last tokens
    int64_t hist_head = 0;         // next slot to write
    int64_t hist_len = 0;
  };
  // The effect of one token on a row: ok = false when refused (strict).
  struct Transition {
    bool ok = true;
    bool closes = false;
    Core next;
    MatcherFact fact{-1, 0, 0};
  };

  size_t checked(int64_t row) const;
  // prompt: a stop token does not terminate the row (chat templates hold EOS tokens).
  Transition transition(const Row& r, int64_t token, bool strict, bool prompt) const;
  void apply(Row& r, const Transition& t);
  // Inside a fact at trie state s: may the terminator come now (the fact is complete and not
  // written yet, or nothing else is allowed)? fact_id: the state's complete fact, else -1.
  bool terminator_allowed(const Row& r, int64_t s, int64_t* fact_id) const;
  bool child_allowed(const Row& r, int64_t child) const;
  bool is_end_token(int64_t token) const;
  bool is_stop_token(int64_t token) const;

  std::shared_ptr<const Trie> trie_;
  FactMatcherConfig config_;
  TriggerAutomaton triggers_;
  int64_t root_;
  std::vector<Row> rows_;
  std::vector<Row> scratch_rows_;              // fork's gather buffer
  mutable std::vector<Transition> scratch_;    // accept's checked transitions
  std::vector<uint32_t> seen_;                 // distinct-row checks: stamp per row
  uint32_t stamp_ = 0;
  void check_distinct(const int64_t* rows, int64_t n, const char* name);
};

// Masks logits in place with the bitmask (apply_token_bitmask_cpu), then gives the allowed tokens
// of a listed row score 0 when all of them were -inf (another processor banned them), so the row
// keeps a finite, constrained choice.
void apply_bitmask_keep_finite(const BitmaskArgs& args);

}  // namespace kcore
