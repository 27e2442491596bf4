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
    const uint64_t table_bytes = h_.table_count * h_.token_bytes;
    const bool ok =
        h_.header_size == kHeaderSize && h_.table_offset == kHeaderSize && h_.table_count <= h_.vocab_size &&
        h_.data_offset == h_.table_offset + (table_bytes + 7) / 8 * 8 && h_.data_offset <= size_ &&
        h_.data_size <= size_ && h_.data_offset + h_.data_size == size_ && h_.data_size > kDataPad &&
        (h_.token_bytes == 2 || h_.token_bytes == 3) && h_.root_offset < h_.data_size - kDataPad &&
        h_.vocab_size >= 1 && h_.vocab_size <= (1u << 24) && h_.fingerprint_len <= kMaxFingerprint &&
        h_.num_facts >= 1 && h_.num_facts < (uint64_t{1} << 32) && h_.state_offset_bits >= 1 &&
        h_.state_offset_bits < kStateBits && h_.data_size - kDataPad <= (uint64_t{1} << h_.state_offset_bits) &&
        bit_width(h_.num_facts - 1) <= kStateBits - h_.state_offset_bits;
    if (!ok) corrupt("inconsistent header fields (section table)");
    data_ = map_ + h_.data_offset;
    data_end_ = h_.data_size - kDataPad;
    table_ = map_ + h_.table_offset;
    table_count_ = h_.table_count;
    tb_ = h_.token_bytes;
    ob_ = h_.state_offset_bits;
    offset_mask_ = (uint64_t{1} << ob_) - 1;
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
  if (checksum64(map_ + kHeaderSize, size_ - kHeaderSize) != h_.data_checksum)
    corrupt("data section is corrupted (checksum mismatch)");
}

uint32_t Trie::token_of_code(uint64_t code) const {
  if (code >= table_count_) corrupt("token code " + std::to_string(code) + " out of range");
  // Checked here so that a corrupted table cannot make a caller index past its vocabulary.
  const uint32_t t = static_cast<uint32_t>(load_uint(table_ + code * tb_, tb_));
  if (t >= h_.vocab_size) corrupt("token id " + std::to_string(t) + " >= vocab_size in the token table");
  return t;
}

Trie::Node Trie::decode(uint64_t off) const {
  if (off >= data_end_) corrupt("node offset " + std::to_string(off) + " out of range");
  const uint8_t head = data_[off];
  Node n;
  n.kind = kind_of(head);
  n.final = (head & kFinalBit) != 0;
  n.tokens = n.deltas = n.ranks = nullptr;
  n.delta_width = n.rank_width = 0;
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
      n.end = p;
      return n;
    case kChain: {
      n.degree = 1;
      n.count = 0;
      const unsigned c = head & 31u;
      n.tok[0] = token_of_code(c > 0 ? c - 1 : varint());
      n.end = p;
      n.tgt[0] = p;
      break;
    }
    case kSmall: {
      n.degree = ((head >> 1) & 15u) + 1;
      const bool next = head & 1;
      n.count = n.degree > 1 ? varint() : 0;  // one child: see count_of
      for (uint32_t i = 0; i < n.degree; ++i) n.tok[i] = token_of_code(varint());
      uint64_t target[kSmallMaxDegree];
      const uint32_t stored = n.degree - (next ? 1u : 0u);
      for (uint32_t i = 0; i < stored; ++i) target[i] = varint();
      n.end = p;
      for (uint32_t i = 0; i < stored; ++i) n.tgt[i] = small_target(target[i], p, off);
      if (next) n.tgt[n.degree - 1] = p;
      break;
    }
    default: {
      const uint64_t d = varint();
      if (d == 0 || d > h_.vocab_size) corrupt("bad record at offset " + std::to_string(off));
      n.degree = static_cast<uint32_t>(d);
      n.count = varint();
      n.delta_width = ((head >> 2) & 7u) + 1;
      n.rank_width = (head & 3u) + 1;
      n.tokens = data_ + p;
      p += d * tb_;
      n.deltas = data_ + p;
      p += d * n.delta_width;
      n.ranks = data_ + p;
      p += d * n.rank_width;
      n.end = p;
    }
  }
  if (n.end > data_end_) corrupt("record at offset " + std::to_string(off) + " runs past the data section");
  return n;
}

uint64_t Trie::small_target(uint64_t v, uint64_t record_end, uint64_t off) const {
  const uint64_t x = v >> 1;
  if (v & 1) {  // distance from the end of the data section
    if (x == 0 || x > data_end_) corrupt("edge target out of range in the record at offset " + std::to_string(off));
    return data_end_ - x;
  }
  if (x >= data_end_ - std::min(record_end, data_end_))
    corrupt("edge target out of range in the record at offset " + std::to_string(off));
  return record_end + x;
}

uint64_t Trie::target(const Node& n, uint32_t i) const {
  if (n.kind != kLarge) return n.tgt[i];
  const uint64_t delta = load_uint(n.deltas + uint64_t{i} * n.delta_width, n.delta_width);
  if (delta >= data_end_ - std::min(n.end, data_end_)) corrupt("edge target out of range");
  return n.end + delta;
}

uint64_t Trie::count_of(uint64_t off) const {
  // Reads only as much of each record as the count needs: CHAIN runs are followed to the first
  // record that stores one.
  uint64_t extra = 0;
  for (;;) {
    if (off >= data_end_) corrupt("node offset " + std::to_string(off) + " out of range");
    const uint8_t head = data_[off];
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
    switch (kind_of(head)) {
      case kLeaf:
        return extra + 1;
      case kChain:
        extra += (head & kFinalBit) ? 1 : 0;
        if ((head & 31u) == 0) varint();
        off = p;
        break;
      case kSmall:
        if (((head >> 1) & 15u) == 0) {  // one child, no stored count: final + the child's
          extra += (head & kFinalBit) ? 1 : 0;
          varint();  // token code
          if (head & 1) {
            off = p;  // the child is the next record
          } else {
            const uint64_t v = varint();
            off = small_target(v, p, off);
          }
          break;
        }
        return extra + varint();
      default:
        varint();
        return extra + varint();
    }
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
  for (uint32_t i = 0; i < n.degree; ++i) {
    if (n.tok[i] >= tok) return n.tok[i] == tok ? static_cast<int64_t>(i) : int64_t{-1};
  }
  return -1;
}

uint64_t Trie::child_rank(const Node& n, uint32_t i) const {
  if (n.kind == kLarge) return load_uint(n.ranks + uint64_t{i} * n.rank_width, n.rank_width);
  // Children are in token order: the facts of the children before i come first.
  uint64_t r = n.final ? 1 : 0;
  for (uint32_t k = 0; k < i; ++k) r += count_of(n.tgt[k]);
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
      const uint64_t r = load_uint(n.ranks + uint64_t{i} * n.rank_width, n.rank_width);
      const uint64_t r_next =
          i + 1 < n.degree ? load_uint(n.ranks + uint64_t{i + 1} * n.rank_width, n.rank_width) : n.count;
      if (!range_written(written, end, base + static_cast<int64_t>(r), static_cast<int64_t>(r_next - r))) {
        set(token(n, i));
      }
    }
    return;
  }
  // SMALL / CHAIN: children in token order, child i's facts right after those of child i - 1.
  uint64_t r = n.final ? 1 : 0;
  for (uint32_t i = 0; i < n.degree; ++i) {
    const uint64_t c = count_of(n.tgt[i]);
    if (!range_written(written, end, base + static_cast<int64_t>(r), static_cast<int64_t>(c))) set(n.tok[i]);
    r += c;
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
