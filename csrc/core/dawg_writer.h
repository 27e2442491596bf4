// Streaming construction of the minimal acyclic automaton (DAWG) of sorted, unique token
// sequences, written straight out as .ktrie records (format in ktrie_format.h).
//
// The incremental algorithm for sorted input of Daciuk, Mihov, Watson & Watson (2000): a node
// is frozen as soon as no later sequence can extend it, and replaced by an equal frozen node
// (same final flag, same labelled edges to the same nodes) when the register holds one. A frozen
// node is encoded at once and appended to a scratch stream, so memory does not grow with the
// automaton: the stream is in post-order (children first) with each record's bytes reversed, and
// the file is that stream read backwards (reverse post-order, root first), where a parent's last
// frozen child is the record right after it.
//
// The register is bounded (as Lucene's FST builder bounds its suffix hash): two generations of
// a hash table with the keys of recently frozen nodes; when the young one is full it becomes
// the old one and the previous old one is dropped; a hit in the old one moves the node to the
// young one. A node missed because it was dropped is written again: the automaton is then not
// quite minimal (the file a little larger), never wrong. Within the budget the result is the
// minimal automaton.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/checksum.h"
#include "core/external_sort.h"
#include "core/temp_file.h"

namespace kcore {

class DawgWriter {
 public:
  // code_of[token]: the token's code in the file's token table (see ktrie_format.h);
  // token_bytes: width of tokens in LARGE records; register_budget: bytes of the register.
  DawgWriter(std::vector<uint32_t> code_of, unsigned token_bytes, uint64_t register_budget, const std::string& tmp_dir);

  // Adds the next sequence; sequences must come sorted and unique.
  void add(const uint32_t* w, size_t len);
  // Freezes everything and writes the root (the last record of the stream).
  void finish();

  // Copies the records in file order (the stream read backwards) to `out`, adding them to `sum`.
  void copy_records_to(FdWriter& out, const ProgressFn& progress, Checksum64Stream* sum) const;

  uint64_t data_bytes() const { return length_; }
  uint64_t num_facts() const { return num_facts_; }
  uint64_t num_nodes() const { return num_records_; }
  uint64_t num_edges() const { return num_edges_; }
  uint64_t num_trie_nodes() const { return num_trie_nodes_; }
  uint64_t root_count() const { return root_count_; }
  uint64_t register_generations() const { return generations_; }

 private:
  struct Edge {
    uint32_t token;
    uint64_t addr;   // the child's address: its end position in the stream
    uint64_t count;  // facts through the child
  };
  struct Open {
    bool final = false;
    std::vector<Edge> edges;
  };
  struct Generation {
    std::vector<uint64_t> table;  // (hash >> 48) << 48 | (arena offset + 1); 0 = empty
    std::vector<uint8_t> arena;   // per node: u64 hash, u32 key length, key, u64 addr, u64 count
    uint64_t entries = 0;
    void reset(size_t slots, uint64_t arena_capacity);
  };

  void freeze_to(size_t depth);
  Edge freeze(const Open& node);
  uint64_t write_record(const Open& node, uint64_t count);
  // Arena offset of the key in g, or -1.
  int64_t lookup(const Generation& g, uint64_t hash) const;
  void insert(Generation& g, uint64_t hash, uint64_t addr, uint64_t count);
  static void put_slot(Generation& g, uint64_t hash, uint64_t arena_offset);

  std::vector<uint32_t> code_of_;
  unsigned token_bytes_;
  uint64_t gen_budget_;
  Fd stream_fd_;
  mutable FdWriter stream_;
  uint64_t length_ = 0;  // bytes written to the stream (records, reversed)
  std::vector<uint8_t> rec_;
  std::vector<uint8_t> key_;
  Generation young_, old_;
  uint64_t generations_ = 1;

  std::vector<Open> open_;  // open_[d]: the node at depth d of the last sequence; root at 0
  size_t depth_ = 0;
  std::vector<uint32_t> prev_;
  uint64_t num_facts_ = 0, num_records_ = 0, num_edges_ = 0, num_trie_nodes_ = 1, root_count_ = 0;
};

}  // namespace kcore
