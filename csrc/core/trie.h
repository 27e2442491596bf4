// Reading a .ktrie file (see ktrie_format.h): memory-mapped, validated, immutable, so one loaded
// trie may be queried from many threads at once.
//
// A cursor state is a non-negative int64: (fact rank << state_offset_bits) | record offset, or -1
// for a dead state (state_offset_bits is chosen per file, see ktrie_format.h). The rank is the id
// of the first fact through the node on the path taken (facts numbered in lexicographic order of
// their token sequences), which a DAG node alone cannot tell since it is shared by many paths.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/ktrie_format.h"

namespace kcore {

class Trie {
 public:
  // Maps the file and validates its header, size and section table; with verify_data also the
  // checksum of the whole data section. Throws FileFormat naming the file and the problem.
  explicit Trie(const std::string& path, bool verify_data);
  ~Trie();
  Trie(const Trie&) = delete;
  Trie& operator=(const Trie&) = delete;

  // Recomputes the data checksum; throws FileFormat on mismatch.
  void verify_data() const;

  const std::string& path() const { return path_; }
  uint32_t vocab_size() const { return h_.vocab_size; }
  uint64_t num_facts() const { return h_.num_facts; }
  uint64_t num_nodes() const { return h_.num_nodes; }
  uint64_t num_edges() const { return h_.num_edges; }
  uint64_t num_trie_nodes() const { return h_.num_trie_nodes; }
  uint64_t file_bytes() const { return size_; }
  std::string fingerprint() const { return std::string(h_.fingerprint, h_.fingerprint_len); }
  int64_t root_state() const { return make_state(h_.root_offset, 0); }

  // Single-state queries. States outside this trie throw InvalidInput.
  int64_t step(int64_t state, int64_t token) const;  // -1 when no fact continues with token
  bool is_complete(int64_t state) const;
  void fact_range(int64_t state, int64_t* first, int64_t* count) const;
  void next_tokens(int64_t state, std::vector<int32_t>* out) const;

  // Batched queries over n states (parallel over rows for large batches).
  void step(const int64_t* states, const int64_t* tokens, int64_t n, int64_t* out) const;
  void is_complete(const int64_t* states, int64_t n, bool* out) const;
  void fact_range(const int64_t* states, int64_t n, int64_t* first, int64_t* count) const;
  // Writes row i of an int32 [n, words_per_row] bitmask (words_per_row >= ceil(vocab/32)): bit
  // j % 32 of word j / 32 set iff token j continues a fact from states[i]. With written_offsets
  // (n + 1 CSR offsets) and written_ids (fact ids sorted within each row), a token is left out
  // when every fact through it is already written in that row.
  void fill_bitmask(const int64_t* states, int64_t n, int32_t* bitmask, int64_t words_per_row,
                    const int64_t* written_offsets, const int64_t* written_ids) const;

 private:
  // A decoded record. CHAIN and SMALL records are decoded whole (at most 16 children, varint
  // coded); LARGE records keep pointers into their fixed-width arrays.
  struct Node {
    uint8_t kind;
    bool final;
    uint32_t degree;
    uint64_t count;  // facts through the node (not stored for CHAIN: see count_of)
    uint64_t end;    // offset just past the record
    uint32_t tok[ktrie::kSmallMaxDegree];  // CHAIN / SMALL: tokens, ascending
    uint64_t tgt[ktrie::kSmallMaxDegree];  // CHAIN / SMALL: child offsets
    const uint8_t* tokens;                 // LARGE
    const uint8_t* deltas;
    const uint8_t* ranks;
    unsigned delta_width, rank_width;
  };
  Node decode(uint64_t offset) const;
  uint64_t count_of(uint64_t offset) const;
  uint32_t token(const Node& n, uint32_t i) const {
    return n.kind == ktrie::kLarge ? static_cast<uint32_t>(ktrie::load_uint(n.tokens + uint64_t{i} * tb_, tb_)) : n.tok[i];
  }
  uint64_t target(const Node& n, uint32_t i) const;
  uint64_t small_target(uint64_t v, uint64_t record_end, uint64_t off) const;
  int64_t find(const Node& n, uint32_t token) const;
  uint64_t child_rank(const Node& n, uint32_t i) const;
  uint32_t token_of_code(uint64_t code) const;
  void check_state(int64_t state) const;
  int64_t make_state(uint64_t offset, uint64_t rank) const { return static_cast<int64_t>((rank << ob_) | offset); }
  uint64_t state_offset(int64_t s) const { return static_cast<uint64_t>(s) & offset_mask_; }
  uint64_t state_rank(int64_t s) const { return static_cast<uint64_t>(s) >> ob_; }
  void fill_row(int64_t state, uint32_t* row, int64_t words, const int64_t* written, int64_t num_written) const;
  [[noreturn]] void corrupt(const std::string& what) const;

  std::string path_;
  const uint8_t* map_ = nullptr;
  uint64_t size_ = 0;
  ktrie::Header h_;
  const uint8_t* data_ = nullptr;
  uint64_t data_end_ = 0;  // records lie in [0, data_end_); padding follows
  const uint8_t* table_ = nullptr;  // token of each code
  uint64_t table_count_ = 0;
  unsigned tb_ = 2, ob_ = 32;
  uint64_t offset_mask_ = 0;
};

}  // namespace kcore
