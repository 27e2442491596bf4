// Sorting token sequences under a memory budget (external merge sort), deduplicating them.
//
// Sequences are buffered; a full buffer is sorted and spilled to an unnamed run file (see
// temp_file.h), front-coded: each sequence is stored as (length of the prefix shared with the
// previous one, the rest), varint-coded, which makes runs several times smaller than the raw
// tokens. The runs are k-way merged at the end.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "core/temp_file.h"

namespace kcore {

using SeqSink = std::function<void(const uint32_t*, size_t)>;
// Called now and then by long loops with the number of sequences handled so far; it may throw to
// cancel the work (the builder's owner reacts to Ctrl-C this way).
using ProgressFn = std::function<void(uint64_t)>;

class ExternalSorter {
 public:
  // budget_bytes: buffer size (4 bytes per token + 32 per sequence, sort included) before a spill.
  ExternalSorter(uint32_t vocab_size, uint64_t budget_bytes, std::string tmp_dir);
  ~ExternalSorter();

  void add(const uint32_t* seq, size_t len);
  // Calls sink on each distinct sequence in lexicographic order (a prefix first); once.
  void emit_sorted_unique(const SeqSink& sink, const ProgressFn& progress);

  void set_progress(ProgressFn fn) { spill_progress_ = std::move(fn); }
  uint64_t num_runs() const { return num_spilled_; }
  uint64_t buffered_bytes() const { return tokens_.size() * 4 + offsets_.size() * 32; }
  uint64_t run_bytes() const { return run_bytes_; }            // run bytes alive now
  uint64_t peak_run_bytes() const { return peak_run_bytes_; }  // most run bytes alive at once

 private:
  struct Run {
    Fd fd;
    uint64_t bytes;
  };
  void spill();
  void merge(std::vector<Run>& runs, const SeqSink& sink, const ProgressFn& progress);
  Run new_run_from(const std::function<void(const SeqSink&)>& produce);

  static constexpr size_t kMaxRuns = 64;  // runs open at once in a merge

  uint32_t vocab_size_;
  uint64_t budget_;
  std::string tmp_dir_;
  std::vector<uint32_t> tokens_;   // buffered sequences, concatenated
  std::vector<uint64_t> offsets_;  // offsets_[i] = start of sequence i in tokens_; one extra
  std::vector<Run> runs_;
  uint64_t num_spilled_ = 0, run_bytes_ = 0, peak_run_bytes_ = 0;
  ProgressFn spill_progress_;
};

}  // namespace kcore
