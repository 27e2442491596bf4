// The native boundary contract of kcore._C: one tensor descriptor and named argument checks.
//
// A tensor crosses from Python as the tuple that kcore._native.tensor_arg(t) builds:
//   (data_ptr, ElemType code, shape, strides in elements, device: -1 host, >= 0 CUDA index)
// which pybind11 turns into a TensorArg (the fields of xgrammar's / DLPack's DLTensor). Binding
// functions take TensorArgs and check them with the CHECK_* macros below, which name the argument
// ("logits must have 2 dims, got shape (3, 4, 5)"), so a wrong call raises
// kcore.InvalidInputError instead of reading out of bounds. Only metadata is checked here, never
// tensor values. The Python ops validate first (with friendlier wording); these checks guard the
// raw pointers whoever calls.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <initializer_list>
#include <sstream>
#include <string>

#include "core/dtype.h"
#include "core/errors.h"

namespace kcore::bindings {

constexpr int kMaxDims = 6;

struct TensorArg {
  void* data = nullptr;
  ElemType dtype = ElemType::kFloat32;
  int ndim = 0;
  int64_t shape[kMaxDims] = {};
  int64_t strides[kMaxDims] = {};  // elements
  int device = -1;                 // -1: host memory; >= 0: CUDA device index

  // Dimension d, counted from the end when negative (size(-1) is the last dim).
  int64_t size(int d) const { return shape[d < 0 ? d + ndim : d]; }
  int64_t stride(int d) const { return strides[d < 0 ? d + ndim : d]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < ndim; ++i) n *= shape[i];
    return n;
  }
  template <typename T>
  T* ptr() const {
    return static_cast<T*>(data);
  }
};

