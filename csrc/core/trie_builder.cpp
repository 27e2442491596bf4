#include "core/trie_builder.h"

#include <algorithm>
#include <cstring>
#include <numeric>

#include <unistd.h>

#include "core/checksum.h"
#include "core/dawg_writer.h"
#include "core/errors.h"
#include "core/ktrie_format.h"
#include "core/temp_file.h"

namespace kcore {

namespace {
constexpr uint64_t kMinRegisterBudget = uint64_t{64} << 20;

// Token codes in order of decreasing frequency (ties by token id): frequent tokens get the
// short codes. code_of[t] is the code of token t; table[c] the token of code c.
void token_codes(const std::vector<uint64_t>& counts, std::vector<uint32_t>& code_of, std::vector<uint32_t>& table) {
  table.clear();
  for (uint32_t t = 0; t < counts.size(); ++t) {
    if (counts[t] > 0) table.push_back(t);
  }
  std::stable_sort(table.begin(), table.end(), [&counts](uint32_t a, uint32_t b) { return counts[a] > counts[b]; });
  code_of.assign(counts.size(), 0xffffffffu);
  for (uint32_t c = 0; c < table.size(); ++c) code_of[table[c]] = c;
}
}  // namespace

TrieBuilder::TrieBuilder(int64_t vocab_size, int64_t memory_budget_bytes, std::string tmp_dir)
    : tmp_dir_(std::move(tmp_dir)) {
  if (vocab_size < 1 || vocab_size > (int64_t{1} << 24))
    throw InvalidInput("vocab_size must be in [1, 2^24], got " + std::to_string(vocab_size));
  if (memory_budget_bytes < 1)
    throw InvalidInput("memory_budget_bytes must be positive, got " + std::to_string(memory_budget_bytes));
  vocab_size_ = static_cast<uint32_t>(vocab_size);
  budget_ = static_cast<uint64_t>(memory_budget_bytes);
  token_counts_.assign(vocab_size_, 0);
  sorter_ = std::make_unique<ExternalSorter>(vocab_size_, budget_, tmp_dir_);
}

TrieBuilder::~TrieBuilder() = default;

void TrieBuilder::set_progress(BuildProgressFn fn) {
  progress_ = std::move(fn);
  if (!sorter_) return;
  if (progress_) {
    sorter_->set_progress([this](uint64_t done) { progress_(BuildPhase::kSpill, done); });
  } else {
    sorter_->set_progress(nullptr);
  }
}

template <typename Fn>
void TrieBuilder::guarded(Fn&& fn) {
  if (failed_) throw InvalidInput("TrieBuilder used after an error or a cancelled build; start a new one");
  try {
    fn();
  } catch (const InvalidInput&) {
    // Bad input is rejected before anything of it is buffered: the builder stays usable.
    throw;
  } catch (...) {
    // Anything else (I/O error, cancellation): free the scratch files now.
    failed_ = true;
    sorter_.reset();
    throw;
  }
}

template <typename T>
void TrieBuilder::add_impl(const T* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  if (finished_) throw InvalidInput("TrieBuilder.add called after finish");
  if (n < 0) throw InvalidInput("number of sequences must be >= 0");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t b = offsets[i], e = offsets[i + 1];
    const uint64_t fact = num_input_ + static_cast<uint64_t>(i);
    if (b < 0 || e > num_tokens || e < b)
      throw InvalidInput("offsets of fact " + std::to_string(fact) + " are out of range: [" + std::to_string(b) +
                         ", " + std::to_string(e) + ") with " + std::to_string(num_tokens) + " tokens");
    if (e == b) throw InvalidInput("fact " + std::to_string(fact) + " is an empty token sequence");
    for (int64_t k = b; k < e; ++k) {
      const int64_t t = static_cast<int64_t>(tokens[k]);
      if (t < 0 || t >= static_cast<int64_t>(vocab_size_))
        throw InvalidInput("fact " + std::to_string(fact) + " has token id " + std::to_string(t) + " at position " +
                           std::to_string(k - b) + ", outside [0, vocab_size=" + std::to_string(vocab_size_) + ")");
    }
  }
  for (int64_t i = 0; i < n; ++i) {
    scratch_.clear();
    for (int64_t k = offsets[i]; k < offsets[i + 1]; ++k) {
      const uint32_t t = static_cast<uint32_t>(tokens[k]);
      scratch_.push_back(t);
      ++token_counts_[t];
    }
    sorter_->add(scratch_.data(), scratch_.size());
    ++num_input_;
  }
}

void TrieBuilder::add(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  guarded([&] { add_impl(tokens, num_tokens, offsets, n); });
}
void TrieBuilder::add(const int32_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  guarded([&] { add_impl(tokens, num_tokens, offsets, n); });
}

TrieBuildStats TrieBuilder::finish(const std::string& path, const std::string& tokenizer_fingerprint) {
  if (finished_) throw InvalidInput("TrieBuilder.finish called twice");
  if (failed_) throw InvalidInput("TrieBuilder used after an error or a cancelled build; start a new one");
  finished_ = true;
  try {
    return finish_impl(path, tokenizer_fingerprint);
  } catch (...) {
    failed_ = true;
    sorter_.reset();  // the runs; the record stream and the output die with finish_impl's frame
    throw;
  }
}

