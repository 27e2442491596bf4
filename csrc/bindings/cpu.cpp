// Which CPU kernel variant runs (csrc/core/cpu_dispatch.h) and how this extension was built:
// kcore._C.cpu_features(), kcore._C.build_info() (both shown by kcore.show_config()) and
// kcore._C.set_cpu_isa() for benchmarks and tests that compare the variants in one process.
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "bindings/registry.h"
#include "core/cpu_dispatch.h"
#include "kcore_build_config.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

std::vector<std::string> variant_names(uint64_t cpu_features, bool only_supported) {
  std::vector<std::string> names;
  for (const CpuKernels* v : cpu_variants())
    if (!only_supported || (v->required & ~cpu_features) == 0) names.emplace_back(v->isa);
  return names;
}

py::dict cpu_features() {
  const CpuInfo& cpu = cpu_info();
  const CpuKernels& active = cpu_kernels();
  py::dict flags;
  for (const CpuKernels* v : cpu_variants()) flags[py::str(v->isa)] = v->flags;
  std::vector<std::string> extensions;
  // knn_search's bf16 dot products: compiled into the AVX-512 variants, used where cpuid has them.
  if ((active.required & cpu::bit(cpu::kAvx512f)) && (cpu.features & cpu::bit(cpu::kAvx512bf16)))
    extensions.emplace_back("avx512bf16");
  py::dict d;
  d["isa"] = active.isa;
  d["chosen_by"] = cpu_variant_source();
  d["variants"] = variant_names(cpu.features, false);
  d["supported"] = variant_names(cpu.features, true);
  d["variant_flags"] = flags;
  d["runtime_extensions"] = extensions;
  d["cpu_vendor"] = cpu.vendor;
  d["cpu_brand"] = cpu.brand;
  d["cpu_features"] = cpu_feature_names(cpu.features);
  return d;
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = KCORE_BUILD_COMPILER;
  d["build_type"] = KCORE_BUILD_TYPE;
  d["core_flags"] = KCORE_BUILD_CORE_FLAGS;
  d["cuda_architectures"] = KCORE_BUILD_CUDA_ARCHITECTURES;
  return d;
}

}  // namespace

void register_cpu(py::module_& m) {
  // Choose the variant now, so that a bad KCORE_FORCE_ISA fails the import with its message
  // instead of the first kernel call.
  try {
    cpu_kernels();
  } catch (const std::invalid_argument& e) {
    throw py::import_error(std::string("kcore._C: ") + e.what());
  }
  m.def("cpu_features", &cpu_features,
        "The CPU kernel variant in use and why: dict with isa ('baseline' | 'avx2' | 'avx512' | 'native' | "
        "'generic'), chosen_by ('cpuid' | 'KCORE_FORCE_ISA' | 'set_cpu_isa'), variants (compiled, slowest "
        "first), supported (those this CPU runs), variant_flags (compiler flags of each), runtime_extensions "
        "(extensions the variant in use picks at run time, e.g. 'avx512bf16'), cpu_vendor, cpu_brand, "
        "cpu_features (as GCC's -m options name them).");
  m.def("build_info", &build_info, "How this extension was built: compiler, build_type, core_flags (of the code outside the kernel variants), cuda_architectures.");
  m.def(
      "set_cpu_isa", [](const std::string& isa) { set_cpu_isa(isa); }, py::arg("isa"),
      "Run every later CPU kernel call on variant `isa` (one of cpu_features()['supported']), for benchmarks and "
      "tests that compare the variants in one process; KCORE_FORCE_ISA does the same at import. Raises ValueError "
      "for a variant this build lacks or this CPU cannot run.");
  m.def(
      "_choose_cpu_isa",
      [](const std::string& forced, const std::vector<std::string>& cpu_features) {
        return std::string(choose_cpu_variant(forced, cpu_feature_bits(cpu_features)).isa);
      },
      py::arg("forced"), py::arg("cpu_features"),
      "The variant chosen for a CPU with `cpu_features` (names as in cpu_features()) under KCORE_FORCE_ISA=`forced` "
      "('' = unset); raises ValueError as the import would. For tests of the selection rule.");
}

}  // namespace kcore::bindings
