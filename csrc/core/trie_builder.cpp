#include "core/trie_builder.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <memory>
#include <queue>
#include <system_error>
#include <utility>

#include "core/checksum.h"
#include "core/errors.h"
#include "core/ktrie_format.h"
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

using SeqSink = std::function<void(const uint32_t*, size_t)>;

// Sequence ids of the buffer in sorted order: a counting sort on the first token, then a
// comparison sort inside each first-token bucket (buckets sorted in parallel).
std::vector<uint64_t> sorted_order(const std::vector<uint32_t>& tokens, const std::vector<uint64_t>& offsets,
                                   uint32_t vocab_size) {
  const uint64_t n = offsets.size() - 1;
  std::vector<uint64_t> bucket_start(static_cast<size_t>(vocab_size) + 1, 0);
  for (uint64_t i = 0; i < n; ++i) ++bucket_start[tokens[offsets[i]] + 1];
  for (uint32_t t = 0; t < vocab_size; ++t) bucket_start[t + 1] += bucket_start[t];
  std::vector<uint64_t> order(n);
  {
    std::vector<uint64_t> fill(bucket_start.begin(), bucket_start.end() - 1);
    for (uint64_t i = 0; i < n; ++i) order[fill[tokens[offsets[i]]]++] = i;
  }
  const uint32_t* tok = tokens.data();
  const uint64_t* off = offsets.data();
  auto less = [tok, off](uint64_t a, uint64_t b) {
    return compare_seq(tok + off[a] + 1, off[a + 1] - off[a] - 1, tok + off[b] + 1, off[b + 1] - off[b] - 1) < 0;
  };
  parallel_for(vocab_size, 256, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      auto first = order.begin() + static_cast<int64_t>(bucket_start[t]);
      auto last = order.begin() + static_cast<int64_t>(bucket_start[t + 1]);
      if (last - first > 1) std::sort(first, last, less);
    }
  });
  return order;
}

// Calls sink on each distinct sequence of the buffer, in sorted order.
void emit_sorted_unique(const std::vector<uint32_t>& tokens, const std::vector<uint64_t>& offsets, uint32_t vocab_size,
                        const SeqSink& sink) {
  if (offsets.size() < 2) return;
  std::vector<uint64_t> order = sorted_order(tokens, offsets, vocab_size);
  const uint32_t* prev = nullptr;
  size_t prev_len = 0;
  for (uint64_t id : order) {
    const uint32_t* p = tokens.data() + offsets[id];
    size_t len = offsets[id + 1] - offsets[id];
    if (prev && compare_seq(prev, prev_len, p, len) == 0) continue;
    sink(p, len);
    prev = p;
    prev_len = len;
  }
}

[[noreturn]] void throw_io(const std::string& what, const std::string& path) {
  throw std::system_error(errno, std::generic_category(), what + " '" + path + "'");
}

struct FileCloser {
  void operator()(std::FILE* f) const {
    if (f) std::fclose(f);
  }
};
using FilePtr = std::unique_ptr<std::FILE, FileCloser>;

// Reads one spilled run: a sequence of [u32 length][length x u32 token] records.
class RunReader {
 public:
  explicit RunReader(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "rb")) {
    if (!f_) throw_io("cannot open sorted run", path);
    buffer_.resize(1 << 16);
    std::setvbuf(f_.get(), buffer_.data(), _IOFBF, buffer_.size());
  }
  bool next() {
    uint32_t len;
    if (std::fread(&len, 4, 1, f_.get()) != 1) return false;
    seq_.resize(len);
    if (std::fread(seq_.data(), 4, len, f_.get()) != len) throw_io("truncated sorted run", path_);
    return true;
  }
  const std::vector<uint32_t>& seq() const { return seq_; }

 private:
  std::string path_;
  FilePtr f_;
  std::vector<char> buffer_;
  std::vector<uint32_t> seq_;
};

// Minimal acyclic automaton for sorted input (Daciuk et al. 2000). Nodes are frozen bottom-up
// as soon as no later sequence can extend them, and replaced by an equal frozen node (same
// final flag, same labelled edges to the same nodes) when one exists.
class DawgBuilder {
 public:
  DawgBuilder() {
    edge_begin_.push_back(0);
    table_.assign(1 << 16, kEmpty);
    open_.resize(1);
  }

