// Registration functions, one per op family; each is defined in its own file in csrc/bindings/.
#pragma once
#include <pybind11/pybind11.h>

namespace kcore::bindings {
void register_cpu(pybind11::module_& m);
void register_trie(pybind11::module_& m);
void register_bitmask(pybind11::module_& m);
void register_fact_matcher(pybind11::module_& m);
void register_knn(pybind11::module_& m);
void register_memory_attention(pybind11::module_& m);
}  // namespace kcore::bindings
