#include "core/external_sort.h"

#include <algorithm>
#include <queue>
#include <stdexcept>

#include "core/parallel.h"

namespace kcore {
namespace {

// Lexicographic order of token sequences; a proper prefix sorts before its extensions.
inline int compare_seq(const uint32_t* a, size_t la, const uint32_t* b, size_t lb) {
  const size_t m = std::min(la, lb);
  for (size_t i = 0; i < m; ++i) {
    if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
  }
  return la < lb ? -1 : (la > lb ? 1 : 0);
}

constexpr uint64_t kProgressEvery = 1 << 16;

// Sequence ids of the buffer in sorted order: a counting sort on the first token, then a
// comparison sort inside each first-token bucket (buckets sorted in parallel) on a 64-bit key of
// the next two tokens, comparing the rest of the sequences only on equal keys.
std::vector<uint64_t> sorted_order(const std::vector<uint32_t>& tokens, const std::vector<uint64_t>& offsets,
                                   uint32_t vocab_size) {
  const uint64_t n = offsets.size() - 1;
  std::vector<uint64_t> bucket_start(static_cast<size_t>(vocab_size) + 1, 0);
  for (uint64_t i = 0; i < n; ++i) ++bucket_start[tokens[offsets[i]] + 1];
  for (uint32_t t = 0; t < vocab_size; ++t) bucket_start[t + 1] += bucket_start[t];
  struct Entry {
    uint64_t key;  // (token 1 + 1) << 32 | (token 2 + 1); 0 where the sequence has ended
    uint64_t id;
  };
  const uint32_t* tok = tokens.data();
  const uint64_t* off = offsets.data();
  std::vector<Entry> entries(n);
  {
    std::vector<uint64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t* p = tok + off[i];
      const uint64_t len = off[i + 1] - off[i];
      const uint64_t k1 = len > 1 ? p[1] + 1u : 0, k2 = len > 2 ? p[2] + 1u : 0;
      entries[fill[p[0]]++] = Entry{(k1 << 32) | k2, i};
    }
  }
  auto less = [tok, off](const Entry& a, const Entry& b) {
    if (a.key != b.key) return a.key < b.key;
    if ((a.key & 0xffffffffu) == 0) return false;  // both ended within three tokens: equal
    return compare_seq(tok + off[a.id] + 3, off[a.id + 1] - off[a.id] - 3, tok + off[b.id] + 3,
                       off[b.id + 1] - off[b.id] - 3) < 0;
  };
  parallel_for(vocab_size, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      auto first = entries.begin() + static_cast<int64_t>(bucket_start[t]);
      auto last = entries.begin() + static_cast<int64_t>(bucket_start[t + 1]);
      if (last - first > 1) std::sort(first, last, less);
    }
  });
  std::vector<uint64_t> order(n);
  for (uint64_t i = 0; i < n; ++i) order[i] = entries[i].id;
  return order;
}

// Calls sink on each distinct sequence of the buffer, in sorted order.
void emit_buffer(const std::vector<uint32_t>& tokens, const std::vector<uint64_t>& offsets, uint32_t vocab_size,
                 const SeqSink& sink, const ProgressFn& progress) {
  if (offsets.size() < 2) return;
  std::vector<uint64_t> order = sorted_order(tokens, offsets, vocab_size);
  const uint32_t* prev = nullptr;
  size_t prev_len = 0;
  uint64_t done = 0;
  for (uint64_t id : order) {
    if (progress && ++done % kProgressEvery == 0) progress(done);
    const uint32_t* p = tokens.data() + offsets[id];
    size_t len = offsets[id + 1] - offsets[id];
    if (prev && compare_seq(prev, prev_len, p, len) == 0) continue;
    sink(p, len);
    prev = p;
    prev_len = len;
  }
}

// Writes a run: per sequence, varint(prefix shared with the previous), varint(rest length),
// then the rest's tokens as varints.
class RunWriter {
 public:
  RunWriter(int fd) : out_(fd, "sorted run") {}
  void write(const uint32_t* p, size_t len) {
    size_t lcp = 0;
    const size_t m = std::min(len, prev_.size());
    while (lcp < m && prev_[lcp] == p[lcp]) ++lcp;
    out_.put_varint(lcp);
    out_.put_varint(len - lcp);
    for (size_t i = lcp; i < len; ++i) out_.put_varint(p[i]);
    prev_.assign(p, p + len);
  }
  uint64_t close() {
    out_.flush();
    return out_.bytes_written();
  }

