// Binding of the native fact matcher (kcore._C.FactMatcher, csrc/core/fact_matcher.h). The public
// class with its documentation is kcore/matcher.py. Arrays arrive as numpy (int64 row / token ids,
// forcecast from any integer array or list; the bitmask an int32 C-contiguous writable 2-D array,
// never copied). A call holds the GIL unless its work is large: acquiring and releasing it costs
// more than a decode step of a small batch.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <cstdint>
#include <memory>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

#include "bindings/checks.h"
#include "bindings/registry.h"
#include "core/bitmask.h"
#include "core/errors.h"
#include "core/fact_matcher.h"
#include "core/trie.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// Work (rows x bitmask words, or tokens) above which a call releases the GIL.
constexpr int64_t kReleaseGilWork = int64_t{1} << 23;

struct MaybeRelease {
  explicit MaybeRelease(int64_t work) {
    if (work >= kReleaseGilWork) release.emplace();
  }
  std::optional<py::gil_scoped_release> release;
};

const int64_t* ids_of(const I64Array& a, const char* name) {
  if (a.ndim() != 1) throw InvalidInput(str(name, " must be 1-D, got ", a.ndim(), " dims"));
  return a.data();
}

// rows=None: every row of the matcher.
struct Rows {
  Rows(const FactMatcher& m, const std::optional<I64Array>& rows, const char* name) {
    if (rows) {
      ptr = ids_of(*rows, name);
      n = rows->size();
    } else {
      all.resize(static_cast<size_t>(m.batch_size()));
      std::iota(all.begin(), all.end(), int64_t{0});
      ptr = all.data();
      n = m.batch_size();
    }
  }
  const int64_t* ptr = nullptr;
  int64_t n = 0;
  std::vector<int64_t> all;
};

int32_t* bitmask_of(const py::array& bitmask, int64_t rows, int64_t* words) {
  if (!py::isinstance<py::array_t<int32_t>>(bitmask) || !bitmask.dtype().is(py::dtype::of<int32_t>()))
    throw InvalidInput(str("bitmask must have dtype int32, got ", std::string(py::str(bitmask.dtype()))));
  if (bitmask.ndim() != 2) throw InvalidInput(str("bitmask must be 2-D (rows, words), got ", bitmask.ndim(), " dims"));
  if (!(bitmask.flags() & py::array::c_style)) throw InvalidInput("bitmask must be C-contiguous");
  if (!bitmask.writeable()) throw InvalidInput("bitmask must be writable");
  if (bitmask.shape(0) < rows)
    throw InvalidInput(str("bitmask must have at least ", rows, " rows (one per row of the call), got ", bitmask.shape(0)));
  *words = bitmask.shape(1);
  return static_cast<int32_t*>(const_cast<void*>(bitmask.data()));
}

py::array_t<bool> bools(int64_t n) { return py::array_t<bool>(static_cast<py::ssize_t>(n)); }

}  // namespace

