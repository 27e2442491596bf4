#include "bindings/registry.h"

namespace kcore::bindings {
void register_bitmask(pybind11::module_& m) { (void)m; }
}  // namespace kcore::bindings