  void add(const uint32_t* w, size_t len) {
    size_t p = 0;
    const size_t m = std::min(len, prev_.size());
    while (p < m && prev_[p] == w[p]) ++p;
    const bool extends_prev = p == prev_.size() && len > p;
    const bool after_prev = p < len && p < prev_.size() && w[p] > prev_[p];
    if (num_facts_ > 0 && !extends_prev && !after_prev)
      throw std::logic_error("trie builder: input stream is not sorted and unique");
    freeze_to(p);
    for (size_t i = p; i < len; ++i) {
      ++depth_;
      if (open_.size() <= depth_) open_.resize(depth_ + 1);
      open_[depth_].final = false;
      open_[depth_].edges.clear();
    }
    open_[depth_].final = true;
    num_trie_nodes_ += len - p;
    prev_.assign(w, w + len);
    ++num_facts_;
  }

  uint32_t finish() {
    freeze_to(0);
    return intern(open_[0]);
  }

  uint64_t num_facts() const { return num_facts_; }
  uint64_t num_trie_nodes() const { return num_trie_nodes_; }
  uint64_t num_nodes() const { return final_.size(); }
  uint64_t num_edges() const { return edge_token_.size(); }
  uint64_t degree(uint32_t v) const { return edge_begin_[v + 1] - edge_begin_[v]; }
  uint64_t edges_begin(uint32_t v) const { return edge_begin_[v]; }
  uint32_t edge_token(uint64_t e) const { return edge_token_[e]; }
  uint32_t edge_target(uint64_t e) const { return edge_target_[e]; }
  bool final(uint32_t v) const { return final_[v] != 0; }
  uint64_t count(uint32_t v) const { return count_[v]; }

 private:
  static constexpr uint32_t kEmpty = 0xffffffffu;
  struct Open {
    bool final = false;
    std::vector<std::pair<uint32_t, uint32_t>> edges;  // (token, frozen child)
  };

  void freeze_to(size_t p) {
    while (depth_ > p) {
      uint32_t id = intern(open_[depth_]);
      --depth_;
      open_[depth_].edges.emplace_back(prev_[depth_], id);
    }
  }

  static uint64_t mix(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h;
  }
  static uint64_t hash_open(const Open& o) {
    uint64_t h = o.final ? 0x9e3779b97f4a7c15ULL : 0x632be59bd9b4e019ULL;
    for (const auto& e : o.edges) h = mix(h ^ ((uint64_t{e.first} << 32) | e.second)) + 0x9e3779b97f4a7c15ULL;
    return h;
  }
  bool equal(uint32_t v, const Open& o) const {
    if (final(v) != o.final || degree(v) != o.edges.size()) return false;
    const uint64_t b = edge_begin_[v];
    for (size_t i = 0; i < o.edges.size(); ++i) {
      if (edge_token_[b + i] != o.edges[i].first || edge_target_[b + i] != o.edges[i].second) return false;
    }
    return true;
  }