TrieBuildStats TrieBuilder::finish_impl(const std::string& path, const std::string& tokenizer_fingerprint) {
  if (tokenizer_fingerprint.size() > ktrie::kMaxFingerprint)
    throw InvalidInput("tokenizer_fingerprint must be at most " + std::to_string(ktrie::kMaxFingerprint) +
                       " bytes, got " + std::to_string(tokenizer_fingerprint.size()));
  if (num_input_ == 0) throw InvalidInput("sequences is empty: a trie needs at least one fact");
  TrieBuildStats stats;
  stats.num_input = num_input_;

  std::vector<uint32_t> code_of, table;
  token_codes(token_counts_, code_of, table);
  token_counts_ = {};
  const unsigned token_bytes = vocab_size_ <= (1u << 16) ? 2 : 3;
  // In memory, the buffer is still alive while the automaton is built: the register gets half.
  const bool in_memory = sorter_->num_runs() == 0;
  const uint64_t reg_budget = std::max(in_memory ? budget_ / 2 : budget_, kMinRegisterBudget);
  DawgWriter dawg(std::move(code_of), token_bytes, reg_budget, tmp_dir_);
  ProgressFn merge_progress;
  if (progress_) merge_progress = [this](uint64_t done) { progress_(BuildPhase::kMerge, done); };
  uint64_t peak_temp = sorter_->peak_run_bytes();
  uint64_t merged = 0;
  sorter_->emit_sorted_unique(
      [&](const uint32_t* p, size_t len) {
        dawg.add(p, len);
        // Runs are read while the stream grows: both are alive.
        if ((++merged & 0xffff) == 0) peak_temp = std::max(peak_temp, sorter_->run_bytes() + dawg.data_bytes());
      },
      merge_progress);
  peak_temp = std::max(peak_temp, sorter_->run_bytes() + dawg.data_bytes());
  stats.num_runs = sorter_->num_runs();
  sorter_.reset();
  dawg.finish();

  const uint64_t records = dawg.data_bytes();
  const uint64_t num_facts = dawg.num_facts();
  const unsigned offset_bits = std::max(1u, ktrie::bit_width(records - 1));
  const unsigned rank_bits = ktrie::bit_width(num_facts - 1);
  if (offset_bits + rank_bits > ktrie::kStateBits)
    throw InvalidInput("trie too large for format version 2: " + std::to_string(num_facts) + " facts in " +
                       std::to_string(records) + " bytes of records need " + std::to_string(rank_bits + offset_bits) +
                       " bits of cursor state, more than 63 (facts x bytes must stay below 2^63); split the "
                       "knowledge base");

  ktrie::Header h;
  std::memset(&h, 0, sizeof h);
  std::memcpy(h.magic, ktrie::kMagic, sizeof h.magic);
  h.format_version = ktrie::kFormatVersion;
  h.header_size = ktrie::kHeaderSize;
  h.vocab_size = vocab_size_;
  h.token_bytes = static_cast<uint8_t>(token_bytes);
  h.state_offset_bits = static_cast<uint8_t>(offset_bits);
  h.num_facts = num_facts;
  h.num_nodes = dawg.num_nodes();
  h.num_edges = dawg.num_edges();
  h.num_trie_nodes = dawg.num_trie_nodes();
  h.table_offset = ktrie::kHeaderSize;
  h.table_count = table.size();
  const uint64_t table_bytes = (table.size() * token_bytes + 7) / 8 * 8;
  h.data_offset = h.table_offset + table_bytes;
  h.data_size = records + ktrie::kDataPad;
  h.file_size = h.data_offset + h.data_size;
  h.root_offset = 0;
  h.fingerprint_len = static_cast<uint32_t>(tokenizer_fingerprint.size());
  std::memcpy(h.fingerprint, tokenizer_fingerprint.data(), tokenizer_fingerprint.size());

  OutputFile out(path);
  {
    FdWriter w(out.fd(), "output file " + path, size_t{4} << 20);
    Checksum64Stream sum;
    w.write(&h, sizeof h);  // rewritten below, with the checksums
    std::vector<uint8_t> tb(table_bytes, 0);
    for (size_t c = 0; c < table.size(); ++c) ktrie::store_uint(tb.data() + c * token_bytes, table[c], token_bytes);
    sum.update(tb.data(), tb.size());
    w.write(tb.data(), tb.size());
    std::vector<uint8_t> pad(ktrie::kDataPad, 0);
    ProgressFn write_progress;
    if (progress_) write_progress = [this](uint64_t done) { progress_(BuildPhase::kWrite, done); };
    dawg.copy_records_to(w, write_progress, &sum);
    sum.update(pad.data(), pad.size());
    w.write(pad.data(), pad.size());
    w.flush();
    h.data_checksum = sum.digest();
  }
  h.header_checksum = checksum64(&h, ktrie::kHeaderChecksumOffset);
  if (::pwrite(out.fd(), &h, sizeof h, 0) != static_cast<ssize_t>(sizeof h)) throw_io("cannot write", path);
  peak_temp = std::max(peak_temp, records + h.file_size);  // the stream and the new file
  out.commit();

  stats.num_facts = h.num_facts;
  stats.num_nodes = h.num_nodes;
  stats.num_edges = h.num_edges;
  stats.num_trie_nodes = h.num_trie_nodes;
  stats.file_bytes = h.file_size;
  stats.peak_temp_bytes = peak_temp;
  stats.register_generations = dawg.register_generations();
  return stats;
}

}  // namespace kcore
