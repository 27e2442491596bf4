#include "core/cpu_features.h"

#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#define KCORE_X86 1
#endif

namespace kcore {
namespace {

constexpr const char* kNames[] = {
#define KCORE_CPU_FEATURE_NAME(id, name) name,
    KCORE_CPU_FEATURES(KCORE_CPU_FEATURE_NAME)
#undef KCORE_CPU_FEATURE_NAME
};
static_assert(sizeof(kNames) / sizeof(kNames[0]) == cpu::kNumFeatures, "one name per feature");

#ifdef KCORE_X86
// XCR0: which register states the OS saves on a context switch. No inline _xgetbv(): that needs
// -mxsave, which the baseline does not assume.
uint64_t xcr0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t{hi} << 32) | lo;
}

CpuInfo detect() {
  using namespace cpu;
  CpuInfo info;
  unsigned a, b, c, d;
  const unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf == 0) return info;
  __cpuid(0, a, b, c, d);
  char vendor[13];
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &d, 4);
  std::memcpy(vendor + 8, &c, 4);
  vendor[12] = '\0';
  info.vendor = vendor;

  uint64_t f = 0;
  auto set = [&f](bool on, Feature x) { f |= on ? bit(x) : 0; };
  __cpuid(1, a, b, c, d);
  set(c & (1u << 0), kSse3);
  set(c & (1u << 9), kSsse3);
  set(c & (1u << 12), kFma);
  set(c & (1u << 13), kCx16);
  set(c & (1u << 19), kSse41);
  set(c & (1u << 20), kSse42);
  set(c & (1u << 22), kMovbe);
  set(c & (1u << 23), kPopcnt);
  set(c & (1u << 28), kAvx);
  set(c & (1u << 29), kF16c);
  const bool osxsave = c & (1u << 27);
  if (max_leaf >= 7) {
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned max_sub = a;
    set(b & (1u << 3), kBmi);
    set(b & (1u << 5), kAvx2);
    set(b & (1u << 8), kBmi2);
    set(b & (1u << 16), kAvx512f);
    set(b & (1u << 17), kAvx512dq);
    set(b & (1u << 19), kAdx);
    set(b & (1u << 21), kAvx512ifma);
    set(b & (1u << 28), kAvx512cd);
    set(b & (1u << 29), kSha);
    set(b & (1u << 30), kAvx512bw);
    set(b & (1u << 31), kAvx512vl);
    set(c & (1u << 1), kAvx512vbmi);
    set(c & (1u << 6), kAvx512vbmi2);
    set(c & (1u << 8), kGfni);
    set(c & (1u << 9), kVaes);
    set(c & (1u << 10), kVpclmulqdq);
    set(c & (1u << 11), kAvx512vnni);
    set(c & (1u << 12), kAvx512bitalg);
    set(c & (1u << 14), kAvx512vpopcntdq);
    if (max_sub >= 1) {
      __cpuid_count(7, 1, a, b, c, d);
      set(a & (1u << 4), kAvxvnni);
      set(a & (1u << 5), kAvx512bf16);
    }
  }
  const unsigned max_ext = __get_cpuid_max(0x80000000u, nullptr);
  if (max_ext >= 0x80000001u) {
    __cpuid(0x80000001u, a, b, c, d);
    set(c & (1u << 5), kLzcnt);
  }
  if (max_ext >= 0x80000004u) {
    char brand[49];
    for (unsigned i = 0; i < 3; ++i) {
      __cpuid(0x80000002u + i, a, b, c, d);
      std::memcpy(brand + 16 * i, &a, 4);
      std::memcpy(brand + 16 * i + 4, &b, 4);
      std::memcpy(brand + 16 * i + 8, &c, 4);
      std::memcpy(brand + 16 * i + 12, &d, 4);
    }
    brand[48] = '\0';
    std::string s = brand;
    const size_t first = s.find_first_not_of(' '), last = s.find_last_not_of(' ');
    info.brand = first == std::string::npos ? "" : s.substr(first, last - first + 1);
  }
  // The CPU may have AVX / AVX-512 while the OS (or hypervisor) does not save their registers:
  // then they are unusable. XCR0 bits 1-2: SSE and AVX state; 5-7: opmask and ZMM state.
  const uint64_t xcr = osxsave ? xcr0() : 0;
  if ((xcr & 0x6) != 0x6) {
    f &= ~(bit(kAvx) | bit(kAvx2) | bit(kFma) | bit(kF16c) | bit(kAvxvnni) | bit(kVaes) | bit(kVpclmulqdq));
  }
  if ((xcr & 0xe6) != 0xe6) {
    f &= ~(bit(kAvx512f) | bit(kAvx512bw) | bit(kAvx512cd) | bit(kAvx512dq) | bit(kAvx512vl) | bit(kAvx512bf16) |
           bit(kAvx512vnni) | bit(kAvx512vbmi) | bit(kAvx512vbmi2) | bit(kAvx512ifma) | bit(kAvx512vpopcntdq) |
           bit(kAvx512bitalg));
  }
  info.features = f;
  return info;
}
#else
CpuInfo detect() { return CpuInfo{}; }
#endif

}  // namespace

const CpuInfo& cpu_info() {
  static const CpuInfo info = detect();
  return info;
}

std::vector<std::string> cpu_feature_names(uint64_t bits) {
  std::vector<std::string> out;
  for (int i = 0; i < cpu::kNumFeatures; ++i)
    if (bits & (uint64_t{1} << i)) out.emplace_back(kNames[i]);
  return out;
}

uint64_t cpu_feature_bits(const std::vector<std::string>& names) {
  uint64_t bits = 0;
  for (const std::string& n : names) {
    int i = 0;
    while (i < cpu::kNumFeatures && n != kNames[i]) ++i;
    if (i == cpu::kNumFeatures) throw std::invalid_argument("unknown CPU feature name '" + n + "'");
    bits |= uint64_t{1} << i;
  }
  return bits;
}

}  // namespace kcore
