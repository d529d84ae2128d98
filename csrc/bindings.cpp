// The only file that includes pybind11: converts arrays in, exposes structs out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <memory>

#include "trie.h"

namespace py = pybind11;
using laser::DraftParams;
using laser::DraftTree;
using laser::Pool;

namespace {

// A 1-D int32 view of any integer array-like (list, numpy array, CPU tensor). int32
// C-contiguous input is used in place; other integer dtypes are range-checked first.
struct Tokens {
  py::array_t<int32_t> arr;
  const int32_t* data() const { return arr.data(); }
  int64_t size() const { return int64_t(arr.size()); }
};

Tokens as_tokens(const py::handle& obj, const char* what) {
  py::array a = py::array::ensure(obj);
  if (!a) throw py::type_error(std::string(what) + " must be an integer array-like");
  if (a.ndim() != 1) throw py::value_error(std::string(what) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  const char kind = a.dtype().kind();
  if (a.size() > 0 && kind != 'i' && kind != 'u')
    throw py::type_error(std::string(what) + " must hold integers, got dtype " + std::string(py::str(a.dtype())));
  if (a.size() > 0 && !(kind == 'i' && a.itemsize() == 4)) {
    auto wide = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    if (kind == 'u' && a.itemsize() == 8) {  // uint64 above 2^63 would wrap when cast
      auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
      for (py::ssize_t i = 0; i < u.size(); ++i)
        if (u.data()[i] > uint64_t(INT32_MAX))
          throw py::value_error(std::string(what) + ": token id " + std::to_string(u.data()[i]) + " exceeds 2^31-1");
    }
    for (py::ssize_t i = 0; i < wide.size(); ++i) {
      const int64_t v = wide.data()[i];
      if (v < 0 || v > INT32_MAX)
        throw py::value_error(std::string(what) + ": token id " + std::to_string(v) + " at position " +
                              std::to_string(i) + " is out of range [0, 2^31-1]");
    }
  }
  return Tokens{py::array_t<int32_t, py::array::c_style | py::array::forcecast>::ensure(a)};
}

template <typename T>
py::array_t<T> view(const std::vector<T>& v, std::vector<py::ssize_t> shape, py::handle owner) {
  return py::array_t<T>(shape, v.data(), owner);  // zero-copy; `owner` keeps the tree alive
}

DraftParams params(int32_t budget, int32_t max_depth, int32_t min_match, int32_t max_match,
                   const py::object& cost, double confidence, py::object& keep) {
  DraftParams p;
  p.confidence = confidence;
  p.budget = budget;
  p.max_depth = max_depth;
  p.min_match = min_match;
  p.max_match = max_match;
  if (!cost.is_none()) {
    auto arr = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(cost);
    if (!arr || arr.ndim() != 1 || arr.size() < 1) throw py::value_error("cost must be a non-empty 1-D float array");
    for (py::ssize_t i = 0; i < arr.size(); ++i)
      if (!(arr.data()[i] > 0.0)) throw py::value_error("cost values must be positive");
    p.cost = arr.data();
    p.cost_len = int32_t(arr.size());
    keep = std::move(arr);  // keeps the buffer alive for the call
  }
  return p;
}

DraftTree run_draft(const std::vector<const Pool*>& pools, const std::vector<double>& weights,
                    const py::handle& context, int32_t budget, int32_t max_depth, int32_t min_match,
                    int32_t max_match, const py::object& cost, double confidence) {
  Tokens ctx = as_tokens(context, "context");
  if (weights.size() != pools.size()) throw py::value_error("need one weight per pool");
  for (double w : weights)
    if (!(w > 0.0)) throw py::value_error("pool weights must be positive");
  py::object keep;  // owner of the cost buffer, if any
  const DraftParams p = params(budget, max_depth, min_match, max_match, cost, confidence, keep);
  py::gil_scoped_release release;
  return laser::draft(pools.data(), weights.data(), int(pools.size()), ctx.data(), ctx.size(), p);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "LASER native core: retrieval pool (count trie) and draft-tree flattening";
  py::register_exception<laser::PoolFormatError>(m, "PoolFormatError", PyExc_ValueError);
  py::register_exception<laser::PoolIOError>(m, "PoolIOError", PyExc_OSError);

  py::class_<DraftTree>(m, "DraftTree", "Draft tree in depth-first pre-order (parent index < child index).")
      .def_readonly("match_len", &DraftTree::match_len)
      .def_readonly("root_count", &DraftTree::root_count)
      .def_property_readonly("tokens", [](py::object s) { auto& t = s.cast<DraftTree&>(); return view(t.tokens, {t.n}, s); })
      .def_property_readonly("parents", [](py::object s) { auto& t = s.cast<DraftTree&>(); return view(t.parents, {t.n}, s); })
      .def_property_readonly("depth", [](py::object s) { auto& t = s.cast<DraftTree&>(); return view(t.depth, {t.n}, s); })
      .def_property_readonly("counts", [](py::object s) { auto& t = s.cast<DraftTree&>(); return view(t.counts, {t.n}, s); })
      .def_property_readonly("rank", [](py::object s) { auto& t = s.cast<DraftTree&>(); return view(t.rank, {t.n}, s); })
      .def_property_readonly("mask", [](py::object s) {
        auto& t = s.cast<DraftTree&>();
        return py::array(py::dtype("bool"), {t.n, t.n}, {t.n, 1}, t.mask.data(), s);
      })
      .def_property_readonly("paths", [](py::object s) {
        auto& t = s.cast<DraftTree&>();
        return view(t.paths, {t.n_paths, t.path_width}, s);
      })
      .def("__len__", [](const DraftTree& t) { return t.n; })
      .def("__repr__", [](const DraftTree& t) {
        return "DraftTree(n=" + std::to_string(t.n) + ", match_len=" + std::to_string(t.match_len) +
               ", paths=" + std::to_string(t.n_paths) + ")";
      });

  py::class_<Pool>(m, "RetrievalPool")
      .def(py::init<int32_t, int64_t, int64_t, double>(), py::arg("max_depth") = 12, py::arg("vocab_size") = 0,
           py::arg("max_nodes") = int64_t(1) << 22, py::arg("decay") = 0.5)
      .def("insert",
           [](Pool& p, const py::handle& tokens, double weight) {
             if (!(weight > 0.0)) throw py::value_error("weight must be positive");
             Tokens t = as_tokens(tokens, "tokens");
             py::gil_scoped_release release;
             p.insert(t.data(), t.size(), weight);
           },
           py::arg("tokens"), py::arg("weight") = 1.0)
      .def("extend",
           [](Pool& p, const py::handle& prefix, const py::handle& tokens, double weight) {
             if (!(weight > 0.0)) throw py::value_error("weight must be positive");
             Tokens a = as_tokens(prefix, "prefix"), b = as_tokens(tokens, "tokens");
             py::gil_scoped_release release;
             p.extend(a.data(), a.size(), b.data(), b.size(), weight);
           },
           py::arg("prefix"), py::arg("tokens"), py::arg("weight") = 1.0)
      .def("draft",
           [](const Pool& p, const py::handle& context, int32_t budget, int32_t max_depth, int32_t min_match,
              int32_t max_match, const py::object& cost, double confidence) {
             return run_draft({&p}, {1.0}, context, budget, max_depth > 0 ? max_depth : p.max_depth(), min_match,
                              max_match, cost, confidence);
           },
           py::arg("context"), py::arg("budget") = 64, py::arg("max_depth") = 0, py::arg("min_match") = 1,
           py::arg("max_match") = 4, py::arg("cost") = py::none(), py::arg("confidence") = 1.0)
      .def("count",
           [](const Pool& p, const py::handle& tokens) {
             Tokens t = as_tokens(tokens, "tokens");
             return p.count(t.data(), t.size());
           })
      .def("check_tokens",
           [](const Pool& p, const py::handle& tokens) {
             Tokens t = as_tokens(tokens, "tokens");
             p.check_tokens(t.data(), t.size());
           })
      .def("__len__", &Pool::size)
      .def("memory_bytes", &Pool::memory_bytes)
      .def_property_readonly("max_depth", &Pool::max_depth)
      .def_property_readonly("vocab_size", &Pool::vocab_size)
      .def_property_readonly("max_nodes", &Pool::max_nodes)
      .def_property_readonly("prune_count", &Pool::prune_count)
      .def("save", [](const Pool& p, const std::string& path) {
             py::gil_scoped_release release;
             p.save(path);
           })
      .def_static("load", [](const std::string& path) {
             py::gil_scoped_release release;
             return laser::Pool::load(path);
           })
      .def("__repr__", [](const Pool& p) {
        return "RetrievalPool(nodes=" + std::to_string(p.size()) + ", max_depth=" + std::to_string(p.max_depth()) +
               ", max_nodes=" + std::to_string(p.max_nodes()) + ")";
      });

  m.def("draft_union",
        [](const std::vector<const Pool*>& pools, const std::vector<double>& weights, const py::handle& context,
           int32_t budget, int32_t max_depth, int32_t min_match, int32_t max_match, const py::object& cost,
           double confidence) {
          if (pools.empty()) throw py::value_error("need at least one pool");
          return run_draft(pools, weights, context, budget, max_depth, min_match, max_match, cost, confidence);
        },
        py::arg("pools"), py::arg("weights"), py::arg("context"), py::arg("budget") = 64, py::arg("max_depth") = 12,
        py::arg("min_match") = 1, py::arg("max_match") = 4, py::arg("cost") = py::none(), py::arg("confidence") = 1.0,
        "Draft from several pools at once; a node's count is the weighted sum of the pools' counts.");
}
