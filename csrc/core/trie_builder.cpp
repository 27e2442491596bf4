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

// Writes a run: [u32 length][length x u32 token] records.
class RunWriter {
 public:
  explicit RunWriter(const std::string& path) : path_(path), f_(std::fopen(path.c_str(), "wb")) {
    if (!f_) throw_io("cannot create a sorted run in tmp_dir", path);
  }
  void write(const uint32_t* p, size_t len) {
    const uint32_t len32 = static_cast<uint32_t>(len);
    ok_ = ok_ && std::fwrite(&len32, 4, 1, f_.get()) == 1 && std::fwrite(p, 4, len, f_.get()) == len;
  }
  void close() {
    if (!ok_ || std::fflush(f_.get()) != 0) throw_io("cannot write sorted run", path_);
    f_.reset();
  }

 private:
  std::string path_;
  FilePtr f_;
  bool ok_ = true;
};

// k-way merge of sorted runs; calls sink on each distinct sequence in sorted order.
void merge_runs(const std::vector<std::string>& runs, const SeqSink& sink) {
  std::vector<std::unique_ptr<RunReader>> readers;
  for (const auto& r : runs) readers.push_back(std::make_unique<RunReader>(r));
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
    const size_t i = heap.top();
    heap.pop();
    const auto& s = readers[i]->seq();
    if (!have_last || compare_seq(last.data(), last.size(), s.data(), s.size()) != 0) {
      sink(s.data(), s.size());
      last = s;
      have_last = true;
    }
    if (readers[i]->next()) heap.push(i);
  }
}

// Minimal acyclic automaton for sorted input (Daciuk et al. 2000). Nodes are frozen bottom-up
// as soon as no later sequence can extend them, and replaced by an equal frozen node (same
// final flag, same labelled edges to the same nodes) when one exists. Frozen nodes are packed
// records in one pool ([degree << 1 | final][count][token, target]...) and the register is an
// open-addressing table of (hash, id) words, so a lookup touches about two cache lines.
class DawgBuilder {
 public:
  DawgBuilder() {
    table_.assign(1 << 16, 0);
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
  uint64_t num_nodes() const { return node_off_.size(); }
  uint64_t num_edges() const { return num_edges_; }
  uint32_t degree(uint32_t v) const { return pool_[node_off_[v]] >> 1; }
  bool final(uint32_t v) const { return pool_[node_off_[v]] & 1; }
  uint64_t count(uint32_t v) const { return pool_[node_off_[v] + 1]; }
  uint32_t edge_token(uint32_t v, uint32_t k) const { return pool_[node_off_[v] + 2 + 2 * k]; }
  uint32_t edge_target(uint32_t v, uint32_t k) const { return pool_[node_off_[v] + 3 + 2 * k]; }

 private:
  struct Open {
    bool final = false;
    std::vector<uint32_t> edges;  // token, frozen child, token, frozen child, ...
  };

  void freeze_to(size_t p) {
    while (depth_ > p) {
      uint32_t id = intern(open_[depth_]);
      --depth_;
      open_[depth_].edges.push_back(prev_[depth_]);
      open_[depth_].edges.push_back(id);
    }
  }

  static uint64_t hash_open(const Open& o) {
    uint64_t h = o.final ? 0x9e3779b97f4a7c15ULL : 0x632be59bd9b4e019ULL;
    for (size_t i = 0; i < o.edges.size(); i += 2) {
      h ^= (uint64_t{o.edges[i]} << 32) | o.edges[i + 1];
      h *= 0xff51afd7ed558ccdULL;
      h ^= h >> 32;
    }
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 29);
  }
  bool equal(uint32_t v, const Open& o) const {
    const uint32_t* r = pool_.data() + node_off_[v];
    if (r[0] != ((static_cast<uint32_t>(o.edges.size() / 2) << 1) | (o.final ? 1u : 0u))) return false;
    return std::equal(o.edges.begin(), o.edges.end(), r + 2);
  }

