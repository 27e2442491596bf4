#include "core/checksum.h"

#include <algorithm>
#include <cstring>

namespace kcore {
namespace {

constexpr uint64_t P1 = 11400714785074694791ULL;
constexpr uint64_t P2 = 14029467366897019727ULL;
constexpr uint64_t P3 = 1609587929392839161ULL;
constexpr uint64_t P4 = 9650029242287828579ULL;
constexpr uint64_t P5 = 2870177450012600261ULL;

inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
inline uint64_t load64(const unsigned char* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint64_t round64(uint64_t acc, uint64_t input) {
  acc += input * P2;
  acc = rotl(acc, 31);
  return acc * P1;
}
inline uint64_t merge_round(uint64_t acc, uint64_t val) {
  acc ^= round64(0, val);
  return acc * P1 + P4;
}

// The lanes after whole 32-byte stripes of p (n stripes).
inline void stripes(uint64_t* v, const unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i, p += 32) {
    v[0] = round64(v[0], load64(p));
    v[1] = round64(v[1], load64(p + 8));
    v[2] = round64(v[2], load64(p + 16));
    v[3] = round64(v[3], load64(p + 24));
  }
}

inline void init_lanes(uint64_t* v, uint64_t seed) {
  v[0] = seed + P1 + P2;
  v[1] = seed + P2;
  v[2] = seed;
  v[3] = seed - P1;
}

// The final steps over the lanes (when size >= 32) and the last size % 32 bytes.
uint64_t finalize(const uint64_t* v, uint64_t seed, uint64_t size, const unsigned char* p, const unsigned char* end) {
  uint64_t h;
  if (size >= 32) {
    h = rotl(v[0], 1) + rotl(v[1], 7) + rotl(v[2], 12) + rotl(v[3], 18);
    for (int i = 0; i < 4; ++i) h = merge_round(h, v[i]);
  } else {
    h = seed + P5;
  }
  h += size;
  while (p + 8 <= end) {
    h ^= round64(0, load64(p));
    h = rotl(h, 27) * P1 + P4;
    p += 8;
  }
  while (p < end) {
    h ^= (*p) * P5;
    h = rotl(h, 11) * P1;
    ++p;
  }
  h ^= h >> 33;
  h *= P2;
  h ^= h >> 29;
  h *= P3;
  h ^= h >> 32;
  return h;
}

}  // namespace

uint64_t checksum64(const void* data, size_t size, uint64_t seed) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  uint64_t v[4];
  init_lanes(v, seed);
  const size_t n = size / 32;
  stripes(v, p, n);
  return finalize(v, seed, size, p + 32 * n, p + size);
}

Checksum64Stream::Checksum64Stream(uint64_t seed) : seed_(seed) { init_lanes(v_, seed); }

void Checksum64Stream::update(const void* data, size_t size) {
  const unsigned char* p = static_cast<const unsigned char*>(data);
  total_ += size;
  if (tail_len_ > 0) {
    const size_t take = std::min(size, 32 - tail_len_);
    std::memcpy(tail_ + tail_len_, p, take);
    tail_len_ += take;
    p += take;
    size -= take;
    if (tail_len_ < 32) return;
    stripes(v_, tail_, 1);
    tail_len_ = 0;
  }
  const size_t n = size / 32;
  stripes(v_, p, n);
  p += 32 * n;
  tail_len_ = size - 32 * n;
  std::memcpy(tail_, p, tail_len_);
}

uint64_t Checksum64Stream::digest() const { return finalize(v_, seed_, total_, tail_, tail_ + tail_len_); }

}  // namespace kcore
