// 64-bit checksum of a byte range, used to detect corrupted kcore files.
#pragma once
#include <cstddef>
#include <cstdint>

namespace kcore {

// A fast non-cryptographic 64-bit checksum (the round and avalanche steps of XXH64 by Yann
// Collet, over 4 lanes of 8-byte words; not bit-compatible with XXH64). Any single-bit flip
// changes the result. Speed is memory bound (several GB/s), so verifying a whole file is cheap
// next to reading it from disk.
uint64_t checksum64(const void* data, size_t size, uint64_t seed = 0);

// The same checksum over bytes given in pieces: update() any number of times, then digest()
// equals checksum64 of the concatenation. Used to checksum a file while it is written.
class Checksum64Stream {
 public:
  explicit Checksum64Stream(uint64_t seed = 0);
  void update(const void* data, size_t size);
  uint64_t digest() const;

 private:
  uint64_t seed_, v_[4], total_ = 0;
  unsigned char tail_[32];
  size_t tail_len_ = 0;
};

}  // namespace kcore