  uint32_t intern(const Open& o) {
    const uint64_t h = hash_open(o);
    uint64_t mask = table_.size() - 1;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      uint32_t v = table_[i];
      if (v == kEmpty) break;
      if (hashes_[v] == h && equal(v, o)) return v;
    }
    if (final_.size() >= kEmpty - 1) throw InvalidInput("too many trie nodes for format version 1 (limit 2^32 - 2)");
    const uint32_t id = static_cast<uint32_t>(final_.size());
    uint64_t count = o.final ? 1 : 0;
    for (const auto& e : o.edges) {
      edge_token_.push_back(e.first);
      edge_target_.push_back(e.second);
      count += count_[e.second];
    }
    edge_begin_.push_back(edge_token_.size());
    final_.push_back(o.final ? 1 : 0);
    count_.push_back(count);
    hashes_.push_back(h);
    if (2 * (final_.size() + 1) > table_.size()) {
      rehash(table_.size() * 2);
    } else {
      insert(id);
    }
    return id;
  }
  void insert(uint32_t v) {
    const uint64_t mask = table_.size() - 1;
    uint64_t i = hashes_[v] & mask;
    while (table_[i] != kEmpty) i = (i + 1) & mask;
    table_[i] = v;
  }
  void rehash(size_t capacity) {
    table_.assign(capacity, kEmpty);
    for (uint32_t v = 0; v < final_.size(); ++v) insert(v);
  }

  std::vector<uint64_t> edge_begin_;
  std::vector<uint32_t> edge_token_, edge_target_;
  std::vector<uint8_t> final_;
  std::vector<uint64_t> count_, hashes_;
  std::vector<uint32_t> table_;
  std::vector<Open> open_;  // open_[d]: the node at depth d of the last sequence; root at 0
  size_t depth_ = 0;
  std::vector<uint32_t> prev_;
  uint64_t num_facts_ = 0;
  uint64_t num_trie_nodes_ = 1;
};

// Lays the automaton out as byte records (see ktrie_format.h) in depth-first preorder, placing
// an unplaced child right after its parent where possible so that single-child runs need no
// target offsets.
std::vector<uint8_t> layout(const DawgBuilder& g, uint32_t root, unsigned token_bytes, unsigned& target_bytes,
                            uint64_t& root_offset) {
  using namespace ktrie;
  const uint64_t n = g.num_nodes();
  constexpr uint32_t kNone = 0xffffffffu;
  std::vector<uint32_t> order;
  order.reserve(n);
  std::vector<uint32_t> position(n, kNone);
  std::vector<uint32_t> stack{root};
  while (!stack.empty()) {
    uint32_t v = stack.back();
    stack.pop_back();
    if (position[v] != kNone) continue;
    position[v] = static_cast<uint32_t>(order.size());
    order.push_back(v);
    const uint64_t b = g.edges_begin(v);
    for (uint64_t e = b + g.degree(v); e-- > b;) {
      if (position[g.edge_target(e)] == kNone) stack.push_back(g.edge_target(e));
    }
  }
  // Kind and next-child index of each placed node.
  std::vector<uint8_t> kind(n);
  std::vector<int32_t> next_child(n, -1);
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t v = order[i];
    const uint32_t nxt = i + 1 < n ? order[i + 1] : kNone;
    const uint64_t d = g.degree(v), b = g.edges_begin(v);
    for (uint64_t k = 0; k < d && d <= kSmallMaxDegree; ++k) {
      if (g.edge_target(b + k) == nxt) {
        next_child[v] = static_cast<int32_t>(k);
        break;
      }
    }
    if (d == 0) {
      kind[v] = kLeaf;
    } else if (d == 1 && next_child[v] == 0) {
      kind[v] = kChain;
    } else if (d <= kSmallMaxDegree) {
      kind[v] = kSmall;
    } else {
      kind[v] = kLarge;
    }
  }
  constexpr unsigned rank_bytes = 4;
  std::vector<uint64_t> offset(n);
  uint64_t total = 0;
  for (target_bytes = 3; target_bytes <= 4; ++target_bytes) {
    total = 0;
    for (uint64_t i = 0; i < n; ++i) {
      const uint32_t v = order[i];
      const uint64_t d = g.degree(v);
      offset[v] = total;
      switch (kind[v]) {
        case kLeaf: total += 1; break;
        case kChain: total += 1 + token_bytes; break;
        case kSmall: {
          const uint64_t flag = next_child[v] >= 0 ? 1 : 0;
          total += 1 + varint_size(g.count(v)) + flag + d * token_bytes + (d - flag) * target_bytes;
          break;
        }
        default: total += 1 + varint_size(d) + varint_size(g.count(v)) + d * (token_bytes + target_bytes + rank_bytes);
      }
    }
    if (total < (uint64_t{1} << (8 * target_bytes))) break;
  }
  if (target_bytes > 4) throw InvalidInput("trie too large for format version 1 (data section limit 4 GiB)");

  std::vector<uint8_t> data(total + kDataPad, 0);
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t v = order[i];
    const uint64_t d = g.degree(v), b = g.edges_begin(v);
    uint8_t* p = data.data() + offset[v];
    switch (kind[v]) {
      case kLeaf:
        *p = make_head(true, kLeaf, 0);
        break;
      case kChain:
        *p++ = make_head(g.final(v), kChain, 0);
        store_uint(p, g.edge_token(b), token_bytes);
        break;
      case kSmall: {
        const int32_t nc = next_child[v];
        *p++ = make_head(g.final(v), kSmall, static_cast<uint8_t>(((d - 1) << 1) | (nc >= 0 ? 1 : 0)));
        p = store_varint(p, g.count(v));
        if (nc >= 0) *p++ = static_cast<uint8_t>(nc);
        for (uint64_t k = 0; k < d; ++k, p += token_bytes) store_uint(p, g.edge_token(b + k), token_bytes);
        for (uint64_t k = 0; k < d; ++k) {
          if (static_cast<int64_t>(k) == nc) continue;
          store_uint(p, offset[g.edge_target(b + k)], target_bytes);
          p += target_bytes;
        }
        break;
      }
      default: {
        *p++ = make_head(g.final(v), kLarge, 0);
        p = store_varint(p, d);
        p = store_varint(p, g.count(v));
        for (uint64_t k = 0; k < d; ++k, p += token_bytes) store_uint(p, g.edge_token(b + k), token_bytes);
        for (uint64_t k = 0; k < d; ++k, p += target_bytes) store_uint(p, offset[g.edge_target(b + k)], target_bytes);
        uint64_t rank = g.final(v) ? 1 : 0;
        for (uint64_t k = 0; k < d; ++k, p += rank_bytes) {
          store_uint(p, rank, rank_bytes);
          rank += g.count(g.edge_target(b + k));
        }
      }
    }
  }
  root_offset = offset[root];
  return data;
}