// Builds a message from any streamable parts: str("k must be >= 1, got ", k).
template <typename... Parts>
std::string str(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

inline std::string shape_str(const TensorArg& t) {
  std::string s = "(";
  for (int i = 0; i < t.ndim; ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  return s + (t.ndim == 1 ? ",)" : ")");
}

inline void check_dim(const TensorArg& t, int ndim, const char* name) {
  if (t.ndim != ndim) throw InvalidInput(str(name, " must have ", ndim, " dims, got shape ", shape_str(t)));
}

inline void check_dim(const pybind11::array& a, int ndim, const char* name) {
  if (a.ndim() != ndim) throw InvalidInput(str(name, " must have ", ndim, " dims, got ", a.ndim()));
}

inline void check_dtype(const TensorArg& t, std::initializer_list<ElemType> allowed, const char* name) {
  std::string names;
  for (ElemType e : allowed) {
    if (t.dtype == e) return;
    names += (names.empty() ? "" : ", ") + std::string(elem_type_name(e));
  }
  throw InvalidInput(str(name, " must have dtype in (", names, "), got ", elem_type_name(t.dtype)));
}

inline void check_shape(const TensorArg& t, std::initializer_list<int64_t> shape, const char* name) {
  bool ok = t.ndim == static_cast<int>(shape.size());
  int i = 0;
  for (int64_t s : shape) ok = ok && t.shape[i++] == s;
  if (!ok) {
    std::string want = "(";
    i = 0;
    for (int64_t s : shape) want += (i++ ? ", " : "") + std::to_string(s);
    throw InvalidInput(str(name, " must have shape ", want, shape.size() == 1 ? ",)" : ")", ", got ", shape_str(t)));
  }
}

// The last dim is read as a contiguous row (stride 1; a dim of size <= 1 has no stride to speak of).
inline void check_contiguous_last(const TensorArg& t, const char* name) {
  if (t.ndim > 0 && t.size(-1) > 1 && t.stride(-1) != 1)
    throw InvalidInput(str(name, " must be contiguous in its last dim (stride 1), got stride ", t.stride(-1)));
}

// Row-major contiguous (every stride of a dim of size > 1 as in a fresh tensor of that shape).
inline void check_contiguous(const TensorArg& t, const char* name) {
  int64_t expected = 1;
  for (int d = t.ndim - 1; d >= 0; --d) {
    if (t.shape[d] > 1 && t.strides[d] != expected) throw InvalidInput(str(name, " must be contiguous, got shape ", shape_str(t)));
    expected *= t.shape[d];
  }
}

inline void check_device(const TensorArg& t, int device, const char* name) {
  if (t.device != device)
    throw InvalidInput(str(name, " must be in ", device < 0 ? std::string("host memory") : "CUDA device " + std::to_string(device),
                           ", got ", t.device < 0 ? std::string("host memory") : "CUDA device " + std::to_string(t.device)));
}

// Non-null data unless the tensor is empty (an empty tensor may have a null data pointer).
inline void check_data(const TensorArg& t, const char* name) {
  if (t.data == nullptr && t.numel() > 0) throw InvalidInput(str(name, " has a null data pointer"));
}

}  // namespace kcore::bindings

// Named checks: the macro passes the argument's own name to the message.
#define CHECK_DIM(ndim, x) ::kcore::bindings::check_dim((x), (ndim), #x)
#define CHECK_DTYPE(x, ...) ::kcore::bindings::check_dtype((x), {__VA_ARGS__}, #x)
#define CHECK_SHAPE(x, ...) ::kcore::bindings::check_shape((x), {__VA_ARGS__}, #x)
#define CHECK_CONTIGUOUS_LAST(x) ::kcore::bindings::check_contiguous_last((x), #x)
#define CHECK_CONTIGUOUS(x) ::kcore::bindings::check_contiguous((x), #x)
#define CHECK_HOST(x) ::kcore::bindings::check_device((x), -1, #x)
#define CHECK_SAME_DEVICE(x, y) ::kcore::bindings::check_device((x), (y).device, #x)
#define CHECK_DATA(x) ::kcore::bindings::check_data((x), #x)
// A condition on plain arguments: CHECK_ARG(k >= 1, "k must be >= 1, got ", k).
#define CHECK_ARG(cond, ...)                                                         \
  do {                                                                               \
    if (!(cond)) throw ::kcore::InvalidInput(::kcore::bindings::str(__VA_ARGS__)); \
  } while (0)

// The tuple -> TensorArg conversion. Only kcore._native.tensor_arg builds these tuples; anything
// else is refused with a kcore.InvalidInputError naming what was wrong with the tuple.
namespace pybind11::detail {
template <>
struct type_caster<kcore::bindings::TensorArg> {
  PYBIND11_TYPE_CASTER(kcore::bindings::TensorArg, const_name("TensorArg"));

  bool load(handle src, bool) {
    using kcore::InvalidInput;
    using kcore::bindings::kMaxDims;
    PyObject* o = src.ptr();
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 5) return false;
    value.data = PyLong_AsVoidPtr(PyTuple_GET_ITEM(o, 0));
    const long code = PyLong_AsLong(PyTuple_GET_ITEM(o, 1));
    if (PyErr_Occurred()) throw error_already_set();
    if (code < 0 || code >= kcore::kNumElemTypes) throw InvalidInput("tensor descriptor: unknown element type code " + std::to_string(code));
    value.dtype = static_cast<kcore::ElemType>(code);
    PyObject* shape = PyTuple_GET_ITEM(o, 2);
    PyObject* strides = PyTuple_GET_ITEM(o, 3);
    if (!PyTuple_Check(shape) || !PyTuple_Check(strides) || PyTuple_GET_SIZE(shape) != PyTuple_GET_SIZE(strides))
      throw InvalidInput("tensor descriptor: shape and strides must be tuples of the same length");
    const Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    if (nd > kMaxDims) throw InvalidInput("tensor descriptor: at most " + std::to_string(kMaxDims) + " dims, got " + std::to_string(nd));
    value.ndim = static_cast<int>(nd);
    for (Py_ssize_t i = 0; i < nd; ++i) {
      value.shape[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(shape, i));
      value.strides[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(strides, i));
    }
    value.device = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(o, 4)));
    if (PyErr_Occurred()) throw error_already_set();
    for (int i = 0; i < value.ndim; ++i)
      if (value.shape[i] < 0) throw InvalidInput("tensor descriptor: negative size");
    return true;
  }
  // Back to the same tuple (used only by tests of the boundary).
  static handle cast(const kcore::bindings::TensorArg& t, return_value_policy, handle) {
    tuple shape(t.ndim), strides(t.ndim);
    for (int i = 0; i < t.ndim; ++i) {
      shape[i] = int_(t.shape[i]);
      strides[i] = int_(t.strides[i]);
    }
    return make_tuple(reinterpret_cast<uintptr_t>(t.data), static_cast<int>(t.dtype), shape, strides, t.device).release();
  }
};
}  // namespace pybind11::detail