  uint32_t intern(const Open& o) {
    const uint64_t h = hash_open(o);
    const uint64_t tag = h >> 32;
    const uint64_t mask = table_.size() - 1;
    for (uint64_t i = h & mask;; i = (i + 1) & mask) {
      const uint64_t e = table_[i];
      if (e == 0) break;
      if ((e >> 32) == tag && equal(static_cast<uint32_t>(e) - 1, o)) return static_cast<uint32_t>(e) - 1;
    }
    if (node_off_.size() >= 0xfffffffeu) throw InvalidInput("too many trie nodes for format version 1 (limit 2^32 - 2)");
    const uint32_t id = static_cast<uint32_t>(node_off_.size());
    uint64_t count = o.final ? 1 : 0;
    for (size_t i = 1; i < o.edges.size(); i += 2) count += count_of(o.edges[i]);
    if (count >= (uint64_t{1} << 31)) throw InvalidInput("too many facts for format version 1 (limit 2^31 - 1)");
    node_off_.push_back(pool_.size());
    pool_.push_back((static_cast<uint32_t>(o.edges.size() / 2) << 1) | (o.final ? 1u : 0u));
    pool_.push_back(static_cast<uint32_t>(count));
    pool_.insert(pool_.end(), o.edges.begin(), o.edges.end());
    num_edges_ += o.edges.size() / 2;
    if (2 * (node_off_.size() + 1) > table_.size()) {
      rehash(table_.size() * 2);
    } else {
      insert((tag << 32) | (id + 1), h);
    }
    return id;
  }
  uint64_t count_of(uint32_t v) const { return pool_[node_off_[v] + 1]; }
  void insert(uint64_t entry, uint64_t h) {
    const uint64_t mask = table_.size() - 1;
    uint64_t i = h & mask;
    while (table_[i] != 0) i = (i + 1) & mask;
    table_[i] = entry;
  }
  void rehash(size_t capacity) {
    std::vector<uint64_t> old(capacity, 0);
    old.swap(table_);
    Open tmp;
    for (uint32_t v = 0; v < node_off_.size(); ++v) {
      const uint32_t* r = pool_.data() + node_off_[v];
      tmp.final = r[0] & 1;
      tmp.edges.assign(r + 2, r + 2 + 2 * (r[0] >> 1));
      const uint64_t h = hash_open(tmp);
      insert(((h >> 32) << 32) | (v + 1), h);
    }
  }