std::atomic<uint64_t> g_tmp_counter{0};

void write_atomically(const std::string& path, const ktrie::Header& header, const std::vector<uint8_t>& data) {
  const std::string tmp =
      path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(g_tmp_counter.fetch_add(1));
  {
    FilePtr f(std::fopen(tmp.c_str(), "wb"));
    if (!f) throw_io("cannot create", tmp);
    bool ok = std::fwrite(&header, sizeof header, 1, f.get()) == 1 &&
              std::fwrite(data.data(), 1, data.size(), f.get()) == data.size() && std::fflush(f.get()) == 0 &&
              ::fsync(::fileno(f.get())) == 0;
    if (!ok) {
      int err = errno;
      std::remove(tmp.c_str());
      errno = err;
      throw_io("cannot write", tmp);
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    std::remove(tmp.c_str());
    errno = err;
    throw_io("cannot rename the temporary file to", path);
  }
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
  offsets_.push_back(0);
}

TrieBuilder::~TrieBuilder() { remove_runs(); }

void TrieBuilder::remove_runs() {
  for (const auto& r : runs_) std::remove(r.c_str());
  runs_.clear();
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
    for (int64_t k = offsets[i]; k < offsets[i + 1]; ++k) tokens_.push_back(static_cast<uint32_t>(tokens[k]));
    offsets_.push_back(tokens_.size());
    ++num_input_;
    // Buffer bytes: tokens, offsets and the sort permutation.
    if (tokens_.size() * 4 + offsets_.size() * 16 >= budget_) spill();
  }
}

void TrieBuilder::add(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  add_impl(tokens, num_tokens, offsets, n);
}
void TrieBuilder::add(const int32_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  add_impl(tokens, num_tokens, offsets, n);
}

void TrieBuilder::spill() {
  if (offsets_.size() < 2) return;
  const std::string path = (tmp_dir_.empty() ? std::string(".") : tmp_dir_) + "/ktrie-run." +
                           std::to_string(::getpid()) + "." + std::to_string(g_tmp_counter.fetch_add(1));
  FilePtr f(std::fopen(path.c_str(), "wb"));
  if (!f) throw_io("cannot create a sorted run in tmp_dir", path);
  runs_.push_back(path);
  bool ok = true;
  emit_sorted_unique(tokens_, offsets_, vocab_size_, [&](const uint32_t* p, size_t len) {
    const uint32_t len32 = static_cast<uint32_t>(len);
    ok = ok && std::fwrite(&len32, 4, 1, f.get()) == 1 && std::fwrite(p, 4, len, f.get()) == len;
  });
  if (!ok || std::fflush(f.get()) != 0) throw_io("cannot write sorted run", path);
  tokens_.clear();
  offsets_.assign(1, 0);
}

