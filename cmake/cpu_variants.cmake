# Kernel variants per instruction set (see csrc/core/cpu_dispatch.h for the run-time side).
#
# kcore_add_cpu_variant(ISA FLAGS) compiles KCORE_CPU_KERNEL_SOURCES with FLAGS into namespace
# kcore::cpu_ISA, then links those objects into one relocatable object (ld -r, section groups
# dissolved) and makes every symbol local except the ones of that namespace (objcopy). Why:
# inline functions and template instantiations (std::vector<float> growth, the simd helpers) are
# emitted in every object that uses them, and the final link keeps one copy of each name. Without
# this step the copy kept could be the AVX-512 one, called from baseline code on a CPU without
# AVX-512 (illegal instruction), or one passing 64-byte vectors in zmm registers to a caller that
# passes them in memory. A check then fails the build if any other global symbol survived.
#
# Appends the object to KCORE_CPU_VARIANT_OBJECTS and the namespace to KCORE_CPU_VARIANT_NAMESPACES.
include(CheckCXXCompilerFlag)
check_cxx_compiler_flag(-fno-gnu-unique KCORE_HAS_NO_GNU_UNIQUE)

function(kcore_add_cpu_variant isa flags)
  set(ns "cpu_${isa}")
  set(lib "kcore_cpu_${isa}")
  separate_arguments(flag_list UNIX_COMMAND "${flags}")
  add_library(${lib} OBJECT ${KCORE_CPU_KERNEL_SOURCES})
  target_include_directories(${lib} PRIVATE ${PROJECT_SOURCE_DIR}/csrc ${KCORE_GENERATED_DIR})
  # -Wno-psabi: GCC notes that 64-byte vector arguments pass differently with and without
  # AVX-512; the helpers taking them are inline and, after the localisation below, never called
  # across variants.
  target_compile_options(${lib} PRIVATE -O3 -Wall -Wextra -Wno-psabi -fvisibility=hidden ${flag_list})
  if(KCORE_HAS_NO_GNU_UNIQUE)
    # GCC gives static locals of inline functions (std::to_chars' digit table) STB_GNU_UNIQUE
    # binding, which objcopy cannot make local; plain weak symbols it can.
    target_compile_options(${lib} PRIVATE -fno-gnu-unique)
  endif()
  if(KCORE_WERROR)
    target_compile_options(${lib} PRIVATE -Werror)
  endif()
  target_compile_definitions(${lib} PRIVATE KCORE_ISA=${ns} KCORE_ISA_NAME="${isa}" KCORE_ISA_FLAGS="${flags}")

  set(obj "${CMAKE_CURRENT_BINARY_DIR}/${lib}.o")
  string(LENGTH "${ns}" ns_len)
  set(keep "_ZN5kcore${ns_len}${ns}")  # mangled prefix of every name in namespace kcore::cpu_ISA
  add_custom_command(
    OUTPUT "${obj}"
    COMMAND "${CMAKE_LINKER}" -r --force-group-allocation -o "${obj}.partial.o" "$<TARGET_OBJECTS:${lib}>"
    COMMAND "${CMAKE_OBJCOPY}" --wildcard "--keep-global-symbol=${keep}*" "${obj}.partial.o" "${obj}"
    COMMAND "${CMAKE_COMMAND}" "-DOBJECT=${obj}" "-DNM=${CMAKE_NM}" "-DKEEP=${keep}"
            -P "${PROJECT_SOURCE_DIR}/cmake/check_variant_symbols.cmake"
    DEPENDS "$<TARGET_OBJECTS:${lib}>" "${PROJECT_SOURCE_DIR}/cmake/check_variant_symbols.cmake"
    COMMAND_EXPAND_LISTS VERBATIM
    COMMENT "kcore: ${isa} kernel variant (${flags}), only kcore::${ns} left global")
  set_source_files_properties("${obj}" PROPERTIES EXTERNAL_OBJECT TRUE GENERATED TRUE)
  set(KCORE_CPU_VARIANT_OBJECTS ${KCORE_CPU_VARIANT_OBJECTS} "${obj}" PARENT_SCOPE)
  set(KCORE_CPU_VARIANT_NAMESPACES ${KCORE_CPU_VARIANT_NAMESPACES} "${ns}" PARENT_SCOPE)
endfunction()
