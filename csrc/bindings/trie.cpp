// Python bindings of the fact trie (kcore._C.TrieBuilder, kcore._C.Trie). The public API with
// its documentation is kcore/trie.py; these functions check array sizes and release the GIL.
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <system_error>
#include <vector>

#include "bindings/checks.h"
#include "bindings/registry.h"
#include "core/errors.h"
#include "core/trie.h"
#include "core/trie_builder.h"

namespace py = pybind11;

namespace kcore::bindings {
namespace {

using I64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

template <typename Array>
void add_sequences(TrieBuilder& b, const Array& tokens, const I64Array& offsets) {
  CHECK_DIM(1, tokens);
  CHECK_DIM(1, offsets);
  if (offsets.size() < 1) throw InvalidInput("offsets must have at least one element");
  const int64_t n = offsets.size() - 1;
  py::gil_scoped_release release;
  b.add(tokens.data(), tokens.size(), offsets.data(), n);
}

I64Array new_like(int64_t n) { return I64Array(n); }

}  // namespace

void register_trie(py::module_& m) {
  // File-system errors of the builder and loader (std::system_error) surface as OSError through the
  // module's exception translator (module.cpp).
  py::class_<TrieBuilder>(m, "TrieBuilder", "Sort-based external-memory builder of a .ktrie file (see kcore.trie).")
      .def(py::init<int64_t, int64_t, std::string>(), py::arg("vocab_size"), py::arg("memory_budget_bytes"),
           py::arg("tmp_dir"))
      .def(
          "add",
          [](TrieBuilder& b, const py::array& tokens, const I64Array& offsets) {
            if (py::isinstance<py::array_t<int32_t>>(tokens)) {
              add_sequences(b, I32Array::ensure(tokens), offsets);
            } else {
              add_sequences(b, I64Array::ensure(tokens), offsets);
            }
          },
          py::arg("tokens"), py::arg("offsets"),
          "Add sequences tokens[offsets[i]:offsets[i+1]] (tokens int32 or int64, offsets int64).")
      .def_property_readonly("num_added", &TrieBuilder::num_added)
      .def(
          "finish",
          [](TrieBuilder& b, const std::string& path, const std::string& fingerprint) {
            TrieBuildStats s;
            {
              py::gil_scoped_release release;
              s = b.finish(path, fingerprint);
            }
            py::dict d;
            d["num_input"] = s.num_input;
            d["num_facts"] = s.num_facts;
            d["num_nodes"] = s.num_nodes;
            d["num_edges"] = s.num_edges;
            d["num_trie_nodes"] = s.num_trie_nodes;
            d["num_runs"] = s.num_runs;
            d["file_bytes"] = s.file_bytes;
            return d;
          },
          py::arg("path"), py::arg("tokenizer_fingerprint"));

  py::class_<Trie, std::shared_ptr<Trie>>(m, "Trie", "A memory-mapped .ktrie file (see kcore.trie.FactTrie).")
      .def(py::init([](const std::string& path, bool verify_data) {
             py::gil_scoped_release release;
             return std::make_shared<Trie>(path, verify_data);
           }),
           py::arg("path"), py::arg("verify_data"))
      .def("verify_data",
           [](const Trie& t) {
             py::gil_scoped_release release;
             t.verify_data();
           })
      .def_property_readonly("path", &Trie::path)
      .def_property_readonly("vocab_size", &Trie::vocab_size)
      .def_property_readonly("num_facts", &Trie::num_facts)
      .def_property_readonly("num_nodes", &Trie::num_nodes)
      .def_property_readonly("num_edges", &Trie::num_edges)
      .def_property_readonly("num_trie_nodes", &Trie::num_trie_nodes)
      .def_property_readonly("file_bytes", &Trie::file_bytes)
      .def_property_readonly("fingerprint", &Trie::fingerprint)
      .def_property_readonly("root_state", &Trie::root_state)
      .def(
          "walk",
          [](const Trie& t, const I64Array& tokens) {
            CHECK_DIM(1, tokens);
            py::gil_scoped_release release;
            int64_t s = t.root_state();
            for (py::ssize_t i = 0; i < tokens.size() && s != -1; ++i) s = t.step(s, tokens.data()[i]);
            return s;
          },
          py::arg("tokens"), "State reached from the root by the tokens (-1 if none).")
      .def(
          "next_tokens",
          [](const Trie& t, int64_t state) {
            std::vector<int32_t> out;
            {
              py::gil_scoped_release release;
              t.next_tokens(state, &out);
            }
            return I32Array(static_cast<py::ssize_t>(out.size()), out.data());
          },
          py::arg("state"))
      .def(
          "step",
          [](const Trie& t, const I64Array& states, const I64Array& tokens) {
            CHECK_DIM(1, states);
            CHECK_DIM(1, tokens);
            if (states.size() != tokens.size())
              throw InvalidInput("states and tokens must have the same length, got " + std::to_string(states.size()) +
                                 " and " + std::to_string(tokens.size()));
            I64Array out = new_like(states.size());
            int64_t* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              t.step(states.data(), tokens.data(), states.size(), o);
            }
            return out;
          },
          py::arg("states"), py::arg("tokens"))
      .def(
          "is_complete",
          [](const Trie& t, const I64Array& states) {
            CHECK_DIM(1, states);
            py::array_t<bool> out(states.size());
            bool* o = out.mutable_data();
            {
              py::gil_scoped_release release;
              t.is_complete(states.data(), states.size(), o);
            }
            return out;
          },
          py::arg("states"))
      .def(
          "fact_range",
          [](const Trie& t, const I64Array& states) {
            CHECK_DIM(1, states);
            I64Array first = new_like(states.size()), count = new_like(states.size());
            int64_t* f = first.mutable_data();
            int64_t* c = count.mutable_data();
            {
              py::gil_scoped_release release;
              t.fact_range(states.data(), states.size(), f, c);
            }
            return py::make_tuple(first, count);
          },
          py::arg("states"))
      .def(
          "fill_bitmask",
          [](const Trie& t, const I64Array& states, const py::object& bitmask, int64_t rows, int64_t words_per_row,
             const std::optional<I64Array>& written_offsets, const std::optional<I64Array>& written_ids) {
            CHECK_DIM(1, states);
            // The bitmask: a C-contiguous int32 numpy array, or the address of a CPU torch tensor's
            // storage whose dtype, shape and layout kcore/trie.py checked.
            uintptr_t bitmask_ptr = 0;
            if (py::isinstance<py::array>(bitmask)) {
              auto a = py::reinterpret_borrow<py::array>(bitmask);
              if (!py::isinstance<py::array_t<int32_t>>(a) || a.ndim() != 2 || a.shape(0) != rows ||
                  a.shape(1) != words_per_row || !(a.flags() & py::array::c_style))
                throw InvalidInput("bitmask must be a C-contiguous int32 array of shape (rows, words_per_row)");
              bitmask_ptr = reinterpret_cast<uintptr_t>(a.mutable_data());
            } else {
              bitmask_ptr = bitmask.cast<uintptr_t>();
            }
            if (rows != states.size())
              throw InvalidInput("bitmask has " + std::to_string(rows) + " rows, expected one per state (" +
                                 std::to_string(states.size()) + ")");
            if (bitmask_ptr == 0 && rows > 0) throw InvalidInput("bitmask pointer is null");
            const int64_t* wo = nullptr;
            const int64_t* wi = nullptr;
            if (written_offsets.has_value() != written_ids.has_value())
              throw InvalidInput("written_offsets and written_ids must be given together");
            if (written_offsets) {
              CHECK_DIM(1, *written_offsets);
              CHECK_DIM(1, *written_ids);
              if (written_offsets->size() != rows + 1)
                throw InvalidInput("written_offsets must have batch + 1 = " + std::to_string(rows + 1) +
                                   " elements, got " + std::to_string(written_offsets->size()));
              wo = written_offsets->data();
              wi = written_ids->data();
              const int64_t nids = written_ids->size();
              if (wo[0] != 0 || wo[rows] > nids)
                throw InvalidInput("written_offsets must start at 0 and end at most at len(written_ids)=" +
                                   std::to_string(nids));
              for (int64_t r = 0; r < rows; ++r) {
                if (wo[r + 1] < wo[r]) throw InvalidInput("written_offsets must be non-decreasing (row " + std::to_string(r) + ")");
                for (int64_t k = wo[r] + 1; k < wo[r + 1]; ++k) {
                  if (wi[k] < wi[k - 1])
                    throw InvalidInput("written_ids must be sorted within each row; row " + std::to_string(r) +
                                       " is not");
                }
              }
            }
            int32_t* mask = reinterpret_cast<int32_t*>(bitmask_ptr);
            py::gil_scoped_release release;
            t.fill_bitmask(states.data(), rows, mask, words_per_row, wo, wi);
          },
          py::arg("states"), py::arg("bitmask"), py::arg("rows"), py::arg("words_per_row"),
          py::arg("written_offsets") = py::none(), py::arg("written_ids") = py::none());
}

}  // namespace kcore::bindings
