#include "core/trie.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "core/checksum.h"
#include "core/errors.h"
#include "core/parallel.h"

namespace kcore {

using namespace ktrie;

namespace {
constexpr int64_t kDead = -1;
// Rows per thread in batched calls: a row costs well under a microsecond, a thread start tens.
constexpr int64_t kRowGrain = 512;

// Waking pool threads costs microseconds, more than a small batch takes: small batches, the
// common case in decoding, run inline.
template <typename Fn>
void for_rows(int64_t n, const Fn& fn) {
  if (n < 2 * kRowGrain) {
    fn(int64_t{0}, n);
  } else {
    parallel_for(n, kRowGrain, fn);
  }
}

inline int64_t make_state(uint64_t offset, uint64_t rank) { return static_cast<int64_t>((rank << 32) | offset); }
inline uint64_t state_offset(int64_t s) { return static_cast<uint64_t>(s) & 0xffffffffu; }
inline uint64_t state_rank(int64_t s) { return static_cast<uint64_t>(s) >> 32; }
}  // namespace

void Trie::corrupt(const std::string& what) const { throw FileFormat("'" + path_ + "': " + what); }

Trie::Trie(const std::string& path, bool verify) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "cannot open trie file '" + path + "'");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw std::system_error(err, std::generic_category(), "cannot stat trie file '" + path + "'");
  }
  size_ = static_cast<uint64_t>(st.st_size);
  if (size_ > 0) {
    void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      int err = errno;
      ::close(fd);
      throw std::system_error(err, std::generic_category(), "cannot mmap trie file '" + path + "'");
    }
    map_ = static_cast<const uint8_t*>(m);
  }
  ::close(fd);
  try {
    if (size_ < sizeof kMagic || std::memcmp(map_, kMagic, sizeof kMagic) != 0)
      corrupt("not a kcore trie file (bad magic; expected \"KCORTRIE\")");
    if (size_ < kHeaderSize)
      corrupt("truncated: " + std::to_string(size_) + " bytes, smaller than the " + std::to_string(kHeaderSize) +
              "-byte header");
    std::memcpy(&h_, map_, sizeof h_);
    if (h_.format_version != kFormatVersion)
      corrupt("format version " + std::to_string(h_.format_version) + " is not supported (this kcore reads version " +
              std::to_string(kFormatVersion) + "); rebuild the trie");
    if (checksum64(map_, kHeaderChecksumOffset) != h_.header_checksum) corrupt("header is corrupted (checksum mismatch)");
    if (h_.file_size != size_)
      corrupt("truncated or extended: the header says " + std::to_string(h_.file_size) + " bytes, the file has " +
              std::to_string(size_));
    const bool ok = h_.header_size == kHeaderSize && h_.data_offset == kHeaderSize &&
                    h_.data_offset + h_.data_size == size_ && h_.data_size > kDataPad &&
                    (h_.token_bytes == 2 || h_.token_bytes == 3) && (h_.target_bytes == 3 || h_.target_bytes == 4) &&
                    (h_.rank_bytes == 3 || h_.rank_bytes == 4) && h_.root_offset < h_.data_size - kDataPad && h_.vocab_size >= 1 &&
                    h_.fingerprint_len <= kMaxFingerprint && h_.num_facts >= 1 && h_.num_facts < (uint64_t{1} << 31) &&
                    h_.data_size - kDataPad <= (uint64_t{1} << (8 * h_.target_bytes));
    if (!ok) corrupt("inconsistent header fields (section table)");
    data_ = map_ + h_.data_offset;
    data_end_ = h_.data_size - kDataPad;
    tb_ = h_.token_bytes;
    ab_ = h_.target_bytes;
    rb_ = h_.rank_bytes;
    if (verify) verify_data();
  } catch (...) {
    if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
    map_ = nullptr;
    throw;
  }
}

Trie::~Trie() {
  if (map_) ::munmap(const_cast<uint8_t*>(map_), size_);
}

void Trie::verify_data() const {
  if (checksum64(data_, h_.data_size) != h_.data_checksum) corrupt("data section is corrupted (checksum mismatch)");
}