void register_fact_matcher(py::module_& m) {
  py::class_<FactMatcher>(m, "FactMatcher", "Native fact-decoding state per row (see kcore.matcher.FactMatcher).")
      .def(py::init([](std::shared_ptr<Trie> trie, std::vector<std::vector<int64_t>> triggers,
                       std::vector<int64_t> terminator, std::vector<int64_t> end_tokens,
                       std::vector<int64_t> stop_tokens, bool avoid_duplicates, int64_t max_rollback_tokens,
                       int64_t batch_size) {
             if (!trie) throw InvalidInput("trie must be a kcore._C.Trie, got None");
             FactMatcherConfig c;
             c.triggers = std::move(triggers);
             c.terminator = std::move(terminator);
             c.end_tokens = std::move(end_tokens);
             c.stop_tokens = std::move(stop_tokens);
             c.avoid_duplicates = avoid_duplicates;
             c.max_rollback_tokens = max_rollback_tokens;
             return std::make_unique<FactMatcher>(std::const_pointer_cast<const Trie>(trie), std::move(c), batch_size);
           }),
           py::arg("trie"), py::arg("triggers"), py::arg("terminator"), py::arg("end_tokens"), py::arg("stop_tokens"),
           py::arg("avoid_duplicates"), py::arg("max_rollback_tokens"), py::arg("batch_size"))
      .def_property_readonly("batch_size", &FactMatcher::batch_size)
      .def_property_readonly("vocab_size", &FactMatcher::vocab_size)
      .def_property_readonly("bitmask_words", &FactMatcher::bitmask_words)
      .def_property_readonly("avoid_duplicates", [](const FactMatcher& f) { return f.config().avoid_duplicates; })
      .def_property_readonly("max_rollback_tokens", [](const FactMatcher& f) { return f.config().max_rollback_tokens; })
      .def_property_readonly("terminator_ids", [](const FactMatcher& f) { return f.config().terminator; })
      .def(
          "accept_token",
          [](FactMatcher& f, int64_t row, int64_t token, bool strict) { f.accept(&row, &token, 1, strict); },
          py::arg("row"), py::arg("token"), py::arg("strict") = true)
      .def(
          "accept_tokens",
          [](FactMatcher& f, const I64Array& rows, const I64Array& tokens, bool strict) {
            const int64_t* r = ids_of(rows, "rows");
            const int64_t* t = ids_of(tokens, "tokens");
            if (rows.size() != tokens.size())
              throw InvalidInput(str("rows and tokens must have the same length, got ", rows.size(), " and ", tokens.size()));
            MaybeRelease gil(rows.size());
            f.accept(r, t, rows.size(), strict);
          },
          py::arg("rows"), py::arg("tokens"), py::arg("strict") = true)
      .def(
          "accept_token_sequence",
          [](FactMatcher& f, int64_t row, const I64Array& tokens, bool strict) {
            const int64_t* t = ids_of(tokens, "tokens");
            MaybeRelease gil(tokens.size());
            f.accept_sequence(row, t, tokens.size(), strict);
          },
          py::arg("row"), py::arg("tokens"), py::arg("strict") = true)
      .def("resize", &FactMatcher::resize, py::arg("batch_size"))
      .def(
          "prefill",
          [](FactMatcher& f, int64_t row, const I64Array& tokens) {
            const int64_t* t = ids_of(tokens, "token_ids");
            MaybeRelease gil(tokens.size());
            f.prefill(row, t, tokens.size());
          },
          py::arg("row"), py::arg("token_ids"))
      .def(
          "fill_next_token_bitmask",
          [](const FactMatcher& f, const py::array& bitmask, const std::optional<I64Array>& rows) {
            Rows r(f, rows, "rows");
            int64_t words = 0;
            int32_t* mask = bitmask_of(bitmask, r.n, &words);
            auto out = bools(r.n);
            bool* o = out.mutable_data();
            {
              MaybeRelease gil(r.n * words);
              f.fill_next_token_bitmask(r.ptr, r.n, mask, words, o);
            }
            return out;
          },
          py::arg("bitmask"), py::arg("rows") = py::none())
      .def(
          "fill_next_token_bitmask_row",
          [](const FactMatcher& f, const py::array& bitmask, int64_t row, int64_t index) {
            int64_t words = 0;
            int32_t* mask = bitmask_of(bitmask, index + 1, &words);
            if (index < 0) throw InvalidInput(str("index must be >= 0, got ", index));
            bool out = false;
            f.fill_next_token_bitmask(&row, 1, mask + index * words, words, &out);
            return out;
          },
          py::arg("bitmask"), py::arg("row"), py::arg("index") = 0)
      .def("is_allowed", &FactMatcher::is_allowed, py::arg("row"), py::arg("token"))
      .def(
          "fork",
          [](FactMatcher& f, const I64Array& src, const I64Array& dst) {
            const int64_t* s = ids_of(src, "src_rows");
            const int64_t* d = ids_of(dst, "dst_rows");
            if (src.size() != dst.size())
              throw InvalidInput(str("src_rows and dst_rows must have the same length, got ", src.size(), " and ", dst.size()));
            f.fork(s, d, src.size());
          },
          py::arg("src_rows"), py::arg("dst_rows"))
      .def(
          "reset",
          [](FactMatcher& f, const std::optional<I64Array>& rows) {
            Rows r(f, rows, "rows");
            f.reset(r.ptr, r.n);
          },
          py::arg("rows") = py::none())
      .def("rollback", &FactMatcher::rollback, py::arg("row"), py::arg("n"))
      .def("rollback_available", &FactMatcher::rollback_available, py::arg("row"))
      .def(
          "is_in_fact",
          [](const FactMatcher& f, const std::optional<I64Array>& rows) {
            Rows r(f, rows, "rows");
            auto out = bools(r.n);
            bool* o = out.mutable_data();
            for (int64_t i = 0; i < r.n; ++i) o[i] = f.mode(r.ptr[i]) == kMatcherInFact;
            return out;
          },
          py::arg("rows") = py::none())
      .def(
          "is_terminated",
          [](const FactMatcher& f, const std::optional<I64Array>& rows) {
            Rows r(f, rows, "rows");
            auto out = bools(r.n);
            bool* o = out.mutable_data();
            for (int64_t i = 0; i < r.n; ++i) o[i] = f.terminated(r.ptr[i]);
            return out;
          },
          py::arg("rows") = py::none())
      .def("mode", &FactMatcher::mode, py::arg("row"), "0 free text, 1 inside a fact, 2 forcing the terminator.")
      .def("trie_state", &FactMatcher::trie_state, py::arg("row"))
      .def("position", &FactMatcher::position, py::arg("row"))
      .def(
          "open_fact",
          [](const FactMatcher& f, int64_t row) -> py::object {
            const int64_t s = f.open_fact_start(row);
            if (s == INT64_MIN) return py::none();
            return py::make_tuple(s, f.position(row));
          },
          py::arg("row"))
      .def(
          "written_facts",
          [](const FactMatcher& f, int64_t row) {
            py::list out;
            for (const MatcherFact& w : f.written_facts(row)) out.append(py::make_tuple(w.fact_id, w.start, w.end));
            return out;
          },
          py::arg("row"))
      .def("same_state", &FactMatcher::same_state, py::arg("a"), py::arg("b"));

  m.def(
      "apply_token_bitmask_keep_finite_cpu",
      [](const TensorArg& logits, const TensorArg& bitmask, const std::optional<TensorArg>& indices) {
        CHECK_DIM(2, logits);
        CHECK_DTYPE(logits, ElemType::kFloat32, ElemType::kFloat16, ElemType::kBFloat16);
        CHECK_CONTIGUOUS_LAST(logits);
        CHECK_HOST(logits);
        CHECK_DIM(2, bitmask);
        CHECK_DTYPE(bitmask, ElemType::kInt32);
        CHECK_CONTIGUOUS_LAST(bitmask);
        CHECK_HOST(bitmask);
        BitmaskArgs a;
        a.logits = logits.data;
        a.dtype = logits.dtype;
        a.rows = logits.size(0);
        a.vocab = logits.size(1);
        a.logits_row_stride = logits.stride(0);
        a.bitmask = bitmask.ptr<const int32_t>();
        a.bitmask_rows = bitmask.size(0);
        a.bitmask_words = bitmask.size(1);
        a.bitmask_row_stride = bitmask.stride(0);
        a.indices = nullptr;
        a.num_indices = 0;
        if (indices) {
          CHECK_DIM(1, *indices);
          CHECK_DTYPE(*indices, ElemType::kInt64);
          CHECK_CONTIGUOUS(*indices);
          CHECK_HOST(*indices);
          a.indices = indices->ptr<const int64_t>();
          a.num_indices = indices->size(0);
        }
        MaybeRelease gil(a.rows * a.vocab);
        apply_bitmask_keep_finite(a);
      },
      py::arg("logits"), py::arg("bitmask"), py::arg("indices") = py::none(),
      "Mask host logits in place with the bitmask (rows listed in indices, or all), then give a listed row whose "
      "allowed tokens were all -inf score 0 on them (see csrc/core/fact_matcher.h).");
}

}  // namespace kcore::bindings