TrieBuildStats TrieBuilder::finish(const std::string& path, const std::string& tokenizer_fingerprint) {
  if (finished_) throw InvalidInput("TrieBuilder.finish called twice");
  finished_ = true;
  if (tokenizer_fingerprint.size() > ktrie::kMaxFingerprint)
    throw InvalidInput("tokenizer_fingerprint must be at most " + std::to_string(ktrie::kMaxFingerprint) +
                       " bytes, got " + std::to_string(tokenizer_fingerprint.size()));
  if (num_input_ == 0) throw InvalidInput("sequences is empty: a trie needs at least one fact");
  TrieBuildStats stats;
  stats.num_input = num_input_;
  DawgBuilder g;
  auto sink = [&g](const uint32_t* p, size_t len) { g.add(p, len); };
  if (runs_.empty()) {
    emit_sorted_unique(tokens_, offsets_, vocab_size_, sink);
  } else {
    spill();
    std::vector<std::unique_ptr<RunReader>> readers;
    for (const auto& r : runs_) readers.push_back(std::make_unique<RunReader>(r));
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
    while (!heap.empty()) {
      size_t i = heap.top();
      heap.pop();
      const auto& s = readers[i]->seq();
      if (!have_last || compare_seq(last.data(), last.size(), s.data(), s.size()) != 0) {
        g.add(s.data(), s.size());
        last = s;
        have_last = true;
      }
      if (readers[i]->next()) heap.push(i);
    }
    stats.num_runs = runs_.size();
    remove_runs();
  }
  tokens_ = {};
  offsets_ = {};
  const uint32_t root = g.finish();
  if (g.num_facts() >= (uint64_t{1} << 31))
    throw InvalidInput("too many facts for format version 1 (limit 2^31 - 1), got " + std::to_string(g.num_facts()));

  const unsigned token_bytes = vocab_size_ <= (1u << 16) ? 2 : 3;
  unsigned target_bytes = 0;
  uint64_t root_offset = 0;
  std::vector<uint8_t> data = layout(g, root, token_bytes, target_bytes, root_offset);

  ktrie::Header h;
  std::memset(&h, 0, sizeof h);
  std::memcpy(h.magic, ktrie::kMagic, sizeof h.magic);
  h.format_version = ktrie::kFormatVersion;
  h.header_size = ktrie::kHeaderSize;
  h.file_size = ktrie::kHeaderSize + data.size();
  h.vocab_size = vocab_size_;
  h.token_bytes = static_cast<uint8_t>(token_bytes);
  h.target_bytes = static_cast<uint8_t>(target_bytes);
  h.rank_bytes = 4;
  h.num_facts = g.num_facts();
  h.num_nodes = g.num_nodes();
  h.num_edges = g.num_edges();
  h.num_trie_nodes = g.num_trie_nodes();
  h.data_offset = ktrie::kHeaderSize;
  h.data_size = data.size();
  h.root_offset = root_offset;
  h.data_checksum = checksum64(data.data(), data.size());
  h.fingerprint_len = static_cast<uint32_t>(tokenizer_fingerprint.size());
  std::memcpy(h.fingerprint, tokenizer_fingerprint.data(), tokenizer_fingerprint.size());
  h.header_checksum = checksum64(&h, ktrie::kHeaderChecksumOffset);
  write_atomically(path, h, data);

  stats.num_facts = h.num_facts;
  stats.num_nodes = h.num_nodes;
  stats.num_edges = h.num_edges;
  stats.num_trie_nodes = h.num_trie_nodes;
  stats.file_bytes = h.file_size;
  return stats;
}

}  // namespace kcore