Trie::Node Trie::decode(uint64_t off) const {
  if (off >= data_end_) corrupt("node offset " + std::to_string(off) + " out of range");
  const uint8_t head = data_[off];
  Node n;
  n.kind = kind_of(head);
  n.final = (head & kFinalBit) != 0;
  n.next_child = -1;
  n.tokens = n.targets = n.ranks = nullptr;
  uint64_t p = off + 1;
  auto varint = [&]() {
    uint64_t v = 0;
    for (unsigned shift = 0; shift < 64 && p < data_end_; shift += 7) {
      const uint8_t b = data_[p++];
      v |= uint64_t{b & 127u} << shift;
      if (b < 128) return v;
    }
    corrupt("bad varint at offset " + std::to_string(p));
  };
  switch (n.kind) {
    case kLeaf:
      n.degree = 0;
      n.count = 1;
      break;
    case kChain:
      n.degree = 1;
      n.next_child = 0;
      n.count = 0;
      n.tokens = data_ + p;
      p += tb_;
      break;
    case kSmall: {
      n.degree = ((head >> 1) & 15u) + 1;
      const bool flag = head & 1;
      n.count = varint();
      if (flag) n.next_child = 0;
      n.tokens = data_ + p;
      p += uint64_t{n.degree} * tb_;
      n.targets = data_ + p;
      p += uint64_t{n.degree - (flag ? 1u : 0u)} * ab_;
      break;
    }
    default: {
      const uint64_t d = varint();
      if (d > h_.vocab_size) corrupt("bad record at offset " + std::to_string(off));
      n.degree = static_cast<uint32_t>(d);
      n.count = varint();
      n.tokens = data_ + p;
      p += d * tb_;
      n.targets = data_ + p;
      p += d * ab_;
      n.ranks = data_ + p;
      p += d * rb_;
    }
  }
  if (p > data_end_) corrupt("record at offset " + std::to_string(off) + " runs past the data section");
  n.end = p;
  return n;
}

uint64_t Trie::target(const Node& n, uint32_t i) const {
  if (static_cast<int32_t>(i) == n.next_child) return n.end;
  const uint32_t slot = n.next_child == 0 ? i - 1 : i;
  const uint64_t t = load_uint(n.targets + uint64_t{slot} * ab_, ab_);
  if (t >= data_end_) corrupt("edge target " + std::to_string(t) + " out of range");
  return t;
}

uint64_t Trie::count_of(uint64_t off) const {
  uint64_t extra = 0;
  for (;;) {
    const Node n = decode(off);
    if (n.kind != kChain) return extra + n.count;
    extra += n.final ? 1 : 0;
    off = n.end;
  }
}

int64_t Trie::find(const Node& n, uint32_t tok) const {
  if (n.kind == kLarge) {
    uint32_t lo = 0, hi = n.degree;
    while (lo < hi) {
      const uint32_t mid = (lo + hi) / 2;
      if (token(n, mid) < tok) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo < n.degree && token(n, lo) == tok ? static_cast<int64_t>(lo) : int64_t{-1};
  }
  // SMALL and CHAIN: at most 16 children, not all in token order (see ktrie_format.h).
  for (uint32_t i = 0; i < n.degree; ++i) {
    if (token(n, i) == tok) return i;
  }
  return -1;
}

uint64_t Trie::child_rank(const Node& n, uint32_t i) const {
  if (n.kind == kLarge) return load_uint(n.ranks + uint64_t{i} * rb_, rb_);
  // The facts of the children with smaller tokens come first.
  const uint32_t t = token(n, i);
  uint64_t r = n.final ? 1 : 0;
  for (uint32_t k = 0; k < n.degree; ++k) {
    if (token(n, k) < t) r += count_of(target(n, k));
  }
  return r;
}

void Trie::check_state(int64_t s) const {
  if (s < kDead || (s >= 0 && (state_offset(s) >= data_end_ || state_rank(s) >= h_.num_facts)))
    throw InvalidInput("state " + std::to_string(s) + " is not a state of this trie (use root_state and step)");
}

int64_t Trie::step(int64_t s, int64_t tok) const {
  check_state(s);
  if (s == kDead || tok < 0 || tok >= static_cast<int64_t>(h_.vocab_size)) return kDead;
  const Node n = decode(state_offset(s));
  const int64_t i = find(n, static_cast<uint32_t>(tok));
  if (i < 0) return kDead;
  const uint32_t ci = static_cast<uint32_t>(i);
  const uint64_t rank = state_rank(s) + child_rank(n, ci);
  // Every child has at least one fact below it, so a valid file keeps rank < num_facts; checked
  // here so that corrupted counts are reported as the file's fault, not as a bad state later.
  if (rank >= h_.num_facts) corrupt("fact rank " + std::to_string(rank) + " out of range (corrupted leaf counts)");
  return make_state(target(n, ci), rank);
}

bool Trie::is_complete(int64_t s) const {
  check_state(s);
  return s != kDead && (data_[state_offset(s)] & kFinalBit) != 0;
}

void Trie::fact_range(int64_t s, int64_t* first, int64_t* count) const {
  check_state(s);
  if (s == kDead) {
    *first = 0;
    *count = 0;
    return;
  }
  *first = static_cast<int64_t>(state_rank(s));
  *count = static_cast<int64_t>(count_of(state_offset(s)));
}

void Trie::next_tokens(int64_t s, std::vector<int32_t>* out) const {
  check_state(s);
  out->clear();
  if (s == kDead) return;
  const Node n = decode(state_offset(s));
  out->resize(n.degree);
  for (uint32_t i = 0; i < n.degree; ++i) (*out)[i] = static_cast<int32_t>(token(n, i));
  if (n.next_child == 0 && n.kind == kSmall) std::sort(out->begin(), out->end());
}

void Trie::step(const int64_t* states, const int64_t* tokens, int64_t n, int64_t* out) const {
  for_rows(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) out[i] = step(states[i], tokens[i]);
  });
}

