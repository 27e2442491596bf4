// Run-time CPU dispatch of the hot kernels (numpy's and faiss's model: one binary for every x86-64
// CPU, the fastest code each CPU can run).
//
// The kernel files (KCORE_CPU_KERNEL_SOURCES in CMakeLists.txt) are compiled once per variant,
// each time with its own -march and with KCORE_ISA naming a namespace of its own:
//   baseline  kcore::cpu_baseline  -march=x86-64-v2  (SSE4.2, POPCNT)
//   avx2      kcore::cpu_avx2      -march=x86-64-v3  (AVX2, FMA, F16C, BMI2)
//   avx512    kcore::cpu_avx512    -march=x86-64-v4  (AVX-512 F/BW/CD/DQ/VL; BF16 chosen at run time)
//   native    kcore::cpu_native    -march=native     (only with KCORE_NATIVE=ON)
// (one "generic" variant, default flags, off x86-64). Each variant's objects are linked into one
// relocatable object whose symbols, but for its namespace, are made local (cmake/cpu_variants.cmake):
// inline functions and templates compiled with AVX-512 can then never stand in for the baseline's
// copies at link time. The public functions below (kcore::apply_token_bitmask_cpu, ...) forward
// to the variant chosen once, at the first call: the best one this CPU runs, or $KCORE_FORCE_ISA.
// Everything else (trie, builder, matcher, bindings) is compiled once, for plain x86-64: a CPU
// below the baseline gets a clear ImportError from the check here, not an illegal instruction.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/bitmask.h"
#include "core/cpu_features.h"
#include "core/knn.h"
#include "core/memory_attention.h"

namespace kcore {

// The kernels compiled per variant: each is declared in its own header in namespace kcore and
// defined, with the same signature, in namespace kcore::KCORE_ISA of its kernel file.
#define KCORE_CPU_KERNELS(X) \
  X(apply_token_bitmask_cpu) X(knn_search_cpu) X(knn_interpolate_cpu) X(memory_attention_forward) X(merge_attention_states_f32)

struct CpuKernels {
  const char* isa;    // "baseline", "avx2", "avx512", "native" or "generic"
  const char* flags;  // the compiler flags of the variant
  uint64_t required;  // CPU features those flags let the compiler use (cpu::bit)
#define KCORE_CPU_KERNEL_POINTER(name) decltype(&::kcore::name) name;
  KCORE_CPU_KERNELS(KCORE_CPU_KERNEL_POINTER)
#undef KCORE_CPU_KERNEL_POINTER
};

// The variants of this build, slowest first.
const std::vector<const CpuKernels*>& cpu_variants();

// The variant `forced` names ("" = none: the last variant of cpu_variants() that a CPU with
// `cpu_features` runs). Throws std::invalid_argument for a name that is not a variant of this
// build, for a variant that CPU cannot run (it would stop with an illegal instruction), and when it
// runs none of them; the message names the missing features and the variants it can run.
const CpuKernels& choose_cpu_variant(const std::string& forced, uint64_t cpu_features);

// The variant in use. The first call chooses it from $KCORE_FORCE_ISA and cpu_info() (throws as
// choose_cpu_variant does); later calls return the same, unless set_cpu_isa changed it.
const CpuKernels& cpu_kernels();
// How the variant in use was chosen: "cpuid", "KCORE_FORCE_ISA" or "set_cpu_isa".
const char* cpu_variant_source();
// Switches every later kernel call to the variant `isa` (benchmarks and tests compare variants in
// one process); throws as choose_cpu_variant. Calls already running finish on the old variant.
void set_cpu_isa(const std::string& isa);

}  // namespace kcore

// In the kernel files: the variant's own declarations, which the definitions must match.
#ifdef KCORE_ISA
namespace kcore::KCORE_ISA {
#define KCORE_DECLARE_CPU_KERNEL(name) decltype(::kcore::name) name;
KCORE_CPU_KERNELS(KCORE_DECLARE_CPU_KERNEL)
#undef KCORE_DECLARE_CPU_KERNEL
extern const CpuKernels kernels;
}  // namespace kcore::KCORE_ISA
#endif
