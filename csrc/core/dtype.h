// Element types of the tensors that cross into the C++ core: the one enum of kcore, its names,
// sizes, the -inf bit patterns of the float types and the scalar half-precision converters.
// kcore._C exports the table (ElemType -> name) as kcore._C.elem_types, from which
// kcore/_native.py builds its torch.dtype -> code map: a new type is added here and nowhere else.
// Plain C++ (no intrinsics outside #if guards) so that nvcc-compiled sources include it too.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__F16C__) && !defined(__CUDACC__)
#include <immintrin.h>
#endif

namespace kcore {

// Codes are part of the binding contract (Python passes them as ints): append, never renumber.
enum class ElemType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
  kInt8 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kUInt8 = 6,
  kBool = 7,
};

constexpr int kNumElemTypes = 8;

// Names as torch spells its dtypes (torch.float32, ...): the Python side maps them by name.
inline const char* elem_type_name(ElemType t) {
  switch (t) {
    case ElemType::kFloat32: return "float32";
    case ElemType::kFloat16: return "float16";
    case ElemType::kBFloat16: return "bfloat16";
    case ElemType::kInt8: return "int8";
    case ElemType::kInt32: return "int32";
    case ElemType::kInt64: return "int64";
    case ElemType::kUInt8: return "uint8";
    case ElemType::kBool: return "bool";
  }
  return "unknown";
}

inline int64_t elem_size(ElemType t) {
  switch (t) {
    case ElemType::kFloat32:
    case ElemType::kInt32: return 4;
    case ElemType::kFloat16:
    case ElemType::kBFloat16: return 2;
    case ElemType::kInt64: return 8;
    case ElemType::kInt8:
    case ElemType::kUInt8:
    case ElemType::kBool: return 1;
  }
  return 0;
}

inline bool is_float(ElemType t) {
  return t == ElemType::kFloat32 || t == ElemType::kFloat16 || t == ElemType::kBFloat16;
}

// -inf as raw bits: masked logits are written as bit patterns, so fp16/bf16 need no conversion.
constexpr uint32_t kNegInfBitsF32 = 0xFF800000u;
constexpr uint16_t kNegInfBitsF16 = 0xFC00u;
constexpr uint16_t kNegInfBitsBF16 = 0xFF80u;

// IEEE binary16 -> binary32 without hardware support (exact; subnormals normalised).
inline float half_to_float_soft(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  } else if (man == 0) {
    bits = sign;
  } else {  // subnormal half: normalise
    exp = 113;
    while (!(man & 0x400u)) {
      man <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float f16_to_float(uint16_t h) {
#if defined(__F16C__) && !defined(__CUDACC__)
  return _cvtsh_ss(h);
#else
  return half_to_float_soft(h);
#endif
}

// bf16 is the top half of an fp32: widening is exact.
inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// fp32 -> bf16, round to nearest even (finite inputs).
inline uint16_t float_to_bf16_rne(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof(b));
  b += 0x7fffu + ((b >> 16) & 1u);
  return static_cast<uint16_t>(b >> 16);
}

}  // namespace kcore