 private:
  FdWriter out_;
  std::vector<uint32_t> prev_;
};

class RunReader {
 public:
  RunReader(int fd, uint64_t bytes) : in_(fd, 0, bytes, "sorted run") {}
  bool next() {
    if (in_.at_end()) return false;
    const uint64_t lcp = in_.get_varint();
    const uint64_t rest = in_.get_varint();
    if (lcp > seq_.size() || rest > (uint64_t{1} << 32)) throw std::runtime_error("corrupted sorted run");
    seq_.resize(lcp + rest);
    for (uint64_t i = lcp; i < lcp + rest; ++i) seq_[i] = static_cast<uint32_t>(in_.get_varint());
    return true;
  }
  const std::vector<uint32_t>& seq() const { return seq_; }

 private:
  FdReader in_;
  std::vector<uint32_t> seq_;
};

}  // namespace

ExternalSorter::ExternalSorter(uint32_t vocab_size, uint64_t budget_bytes, std::string tmp_dir)
    : vocab_size_(vocab_size), budget_(budget_bytes), tmp_dir_(std::move(tmp_dir)) {
  offsets_.push_back(0);
}

ExternalSorter::~ExternalSorter() = default;

void ExternalSorter::add(const uint32_t* seq, size_t len) {
  tokens_.insert(tokens_.end(), seq, seq + len);
  offsets_.push_back(tokens_.size());
  if (buffered_bytes() >= budget_) spill();
}

ExternalSorter::Run ExternalSorter::new_run_from(const std::function<void(const SeqSink&)>& produce) {
  Run run{open_scratch_file(tmp_dir_, "sorted run"), 0};
  RunWriter w(run.fd.get());
  produce([&w](const uint32_t* p, size_t len) { w.write(p, len); });
  run.bytes = w.close();
  return run;
}

void ExternalSorter::spill() {
  if (offsets_.size() < 2) return;
  Run run = new_run_from([this](const SeqSink& sink) {
    emit_buffer(tokens_, offsets_, vocab_size_, sink, spill_progress_);
  });
  run_bytes_ += run.bytes;
  peak_run_bytes_ = std::max(peak_run_bytes_, run_bytes_);
  runs_.push_back(std::move(run));
  ++num_spilled_;
  tokens_.clear();
  offsets_.assign(1, 0);
  // Bound the number of files open in the final merge: fold the runs into one.
  if (runs_.size() >= kMaxRuns) {
    Run merged = new_run_from([this](const SeqSink& sink) { merge(runs_, sink, spill_progress_); });
    peak_run_bytes_ = std::max(peak_run_bytes_, run_bytes_ + merged.bytes);
    runs_.clear();
    run_bytes_ = merged.bytes;
    runs_.push_back(std::move(merged));
  }
}

void ExternalSorter::merge(std::vector<Run>& runs, const SeqSink& sink, const ProgressFn& progress) {
  std::vector<std::unique_ptr<RunReader>> readers;
  for (const auto& r : runs) readers.push_back(std::make_unique<RunReader>(r.fd.get(), r.bytes));
  auto greater = [&readers](size_t a, size_t b) {
    const auto &x = readers[a]->seq(), &y = readers[b]->seq();
    return compare_seq(x.data(), x.size(), y.data(), y.size()) > 0;
  };
  std::priority_queue<size_t, std::vector<size_t>, decltype(greater)> heap(greater);
  for (size_t i = 0; i < readers.size(); ++i) {
    if (readers[i]->next()) heap.push(i);
  }
  std::vector<uint32_t> last;
  bool have_last = false;
  uint64_t done = 0;
  while (!heap.empty()) {
    const size_t i = heap.top();
    heap.pop();
    if (progress && ++done % kProgressEvery == 0) progress(done);
    const auto& s = readers[i]->seq();
    if (!have_last || compare_seq(last.data(), last.size(), s.data(), s.size()) != 0) {
      sink(s.data(), s.size());
      last = s;
      have_last = true;
    }
    if (readers[i]->next()) heap.push(i);
  }
}

void ExternalSorter::emit_sorted_unique(const SeqSink& sink, const ProgressFn& progress) {
  if (runs_.empty()) {
    emit_buffer(tokens_, offsets_, vocab_size_, sink, progress);
  } else {
    spill();
    merge(runs_, sink, progress);
  }
  runs_.clear();
  run_bytes_ = 0;
  tokens_ = {};
  offsets_ = {};
}

}  // namespace kcore
