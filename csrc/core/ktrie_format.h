// The .ktrie file format (version 1): a minimised token DAG (DAWG) of tokenized facts.
//
// File = 256-byte header + data section. All integers little-endian.
//
// Header:
//   0   char[8] magic "KCORTRIE"        128 u32 fingerprint_len, then 112 bytes of fingerprint
//   8   u32 format_version (= 1)            (the tokenizer fingerprint, hex; empty if none)
//   12  u32 header_size (= 256)         248 u64 header_checksum: checksum64 of bytes [0, 248)
//   16  u64 file_size (truncation check)
//   24  u32 vocab_size
//   28  u8 token_bytes, u8 target_bytes, u8 rank_bytes, u8 reserved
//   32  u64 num_facts      40 u64 num_nodes (DAG nodes)    48 u64 num_edges
//   56  u64 num_trie_nodes (nodes a plain prefix trie of the same facts would have)
//   64  u64 data_offset    72 u64 data_size    80 u64 root_offset (inside the data section)
//   88  u64 data_checksum: checksum64 of the data section
//
// Data section: node records, addressed by their byte offset in the section, followed by
// kDataPad zero bytes (so the reader may load 8 bytes at any record position). A record starts
// with one byte: bit 7 = final (a fact ends here), bits 6-5 = kind, bits 4-0 kind-specific.
//   LEAF  (degree 0, always final, count 1): [head]
//   CHAIN (one child, stored right after this record; path compression of single-child runs):
//         [head][token]
//   SMALL (2..16 children, or 1 child stored elsewhere): head bits 4-1 = degree-1, bit 0 = one
//         child is the next record: [head][count varint][next-child index u8 if bit 0]
//         [tokens: degree x token_bytes, ascending][targets: (degree - bit 0) x target_bytes]
//   LARGE (any degree, binary-searched): [head][degree varint][count varint]
//         [tokens: degree x token_bytes, ascending][targets: degree x target_bytes]
//         [rank offsets: degree x rank_bytes]
// count = facts whose token sequence passes through the node (the leaf count). Facts are
// numbered in lexicographic order of their token sequences (a prefix first), so the facts
// through a node form one id range; the rank offset of child i is final + the counts of
// children 0..i-1 (the DAWG perfect-hash scheme of Lucchesi & Kowaltowski 1993). SMALL records
// store no rank offsets: the reader sums the counts of the preceding siblings. The count of a
// CHAIN record is not stored: it is final + the count of its child.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace kcore::ktrie {

constexpr char kMagic[8] = {'K', 'C', 'O', 'R', 'T', 'R', 'I', 'E'};
constexpr uint32_t kFormatVersion = 1;
constexpr uint32_t kHeaderSize = 256;
constexpr uint32_t kHeaderChecksumOffset = 248;
constexpr uint32_t kMaxFingerprint = 112;
constexpr uint64_t kDataPad = 8;
constexpr uint32_t kSmallMaxDegree = 16;

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
  uint8_t token_bytes, target_bytes, rank_bytes, reserved;
  uint64_t num_facts, num_nodes, num_edges, num_trie_nodes;
  uint64_t data_offset, data_size, root_offset, data_checksum;
  uint8_t unused[128 - 96];
  uint32_t fingerprint_len;
  char fingerprint[kMaxFingerprint];
  uint64_t header_checksum;
};
static_assert(sizeof(Header) == kHeaderSize, "header layout");
static_assert(offsetof(Header, header_checksum) == kHeaderChecksumOffset, "header layout");
static_assert(offsetof(Header, fingerprint_len) == 128, "header layout");

// Little-endian unsigned integer of `width` (1..8) bytes; reads 8 bytes, so p + 8 must be mapped.
inline uint64_t load_uint(const uint8_t* p, unsigned width) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return width >= 8 ? v : (v & ((uint64_t{1} << (8 * width)) - 1));
}

inline void store_uint(uint8_t* p, uint64_t v, unsigned width) {
  for (unsigned i = 0; i < width; ++i) p[i] = static_cast<uint8_t>(v >> (8 * i));
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
