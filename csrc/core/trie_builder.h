// Building a .ktrie file from token-id sequences (facts).
//
// Three stages, one module each: the facts are sorted and deduplicated under a memory budget
// (external_sort.h: sorted runs spilled to unnamed scratch files and merged); the sorted stream
// feeds the streaming construction of the minimal acyclic automaton, whose records are written
// out as they are frozen (dawg_writer.h); the file is assembled and given its name atomically
// (temp_file.h). Memory stays within about the budget whatever the number of facts; temporary
// files vanish with the process, however it ends.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/external_sort.h"

namespace kcore {

struct TrieBuildStats {
  uint64_t num_input = 0;  // sequences added, duplicates included
  uint64_t num_facts = 0;  // distinct sequences stored
  uint64_t num_nodes = 0;
  uint64_t num_edges = 0;
  uint64_t num_trie_nodes = 0;
  uint64_t num_runs = 0;  // sorted runs spilled to disk (0 = built in memory)
  uint64_t file_bytes = 0;
  uint64_t peak_temp_bytes = 0;        // most bytes of temporary files alive at once
  uint64_t register_generations = 0;  // > 2: the register dropped nodes (automaton not minimal)
};

// Phases reported to the progress callback.
enum class BuildPhase { kSpill = 0, kMerge = 1, kWrite = 2 };
using BuildProgressFn = std::function<void(BuildPhase, uint64_t done)>;

class TrieBuilder {
 public:
  // vocab_size: token ids must lie in [0, vocab_size). memory_budget_bytes: size of the
  // in-memory sequence buffer before it is spilled to a sorted run in tmp_dir, and of the
  // register of frozen nodes (at least 64 MiB).
  TrieBuilder(int64_t vocab_size, int64_t memory_budget_bytes, std::string tmp_dir);
  ~TrieBuilder();
  TrieBuilder(const TrieBuilder&) = delete;
  TrieBuilder& operator=(const TrieBuilder&) = delete;

  // Adds n sequences: sequence i is tokens[offsets[i], offsets[i+1]). Throws InvalidInput naming
  // the fact's global index for an empty sequence or an id outside [0, vocab_size).
  void add(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n);
  void add(const int32_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n);

  // Called from long loops (spills, the merge, the final write); it may throw to cancel the build,
  // which then leaves nothing behind.
  void set_progress(BuildProgressFn fn);

  // Builds the automaton and writes it to `path` atomically.
  TrieBuildStats finish(const std::string& path, const std::string& tokenizer_fingerprint);

  uint64_t num_added() const { return num_input_; }

 private:
  template <typename T>
  void add_impl(const T* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n);
  template <typename Fn>
  void guarded(Fn&& fn);
  TrieBuildStats finish_impl(const std::string& path, const std::string& tokenizer_fingerprint);

  uint32_t vocab_size_;
  uint64_t budget_;
  std::string tmp_dir_;
  uint64_t num_input_ = 0;
  bool finished_ = false;
  bool failed_ = false;
  std::vector<uint64_t> token_counts_;  // occurrences of each token id in the input
  std::vector<uint32_t> scratch_;
  std::unique_ptr<ExternalSorter> sorter_;
  BuildProgressFn progress_;
};

}  // namespace kcore
