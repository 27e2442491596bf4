#include "core/dawg_writer.h"

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <stdexcept>

#include "core/checksum.h"
#include "core/errors.h"
#include "core/ktrie_format.h"

namespace kcore {

using namespace ktrie;

namespace {
constexpr uint64_t kOffsetMask = (uint64_t{1} << 48) - 1;
constexpr size_t kInitialSlots = size_t{1} << 12;
constexpr size_t kEntryFixed = 8 + 4 + 8 + 8;  // hash, key length, addr, count
}  // namespace

void DawgWriter::Generation::reset(size_t slots, uint64_t arena_capacity) {
  table.assign(slots, 0);
  table.shrink_to_fit();
  arena = std::vector<uint8_t>();
  // Reserved once (address space only: pages are touched as the arena fills), so the arena
  // never reallocates and its memory never briefly doubles.
  arena.reserve(arena_capacity);
  entries = 0;
}

DawgWriter::DawgWriter(std::vector<uint32_t> code_of, unsigned token_bytes, uint64_t register_budget,
                       const std::string& tmp_dir)
    : code_of_(std::move(code_of)),
      token_bytes_(token_bytes),
      gen_budget_(std::max<uint64_t>(register_budget / 2, uint64_t{1} << 20)),
      stream_fd_(open_scratch_file(tmp_dir, "record stream")),
      stream_(stream_fd_.get(), "record stream") {
  young_.reset(kInitialSlots, gen_budget_);
  old_.reset(0, 0);
  open_.resize(1);
}

void DawgWriter::add(const uint32_t* w, size_t len) {
  size_t p = 0;
  const size_t m = std::min(len, prev_.size());
  while (p < m && prev_[p] == w[p]) ++p;
  const bool extends_prev = p == prev_.size() && len > p;
  const bool after_prev = p < len && p < prev_.size() && w[p] > prev_[p];
  if (num_facts_ > 0 && !extends_prev && !after_prev)
    throw std::logic_error("trie builder: input stream is not sorted and unique");
  if (num_facts_ + 1 >= (uint64_t{1} << 32))
    throw InvalidInput("too many facts for format version 2 (limit 2^32 - 1)");
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

void DawgWriter::freeze_to(size_t p) {
  while (depth_ > p) {
    Edge e = freeze(open_[depth_]);
    --depth_;
    e.token = prev_[depth_];
    open_[depth_].edges.push_back(e);
  }
}

void DawgWriter::finish() {
  freeze_to(0);
  const Open& root = open_[0];
  uint64_t count = root.final ? 1 : 0;
  for (const Edge& e : root.edges) count += e.count;
  // The root is never equal to another node (its language would contain itself shifted), and
  // it must be the last record: written without a register lookup.
  write_record(root, count);
  root_count_ = count;
  stream_.flush();
  young_.reset(0, 0);
  old_.reset(0, 0);
}

DawgWriter::Edge DawgWriter::freeze(const Open& n) {
  key_.clear();
  auto varint = [this](uint64_t v) {
    while (v >= 128) {
      key_.push_back(static_cast<uint8_t>(v | 128));
      v >>= 7;
    }
    key_.push_back(static_cast<uint8_t>(v));
  };
  varint((uint64_t{n.edges.size()} << 1) | (n.final ? 1 : 0));
  for (const Edge& e : n.edges) {
    varint(e.token);
    varint(e.addr);
  }
  const uint64_t hash = checksum64(key_.data(), key_.size());
  auto read_entry = [](const Generation& g, int64_t off) {
    const uint8_t* p = g.arena.data() + off;
    uint32_t klen;
    std::memcpy(&klen, p + 8, 4);
    Edge e{0, 0, 0};
    std::memcpy(&e.addr, p + 12 + klen, 8);
    std::memcpy(&e.count, p + 20 + klen, 8);
    return e;
  };
  int64_t off = lookup(young_, hash);
  if (off >= 0) return read_entry(young_, off);
  off = lookup(old_, hash);
  if (off >= 0) {
    const Edge e = read_entry(old_, off);
    insert(young_, hash, e.addr, e.count);
    return e;
  }
  uint64_t count = n.final ? 1 : 0;
  for (const Edge& e : n.edges) count += e.count;
  const uint64_t addr = write_record(n, count);
  insert(young_, hash, addr, count);
  return Edge{0, addr, count};
}

int64_t DawgWriter::lookup(const Generation& g, uint64_t hash) const {
  if (g.table.empty()) return -1;
  const uint64_t mask = g.table.size() - 1;
  const uint64_t tag = hash >> 48;
  for (uint64_t i = hash & mask;; i = (i + 1) & mask) {
    const uint64_t e = g.table[i];
    if (e == 0) return -1;
    if ((e >> 48) != tag) continue;
    const uint64_t off = (e & kOffsetMask) - 1;
    const uint8_t* p = g.arena.data() + off;
    uint64_t h;
    uint32_t klen;
    std::memcpy(&h, p, 8);
    std::memcpy(&klen, p + 8, 4);
    if (h == hash && klen == key_.size() && std::memcmp(p + 12, key_.data(), klen) == 0) return static_cast<int64_t>(off);
  }
}

void DawgWriter::put_slot(Generation& g, uint64_t hash, uint64_t arena_offset) {
  const uint64_t mask = g.table.size() - 1;
  uint64_t i = hash & mask;
  while (g.table[i] != 0) i = (i + 1) & mask;
  g.table[i] = ((hash >> 48) << 48) | (arena_offset + 1);
}

void DawgWriter::insert(Generation& g, uint64_t hash, uint64_t addr, uint64_t count) {
  const size_t entry = kEntryFixed + key_.size();
  const bool grow = 2 * (g.entries + 1) > g.table.size();
  const uint64_t table_bytes = (grow ? 2 * g.table.size() : g.table.size()) * 8;
  if (table_bytes + g.arena.size() + entry > gen_budget_ && g.entries > 0) {
    // The young generation is full: it becomes the old one, the old one is dropped.
    old_ = std::move(young_);
    young_ = Generation();
    young_.reset(kInitialSlots, gen_budget_);
    ++generations_;
    insert(young_, hash, addr, count);
    return;
  }
  if (grow) {
    g.table.assign(g.table.size() * 2, 0);
    for (uint64_t off = 0; off < g.arena.size();) {
      uint64_t h;
      uint32_t klen;
      std::memcpy(&h, g.arena.data() + off, 8);
      std::memcpy(&klen, g.arena.data() + off + 8, 4);
      put_slot(g, h, off);
      off += kEntryFixed + klen;
    }
  }
  const uint64_t off = g.arena.size();
  if (off >= kOffsetMask) throw std::logic_error("trie builder: register arena too large");
  const uint32_t klen = static_cast<uint32_t>(key_.size());
  const uint8_t* h = reinterpret_cast<const uint8_t*>(&hash);
  g.arena.insert(g.arena.end(), h, h + 8);
  g.arena.insert(g.arena.end(), reinterpret_cast<const uint8_t*>(&klen), reinterpret_cast<const uint8_t*>(&klen) + 4);
  g.arena.insert(g.arena.end(), key_.begin(), key_.end());
  g.arena.insert(g.arena.end(), reinterpret_cast<const uint8_t*>(&addr), reinterpret_cast<const uint8_t*>(&addr) + 8);
  g.arena.insert(g.arena.end(), reinterpret_cast<const uint8_t*>(&count), reinterpret_cast<const uint8_t*>(&count) + 8);
  put_slot(g, hash, off);
  ++g.entries;
}

uint64_t DawgWriter::write_record(const Open& n, uint64_t count) {
  const uint64_t L = length_;  // a child at address a lies (L - a) bytes after this record's end
  const size_t d = n.edges.size();
  rec_.clear();
  auto varint = [this](uint64_t v) {
    while (v >= 128) {
      rec_.push_back(static_cast<uint8_t>(v | 128));
      v >>= 7;
    }
    rec_.push_back(static_cast<uint8_t>(v));
  };
  auto fixed = [this](uint64_t v, unsigned width) {
    for (unsigned i = 0; i < width; ++i) rec_.push_back(static_cast<uint8_t>(v >> (8 * i)));
  };
  if (d == 0) {
    rec_.push_back(make_head(true, kLeaf, 0));
  } else if (d == 1 && n.edges[0].addr == L) {
    const uint32_t c = code_of_[n.edges[0].token];
    if (c < kChainInlineCodes) {
      rec_.push_back(make_head(n.final, kChain, static_cast<uint8_t>(c + 1)));
    } else {
      rec_.push_back(make_head(n.final, kChain, 0));
      varint(c);
    }
  } else if (d <= kSmallMaxDegree) {
    // Only the last child (the largest token, frozen last) can be the record just written.
    const bool next = n.edges.back().addr == L;
    rec_.push_back(make_head(n.final, kSmall, static_cast<uint8_t>(((d - 1) << 1) | (next ? 1 : 0))));
    if (d > 1) varint(count);  // one child: the count is final + the child's (as for CHAIN)
    for (const Edge& e : n.edges) varint(code_of_[e.token]);
    // Each stored target is the smaller of its distance after this record and its stream
    // address (its distance from the end of the file): shared suffixes are frozen early, so
    // they sit near the end of the file and are cheaper to name from there.
    for (size_t k = 0; k + (next ? 1 : 0) < d; ++k) {
      const uint64_t delta = L - n.edges[k].addr, from_end = n.edges[k].addr;
      varint(delta <= from_end ? delta << 1 : (from_end << 1) | 1);
    }
  } else {
    uint64_t max_delta = 0, rank = n.final ? 1 : 0, max_rank = 0;
    for (const Edge& e : n.edges) {
      max_delta = std::max(max_delta, L - e.addr);
      max_rank = std::max(max_rank, rank);
      rank += e.count;
    }
    const unsigned dw = uint_width(max_delta), rw = uint_width(max_rank);
    if (rw > 4) throw InvalidInput("too many facts for format version 2 (limit 2^32 - 1)");
    rec_.push_back(make_head(n.final, kLarge, static_cast<uint8_t>(((dw - 1) << 2) | (rw - 1))));
    varint(d);
    varint(count);
    for (const Edge& e : n.edges) fixed(e.token, token_bytes_);
    for (const Edge& e : n.edges) fixed(L - e.addr, dw);
    rank = n.final ? 1 : 0;
    for (const Edge& e : n.edges) {
      fixed(rank, rw);
      rank += e.count;
    }
  }
  std::reverse(rec_.begin(), rec_.end());
  stream_.write(rec_.data(), rec_.size());
  length_ += rec_.size();
  ++num_records_;
  num_edges_ += d;
  return length_;
}

void DawgWriter::copy_records_to(FdWriter& out, const ProgressFn& progress, Checksum64Stream* sum) const {
  stream_.flush();
  std::vector<uint8_t> buf(size_t{4} << 20);
  uint64_t pos = length_;
  while (pos > 0) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(buf.size(), pos));
    size_t got = 0;
    while (got < n) {
      const ssize_t r = ::pread(stream_fd_.get(), buf.data() + got, n - got, static_cast<off_t>(pos - n + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) throw_io("cannot read the", "record stream");
      got += static_cast<size_t>(r);
    }
    std::reverse(buf.begin(), buf.begin() + static_cast<int64_t>(n));
    if (sum) sum->update(buf.data(), n);
    out.write(buf.data(), n);
    pos -= n;
    if (progress) progress(length_ - pos);
  }
}

}  // namespace kcore
