// The x86 instruction-set extensions of the CPU kcore runs on, read once from cpuid (and xgetbv:
// the OS must save the AVX / AVX-512 registers too). cpu_dispatch.cpp compares them with what each
// kernel variant was compiled for. Names are those of GCC's -m options (avx512bw, f16c, ...).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kcore {

// X(enumerator, name): one bit per feature, in the order of cpu_feature_names().
#define KCORE_CPU_FEATURES(X)                                                                      \
  X(kSse3, "sse3") X(kSsse3, "ssse3") X(kSse41, "sse4.1") X(kSse42, "sse4.2") X(kPopcnt, "popcnt") \
  X(kCx16, "cx16") X(kAvx, "avx") X(kAvx2, "avx2") X(kFma, "fma") X(kF16c, "f16c") \
  X(kBmi, "bmi") X(kBmi2, "bmi2") X(kLzcnt, "lzcnt") X(kMovbe, "movbe") X(kAvx512f, "avx512f")      \
  X(kAvx512bw, "avx512bw") X(kAvx512cd, "avx512cd") X(kAvx512dq, "avx512dq") X(kAvx512vl, "avx512vl") \
  X(kAvx512bf16, "avx512bf16") X(kAvx512vnni, "avx512vnni") X(kAvx512vbmi, "avx512vbmi")            \
  X(kAvx512vbmi2, "avx512vbmi2") X(kAvx512ifma, "avx512ifma") X(kAvx512vpopcntdq, "avx512vpopcntdq") \
  X(kAvx512bitalg, "avx512bitalg") X(kAvxvnni, "avxvnni") X(kGfni, "gfni") X(kVaes, "vaes")         \
  X(kVpclmulqdq, "vpclmulqdq") X(kSha, "sha") X(kAdx, "adx")

namespace cpu {
enum Feature : int {
#define KCORE_CPU_FEATURE_ENUM(id, name) id,
  KCORE_CPU_FEATURES(KCORE_CPU_FEATURE_ENUM)
#undef KCORE_CPU_FEATURE_ENUM
  kNumFeatures
};
constexpr uint64_t bit(Feature f) { return uint64_t{1} << f; }
}  // namespace cpu

struct CpuInfo {
  uint64_t features = 0;  // bits cpu::bit(f) of the features usable here
  std::string vendor;     // "GenuineIntel", "AuthenticAMD", ... ("" off x86)
  std::string brand;      // "AMD EPYC 9654 96-Core Processor", ... ("" off x86)
};

// Detected at the first call; never changes afterwards.
const CpuInfo& cpu_info();

// Feature names of the set bits, in enum order; and back (throws std::invalid_argument naming an
// unknown name).
std::vector<std::string> cpu_feature_names(uint64_t bits);
uint64_t cpu_feature_bits(const std::vector<std::string>& names);

}  // namespace kcore
