// The .ktrie file format (version 2): a minimised token DAG (DAWG) of tokenized facts.
//
// File = 256-byte header + token table + data section. All integers little-endian.
//
// Header:
//   0   char[8] magic "KCORTRIE"        128 u32 fingerprint_len, then 112 bytes of fingerprint
//   8   u32 format_version (= 2)            (the tokenizer fingerprint, hex; empty if none)
//   12  u32 header_size (= 256)         248 u64 header_checksum: checksum64 of bytes [0, 248)
//   16  u64 file_size (truncation check)
//   24  u32 vocab_size
//   28  u8 token_bytes (2 or 3), u8 state_offset_bits, u8 reserved[2]
//   32  u64 num_facts      40 u64 num_nodes (DAG records)  48 u64 num_edges
//   56  u64 num_trie_nodes (nodes a plain prefix trie of the same facts would have)
//   64  u64 data_offset    72 u64 data_size    80 u64 root_offset (= 0: the root is the first record)
//   88  u64 data_checksum: checksum64 of bytes [header_size, file_size) (token table and data)
//   96  u64 table_offset   104 u64 table_count
//
// Token table: table_count entries of token_bytes each, then zero padding to a multiple of 8.
// Entry c is the token of code c; codes are given in order of decreasing frequency in the input,
// so the tokens that occur most take the shortest codes.
//
// Data section: node records, addressed by their byte offset in the section, followed by
// kDataPad zero bytes (so the reader may load 8 bytes at any record position). Records are in
// reverse post-order: every child lies after its parent, and the child with the largest token of
// a node written just before it is the record right after the parent (no pointer stored). A
// child's position is stored as a delta: child offset = end of the parent's record + delta.
// A record starts with one byte: bit 7 = final (a fact ends here), bits 6-5 = kind, bits 4-0
// kind-specific.
//   LEAF  (degree 0, always final, count 1): [head]
//   CHAIN (one child, the next record; path compression of single-child runs): head bits 4-0 =
//         c: c in 1..31 means token code c - 1; c = 0 means [varint code] follows.
//   SMALL (1..16 children): head bits 4-1 = degree - 1, bit 0 = the last child is the next record
//         (its target is not stored): [head][count varint, only if degree > 1][degree x varint
//         code, children in ascending token order][targets varint, one per child except the
//         next-record one]. A target t names the child as (t >> 1) bytes after the end of this
//         record when t & 1 = 0, or as (t >> 1) bytes before the end of the records when t & 1 = 1
//         (the writer takes the smaller: shared suffixes, frozen first, lie near the end). A
//         single child's count is not stored: it is final + the count of the child.
//   LARGE (any degree, binary-searched): head bits 4-2 = delta width - 1 (1..8 bytes), bits 1-0 =
//         rank width - 1 (1..4 bytes): [head][degree varint][count varint]
//         [tokens: degree x token_bytes, ascending][deltas: degree x delta width]
//         [rank offsets: degree x rank width]
// count = facts whose token sequence passes through the node (the leaf count). Facts are
// numbered in lexicographic order of their token sequences (a prefix first), so the facts
// through a node form one id range; the rank offset of child i is final + the counts of
// children 0..i-1 (the DAWG perfect-hash scheme of Lucchesi & Kowaltowski 1993). SMALL records
// store no rank offsets: the reader sums the counts of the preceding siblings. The count of a
// CHAIN record (or of a SMALL record of one child) is not stored: it is final + the count of
// its child.
//
// Cursor state (int64, see trie.h): (fact rank << state_offset_bits) | record offset; the builder
// chooses state_offset_bits so that offsets and ranks both fit in 63 bits (facts x data bytes <=
// 2^63; for example 1 billion facts in up to 8 GiB).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kcore::ktrie {

constexpr char kMagic[8] = {'K', 'C', 'O', 'R', 'T', 'R', 'I', 'E'};
constexpr uint32_t kFormatVersion = 2;
constexpr uint32_t kHeaderSize = 256;
constexpr uint32_t kHeaderChecksumOffset = 248;
constexpr uint32_t kMaxFingerprint = 112;
constexpr uint64_t kDataPad = 8;
constexpr uint32_t kSmallMaxDegree = 16;
constexpr uint32_t kChainInlineCodes = 31;  // token codes 0..30 live in a CHAIN head
constexpr unsigned kStateBits = 63;         // states are non-negative int64 (-1 = dead)

enum Kind : uint8_t { kLeaf = 0, kChain = 1, kSmall = 2, kLarge = 3 };
constexpr uint8_t kFinalBit = 0x80;
inline uint8_t kind_of(uint8_t head) { return (head >> 5) & 3; }
inline uint8_t make_head(bool final, Kind kind, uint8_t low) {
  return static_cast<uint8_t>((final ? kFinalBit : 0) | (kind << 5) | (low & 31));
}

struct Header {
  char magic[8];
  uint32_t format_version;
  uint32_t header_size;
  uint64_t file_size;
  uint32_t vocab_size;
  uint8_t token_bytes, state_offset_bits, reserved[2];
  uint64_t num_facts, num_nodes, num_edges, num_trie_nodes;
  uint64_t data_offset, data_size, root_offset, data_checksum;
  uint64_t table_offset, table_count;
  uint8_t unused[128 - 112];
  uint32_t fingerprint_len;
  char fingerprint[kMaxFingerprint];
  uint64_t header_checksum;
};
static_assert(sizeof(Header) == kHeaderSize, "header layout");
static_assert(offsetof(Header, header_checksum) == kHeaderChecksumOffset, "header layout");
static_assert(offsetof(Header, fingerprint_len) == 128, "header layout");
static_assert(offsetof(Header, table_offset) == 96, "header layout");

// Number of bits needed to write v (0 for 0).
inline unsigned bit_width(uint64_t v) {
  unsigned n = 0;
  while (v) {
    v >>= 1;
    ++n;
  }
  return n;
}

// Little-endian unsigned integer of `width` (1..8) bytes; reads 8 bytes, so p + 8 must be mapped.
inline uint64_t load_uint(const uint8_t* p, unsigned width) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return width >= 8 ? v : (v & ((uint64_t{1} << (8 * width)) - 1));
}

inline void store_uint(uint8_t* p, uint64_t v, unsigned width) {
  for (unsigned i = 0; i < width; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
}

// Bytes of the smallest width (1..8) that holds v.
inline unsigned uint_width(uint64_t v) {
  unsigned w = 1;
  while (w < 8 && v >= (uint64_t{1} << (8 * w))) ++w;
  return w;
}

inline unsigned varint_size(uint64_t v) {
  unsigned n = 1;
  while (v >= 128) {
    v >>= 7;
    ++n;
  }
  return n;
}

inline uint8_t* store_varint(uint8_t* p, uint64_t v) {
  while (v >= 128) {
    *p++ = static_cast<uint8_t>(v | 128);
    v >>= 7;
  }
  *p++ = static_cast<uint8_t>(v);
  return p;
}

}  // namespace kcore::ktrie
