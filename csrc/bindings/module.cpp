// The one pybind11 module of kcore (kcore._C). Each op family registers its functions from its own
// file in this folder; argument checks live in those files (with the contract of checks.h), the
// work in csrc/core and csrc/cuda.
#include <pybind11/pybind11.h>

#include <system_error>

#include "bindings/checks.h"
#include "bindings/registry.h"
#include "core/dtype.h"
#include "core/errors.h"
#include "core/parallel.h"

namespace py = pybind11;

namespace {

// The one exception translator: C++ core exceptions become the Python classes of kcore.errors
// (imported lazily: the module object exists only once kcore itself is importable), file-system
// errors of the trie builder and loader become OSError.
void translate(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const kcore::InvalidInput& e) {
    py::object cls = py::module_::import("kcore.errors").attr("InvalidInputError");
    PyErr_SetString(cls.ptr(), e.what());
  } catch (const kcore::FileFormat& e) {
    py::object cls = py::module_::import("kcore.errors").attr("FileFormatError");
    PyErr_SetString(cls.ptr(), e.what());
  } catch (const std::system_error& e) {
    PyErr_SetString(PyExc_OSError, e.what());
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "kcore native core (C++ CPU kernels and, when compiled, CUDA kernels)";
#ifdef KCORE_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  py::register_exception_translator(&translate);
  // The element-type table (csrc/core/dtype.h): kcore/_native.py maps torch dtypes by these names.
  py::dict elem_types;
  for (int code = 0; code < kcore::kNumElemTypes; ++code)
    elem_types[kcore::elem_type_name(static_cast<kcore::ElemType>(code))] = code;
  m.attr("elem_types") = elem_types;
  m.def(
      "echo_tensor_arg", [](const kcore::bindings::TensorArg& t) { return t; }, py::arg("t"),
      "The descriptor as the bindings see it (tests of the boundary contract).");
  m.def("parallel_backend", &kcore::parallel_backend,
        "What the calling thread's CPU kernels would run on now: 'host-openmp' (the process's OpenMP "
        "team, e.g. PyTorch's) or 'kcore-pool'.");
  m.def("enter_host_openmp_scope", &kcore::enter_host_openmp_scope,
        "Until the matching exit, this thread's CPU kernels run on the host's OpenMP team when one is loaded "
        "(unless KCORE_HOST_OPENMP=0). Scopes nest.");
  m.def("exit_host_openmp_scope", &kcore::exit_host_openmp_scope, "Close one enter_host_openmp_scope().");
  m.def("num_threads", &kcore::num_threads, "Threads the CPU kernels may use ($KCORE_NUM_THREADS or the core count).");
  kcore::bindings::register_cpu(m);
  kcore::bindings::register_trie(m);
  kcore::bindings::register_bitmask(m);
  kcore::bindings::register_fact_matcher(m);
  kcore::bindings::register_knn(m);
  kcore::bindings::register_memory_attention(m);
}
