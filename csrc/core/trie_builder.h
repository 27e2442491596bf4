// Building a .ktrie file from token-id sequences (facts).
//
// Sort-based: sequences are buffered, sorted and deduplicated; beyond the memory budget the
// sorted buffer is spilled to a run file and the runs are k-way merged at the end. The sorted
// unique stream feeds the incremental construction of a minimal acyclic automaton for sorted
// input (Daciuk, Mihov, Watson & Watson 2000, "Incremental construction of minimal acyclic
// finite-state automata"), so identical fact endings are stored once. The automaton itself must
// fit in memory (it is much smaller than the facts).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kcore {

struct TrieBuildStats {
  uint64_t num_input = 0;  // sequences added, duplicates included
  uint64_t num_facts = 0;  // distinct sequences stored
  uint64_t num_nodes = 0;
  uint64_t num_edges = 0;
  uint64_t num_trie_nodes = 0;
  uint64_t num_runs = 0;  // sorted runs spilled to disk (0 = built in memory)
  uint64_t file_bytes = 0;
};

class TrieBuilder {
 public:
  // vocab_size: token ids must lie in [0, vocab_size). memory_budget_bytes: size of the
  // in-memory sequence buffer before it is spilled to a sorted run in tmp_dir.
  TrieBuilder(int64_t vocab_size, int64_t memory_budget_bytes, std::string tmp_dir);
  ~TrieBuilder();
  TrieBuilder(const TrieBuilder&) = delete;
  TrieBuilder& operator=(const TrieBuilder&) = delete;

  // Adds n sequences: sequence i is tokens[offsets[i], offsets[i+1]). Throws InvalidInput naming
  // the fact's global index for an empty sequence or an id outside [0, vocab_size).
  void add(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n);
  void add(const int32_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n);

  // Builds the automaton and writes it to `path` atomically (temporary file + rename).
  TrieBuildStats finish(const std::string& path, const std::string& tokenizer_fingerprint);

  uint64_t num_added() const { return num_input_; }

 private:
  template <typename T>
  void add_impl(const T* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n);
  void spill();
  void remove_runs();

  uint32_t vocab_size_;
  uint64_t budget_;
  std::string tmp_dir_;
  uint64_t num_input_ = 0;
  bool finished_ = false;
  std::vector<uint32_t> tokens_;   // buffered sequences, concatenated
  std::vector<uint64_t> offsets_;  // offsets_[i] = start of sequence i in tokens_; one extra
  std::vector<std::string> runs_;
};

}  // namespace kcore