  std::vector<uint32_t> pool_;
  std::vector<uint64_t> node_off_;
  std::vector<uint64_t> table_;  // (hash >> 32) << 32 | (id + 1); 0 = empty
  uint64_t num_edges_ = 0;
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
                            unsigned& rank_bytes, uint64_t& root_offset) {
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
    for (uint32_t k = g.degree(v); k-- > 0;) {
      if (position[g.edge_target(v, k)] == kNone) stack.push_back(g.edge_target(v, k));
    }
  }
  // Kind and next-child index of each placed node.
  std::vector<uint8_t> kind(n);
  std::vector<int32_t> next_child(n, -1);
  for (uint64_t i = 0; i < n; ++i) {
    const uint32_t v = order[i];
    const uint32_t nxt = i + 1 < n ? order[i + 1] : kNone;
    const uint32_t d = g.degree(v);
    for (uint32_t k = 0; k < d && d <= kSmallMaxDegree; ++k) {
      if (g.edge_target(v, k) == nxt) {
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
  rank_bytes = g.count(root) < (uint64_t{1} << 24) ? 3 : 4;
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
          total += 1 + varint_size(g.count(v)) + d * token_bytes + (d - flag) * target_bytes;
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
    const uint32_t d = g.degree(v);
    uint8_t* p = data.data() + offset[v];
    switch (kind[v]) {
      case kLeaf:
        *p = make_head(true, kLeaf, 0);
        break;
      case kChain:
        *p++ = make_head(g.final(v), kChain, 0);
        store_uint(p, g.edge_token(v, 0), token_bytes);
        break;
      case kSmall: {
        // Children in token order, except that the child stored next (if any) comes first.
        const int32_t nc = next_child[v];
        uint32_t edges[kSmallMaxDegree];
        uint32_t m = 0;
        if (nc >= 0) edges[m++] = static_cast<uint32_t>(nc);
        for (uint32_t k = 0; k < d; ++k) {
          if (static_cast<int32_t>(k) != nc) edges[m++] = k;
        }
        *p++ = make_head(g.final(v), kSmall, static_cast<uint8_t>(((d - 1) << 1) | (nc >= 0 ? 1 : 0)));
        p = store_varint(p, g.count(v));
        for (uint32_t k = 0; k < d; ++k, p += token_bytes) store_uint(p, g.edge_token(v, edges[k]), token_bytes);
        for (uint32_t k = nc >= 0 ? 1 : 0; k < d; ++k, p += target_bytes) {
          store_uint(p, offset[g.edge_target(v, edges[k])], target_bytes);
        }
        break;
      }
      default: {
        *p++ = make_head(g.final(v), kLarge, 0);
        p = store_varint(p, d);
        p = store_varint(p, g.count(v));
        for (uint32_t k = 0; k < d; ++k, p += token_bytes) store_uint(p, g.edge_token(v, k), token_bytes);
        for (uint32_t k = 0; k < d; ++k, p += target_bytes) store_uint(p, offset[g.edge_target(v, k)], target_bytes);
        uint64_t rank = g.final(v) ? 1 : 0;
        for (uint32_t k = 0; k < d; ++k, p += rank_bytes) {
          store_uint(p, rank, rank_bytes);
          rank += g.count(g.edge_target(v, k));
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
    // Buffer bytes: tokens, offsets, and the keyed sort entries and order made when sorting.
    if (tokens_.size() * 4 + offsets_.size() * 32 >= budget_) spill();
  }
}

void TrieBuilder::add(const int64_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  add_impl(tokens, num_tokens, offsets, n);
}
void TrieBuilder::add(const int32_t* tokens, int64_t num_tokens, const int64_t* offsets, int64_t n) {
  add_impl(tokens, num_tokens, offsets, n);
}

std::string TrieBuilder::new_run_path() {
  return (tmp_dir_.empty() ? std::string(".") : tmp_dir_) + "/ktrie-run." + std::to_string(::getpid()) + "." +
         std::to_string(g_tmp_counter.fetch_add(1));
}

void TrieBuilder::spill() {
  if (offsets_.size() < 2) return;
  const std::string path = new_run_path();
  runs_.push_back(path);  // registered first, so it is removed on any error
  RunWriter w(path);
  emit_sorted_unique(tokens_, offsets_, vocab_size_, [&w](const uint32_t* p, size_t len) { w.write(p, len); });
  w.close();
  ++num_spilled_;
  tokens_.clear();
  offsets_.assign(1, 0);
  // Bound the number of files open in the final merge: fold the runs into one.
  if (runs_.size() >= kMaxRuns) {
    const std::string merged = new_run_path();
    try {
      RunWriter mw(merged);
      merge_runs(runs_, [&mw](const uint32_t* p, size_t len) { mw.write(p, len); });
      mw.close();
    } catch (...) {
      std::remove(merged.c_str());
      throw;
    }
    remove_runs();
    runs_.push_back(merged);
  }
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
    merge_runs(runs_, sink);
    stats.num_runs = num_spilled_;
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
  unsigned rank_bytes = 0;
  std::vector<uint8_t> data = layout(g, root, token_bytes, target_bytes, rank_bytes, root_offset);

  ktrie::Header h;
  std::memset(&h, 0, sizeof h);
  std::memcpy(h.magic, ktrie::kMagic, sizeof h.magic);
  h.format_version = ktrie::kFormatVersion;
  h.header_size = ktrie::kHeaderSize;
  h.file_size = ktrie::kHeaderSize + data.size();
  h.vocab_size = vocab_size_;
  h.token_bytes = static_cast<uint8_t>(token_bytes);
  h.target_bytes = static_cast<uint8_t>(target_bytes);
  h.rank_bytes = static_cast<uint8_t>(rank_bytes);
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
