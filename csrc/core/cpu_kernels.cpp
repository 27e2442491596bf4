// Compiled once per kernel variant (see cpu_dispatch.h): the variant's table of entry points and
// the CPU features its compiler flags assume, read from the compiler's own predefined macros, so
// a table can never claim less than its code uses.
#include "core/cpu_dispatch.h"

#ifndef KCORE_ISA
#error "compiled once per kernel variant, with -DKCORE_ISA=<namespace> (see CMakeLists.txt)"
#endif

namespace kcore::KCORE_ISA {
namespace {

constexpr uint64_t required_features() {
  using namespace cpu;
  uint64_t f = 0;
#ifdef __SSE3__
  f |= bit(kSse3);
#endif
#ifdef __SSSE3__
  f |= bit(kSsse3);
#endif
#ifdef __SSE4_1__
  f |= bit(kSse41);
#endif
#ifdef __SSE4_2__
  f |= bit(kSse42);
#endif
#ifdef __POPCNT__
  f |= bit(kPopcnt);
#endif
#ifdef __GCC_HAVE_SYNC_COMPARE_AND_SWAP_16
  f |= bit(kCx16);
#endif
#ifdef __AVX__
  f |= bit(kAvx);
#endif
#ifdef __AVX2__
  f |= bit(kAvx2);
#endif
#ifdef __FMA__
  f |= bit(kFma);
#endif
#ifdef __F16C__
  f |= bit(kF16c);
#endif
#ifdef __BMI__
  f |= bit(kBmi);
#endif
#ifdef __BMI2__
  f |= bit(kBmi2);
#endif
#ifdef __LZCNT__
  f |= bit(kLzcnt);
#endif
#ifdef __MOVBE__
  f |= bit(kMovbe);
#endif
#ifdef __AVX512F__
  f |= bit(kAvx512f);
#endif
#ifdef __AVX512BW__
  f |= bit(kAvx512bw);
#endif
#ifdef __AVX512CD__
  f |= bit(kAvx512cd);
#endif
#ifdef __AVX512DQ__
  f |= bit(kAvx512dq);
#endif
#ifdef __AVX512VL__
  f |= bit(kAvx512vl);
#endif
#ifdef __AVX512BF16__
  f |= bit(kAvx512bf16);
#endif
#ifdef __AVX512VNNI__
  f |= bit(kAvx512vnni);
#endif
#ifdef __AVX512VBMI__
  f |= bit(kAvx512vbmi);
#endif
#ifdef __AVX512VBMI2__
  f |= bit(kAvx512vbmi2);
#endif
#ifdef __AVX512IFMA__
  f |= bit(kAvx512ifma);
#endif
#ifdef __AVX512VPOPCNTDQ__
  f |= bit(kAvx512vpopcntdq);
#endif
#ifdef __AVX512BITALG__
  f |= bit(kAvx512bitalg);
#endif
#ifdef __AVXVNNI__
  f |= bit(kAvxvnni);
#endif
#ifdef __GFNI__
  f |= bit(kGfni);
#endif
#ifdef __VAES__
  f |= bit(kVaes);
#endif
#ifdef __VPCLMULQDQ__
  f |= bit(kVpclmulqdq);
#endif
#ifdef __SHA__
  f |= bit(kSha);
#endif
#ifdef __ADX__
  f |= bit(kAdx);
#endif
  return f;
}

}  // namespace

extern const CpuKernels kernels;
const CpuKernels kernels = {
    KCORE_ISA_NAME, KCORE_ISA_FLAGS, required_features(),
#define KCORE_CPU_KERNEL_ENTRY(name) &KCORE_ISA::name,
    KCORE_CPU_KERNELS(KCORE_CPU_KERNEL_ENTRY)
#undef KCORE_CPU_KERNEL_ENTRY
};

}  // namespace kcore::KCORE_ISA