void Trie::is_complete(const int64_t* states, int64_t n, bool* out) const {
  for (int64_t i = 0; i < n; ++i) out[i] = is_complete(states[i]);
}

void Trie::fact_range(const int64_t* states, int64_t n, int64_t* first, int64_t* count) const {
  for_rows(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) fact_range(states[i], first + i, count + i);
  });
}

namespace {
// True when every id of [first, first + count) is in the sorted id list [lo, hi).
bool range_written(const int64_t* lo, const int64_t* hi, int64_t first, int64_t count) {
  const int64_t* a = std::lower_bound(lo, hi, first);
  const int64_t* b = std::lower_bound(a, hi, first + count);
  if (b - a < count) return false;
  int64_t distinct = 0;
  for (const int64_t* p = a; p != b; ++p) distinct += (p == a || *p != p[-1]) ? 1 : 0;
  return distinct >= count;
}
}  // namespace

void Trie::fill_row(int64_t s, uint32_t* row, int64_t words, const int64_t* written, int64_t num_written) const {
  std::memset(row, 0, static_cast<size_t>(words) * sizeof(uint32_t));
  check_state(s);
  if (s == kDead) return;
  const Node n = decode(state_offset(s));
  const uint32_t vocab = h_.vocab_size;
  // A token id read from a corrupted file must not write outside the row.
  auto set = [&](uint32_t t) {
    if (t >= vocab) corrupt("token id " + std::to_string(t) + " >= vocab_size in a node record");
    row[t >> 5] |= 1u << (t & 31);
  };
  if (num_written == 0) {
    for (uint32_t i = 0; i < n.degree; ++i) set(token(n, i));
    return;
  }
  const int64_t base = static_cast<int64_t>(state_rank(s));
  const int64_t* end = written + num_written;
  if (n.kind == kLarge) {
    for (uint32_t i = 0; i < n.degree; ++i) {
      const uint64_t r = load_uint(n.ranks + uint64_t{i} * rb_, rb_);
      const uint64_t r_next = i + 1 < n.degree ? load_uint(n.ranks + uint64_t{i + 1} * rb_, rb_) : n.count;
      if (!range_written(written, end, base + static_cast<int64_t>(r), static_cast<int64_t>(r_next - r))) {
        set(token(n, i));
      }
    }
    return;
  }
  // SMALL / CHAIN: child i's facts start after those of the children with smaller tokens.
  uint32_t tokens[kSmallMaxDegree];
  uint64_t counts[kSmallMaxDegree];
  for (uint32_t i = 0; i < n.degree; ++i) {
    tokens[i] = token(n, i);
    counts[i] = count_of(target(n, i));
  }
  for (uint32_t i = 0; i < n.degree; ++i) {
    uint64_t r = n.final ? 1 : 0;
    for (uint32_t k = 0; k < n.degree; ++k) r += tokens[k] < tokens[i] ? counts[k] : 0;
    if (!range_written(written, end, base + static_cast<int64_t>(r), static_cast<int64_t>(counts[i]))) set(tokens[i]);
  }
}

void Trie::fill_bitmask(const int64_t* states, int64_t n, int32_t* bitmask, int64_t words_per_row,
                        const int64_t* written_offsets, const int64_t* written_ids) const {
  const int64_t need = (static_cast<int64_t>(h_.vocab_size) + 31) / 32;
  if (words_per_row < need)
    throw InvalidInput("bitmask has " + std::to_string(words_per_row) + " words per row, expected at least ceil(" +
                       std::to_string(h_.vocab_size) + " / 32) = " + std::to_string(need));
  uint32_t* mask = reinterpret_cast<uint32_t*>(bitmask);
  for_rows(n, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t* w = written_offsets ? written_ids + written_offsets[i] : nullptr;
      const int64_t nw = written_offsets ? written_offsets[i + 1] - written_offsets[i] : 0;
      fill_row(states[i], mask + i * words_per_row, words_per_row, w, nw);
    }
  });
}

}  // namespace kcore
