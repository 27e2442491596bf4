#include "bindings/registry.h"

namespace kcore::bindings {
void register_trie(pybind11::module_& m) { (void)m; }
}  // namespace kcore::bindings
