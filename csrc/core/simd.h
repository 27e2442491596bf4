// Float vectors of the CPU kernels (kNN search and interpolation, memory attention). GCC/Clang
// vector extensions: a 16-lane v16f is one zmm register with AVX-512 (-march=native), split by the
// compiler into ymm/xmm pairs on older CPUs; v8f is one ymm. The conversions of half-precision
// elements use F16C / AVX-512 instructions when the build has them; the scalar converters are in
// core/dtype.h.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/dtype.h"

#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__)
// 64-byte vectors only pass between inline functions of these kernels, never across an ABI
// boundary; without AVX-512 GCC would still warn that their calling convention differs.
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace kcore::simd {

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));

constexpr int kLanes = 16;

inline v16f splat(float x) { return v16f{} + x; }

inline v16f load(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, v16f v) { std::memcpy(p, &v, sizeof(v)); }

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof(v)); }

inline v8f splat8(float x) { return v8f{} + x; }

// Sum of the lanes in order (lane 0 first).
inline float hsum(v16f v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// Sum of the lanes as a tree (halves added pairwise): fewer dependent adds than hsum.
inline float hsum_pairwise(v16f v) {
  v8f lo, hi;
  std::memcpy(&lo, &v, sizeof(lo));
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
  const v8f s8 = lo + hi;
  v4f a, b;
  std::memcpy(&a, &s8, sizeof(a));
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof(a), sizeof(b));
  const v4f s4 = a + b;
  return (s4[0] + s4[1]) + (s4[2] + s4[3]);
}

inline float hmax(v16f v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

inline v16f vmax(v16f a, v16f b) { return a > b ? a : b; }

// Bit i set when lane i of the comparison result `m` (all ones / zero) is set.
inline uint32_t movemask(v16i m) {
#if defined(__AVX512DQ__)
  return _mm512_movepi32_mask(reinterpret_cast<__m512i&>(m));
#else
  uint32_t bits = 0;
  for (int i = 0; i < kLanes; ++i) bits |= static_cast<uint32_t>(m[i] != 0) << i;
  return bits;
#endif
}

// Horizontal sums of 16 vectors at once: result lane j = sum of the lanes of v[j]. A tree of
// 15 shuffle-add steps (instead of 16 separate reductions, which cost more than a short dot
// product). Each step folds the upper half of every lane block onto the lower half, interleaving
// two vectors; after four steps lane L holds the sum of v[bitreverse4(L)], undone at the end.
inline v16f hsum16(const v16f* v) {
  v16f a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  v16f d = __builtin_shufflevector(c[0], c[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
           __builtin_shufflevector(c[0], c[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
  return __builtin_shufflevector(d, d, 0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15);
}

// 16 consecutive fp16 values -> fp32 (exact).
inline v16f load_f16(const uint16_t* p) {
#if defined(__AVX512F__)
  // The masked form with a zero source: the plain intrinsic trips a GCC 12 -Wmaybe-uninitialized.
  __m512 r = _mm512_mask_cvtph_ps(_mm512_setzero_ps(), static_cast<__mmask16>(0xffff),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  v16f v;
  std::memcpy(&v, &r, sizeof(v));
  return v;
#elif defined(__F16C__)
  __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
  v16f v;
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
  return v;
#else
  v16f v;
  for (int i = 0; i < kLanes; ++i) v[i] = kcore::half_to_float_soft(p[i]);
  return v;
#endif
}

// 16 consecutive bf16 values -> fp32 (exact: bf16 is the top half of an fp32).
inline v16f load_bf16(const uint16_t* p) {
  v16h h;
  std::memcpy(&h, p, sizeof(h));
  v16u u = __builtin_convertvector(h, v16u) << 16;
  v16f v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// exp(x) for 16 lanes, Cephes-style: x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r,
// 2^n put into the exponent bits. Relative error about 2 ulp; exp(x) = 0 below -87.3 (so exp(-inf)
// is 0) and the input is clamped at 88.3 (no overflow to inf in the softmax sums).
inline v16f exp(v16f x) {
  const v16f hi = splat(88.3762626647949f), lo = splat(-87.3365447504f);
  const v16i underflow = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  v16f fx = x * 1.44269504088896341f;
  // round to nearest: floor(fx + 0.5)
  v16f fl = __builtin_convertvector(__builtin_convertvector(fx + 0.5f, v16i), v16f);
  fl = fl > fx + 0.5f ? fl - 1.0f : fl;
  x = x - fl * 0.693359375f;
  x = x - fl * -2.12194440e-4f;
  v16f y = splat(1.9875691500E-4f);
  y = y * x + 1.3981999507E-3f;
  y = y * x + 8.3334519073E-3f;
  y = y * x + 4.1665795894E-2f;
  y = y * x + 1.6666665459E-1f;
  y = y * x + 5.0000001201E-1f;
  y = y * x * x + x + 1.0f;
  v16i n = __builtin_convertvector(fl, v16i);
  v16i pow2 = (n + 127) << 23;
  v16f scale;
  std::memcpy(&scale, &pow2, sizeof(scale));
  y = y * scale;
  return underflow ? v16f{} : y;
}

// Natural log for 16 lanes, Cephes-style: x = m 2^e with m in [sqrt(1/2), sqrt(2)), a degree-8
// polynomial for log(m); about 1 ulp. Only used on finite x > 0 (probabilities, 1 + y).
inline v16f log(v16f x) {
  v16i bits;
  std::memcpy(&bits, &x, sizeof(bits));
  v16i e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  v16f m;
  std::memcpy(&m, &bits, sizeof(m));
  const v16i small = m < 0.707106781186547524f;
  e = small ? e - 1 : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  v16f y = splat(7.0376836292E-2f);
  y = y * m - 1.1514610310E-1f;
  y = y * m + 1.1676998740E-1f;
  y = y * m - 1.2420140846E-1f;
  y = y * m + 1.4249322787E-1f;
  y = y * m - 1.6668057665E-1f;
  y = y * m + 2.0000714765E-1f;
  y = y * m - 2.4999993993E-1f;
  y = y * m + 3.3333331174E-1f;
  const v16f z = m * m;
  const v16f fe = __builtin_convertvector(e, v16f);
  y = y * m * z;
  y = y + fe * -2.12194440e-4f;
  y = y - 0.5f * z;
  return m + y + fe * 0.693359375f;
}

}  // namespace kcore::simd
