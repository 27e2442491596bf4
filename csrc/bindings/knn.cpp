#include "bindings/registry.h"

namespace kcore::bindings {
void register_knn(pybind11::module_& m) { (void)m; }
}  // namespace kcore::bindings
