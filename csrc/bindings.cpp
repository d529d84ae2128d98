// The only file that includes pybind11: converts arrays in, exposes structs out.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <climits>
#include <optional>
#include <memory>

#include "accept.h"
#include "layer.h"
#include "linear.h"
#include "trie.h"

namespace py = pybind11;
using laser::AcceptanceModel;
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
  const bool ready = py::isinstance<py::array_t<int32_t, py::array::c_style>>(obj);  // the common case
  py::array a = ready ? py::reinterpret_borrow<py::array>(obj) : py::array::ensure(obj);
  if (!a) throw py::type_error(std::string(what) + " must be an integer array-like");
  if (a.ndim() != 1) throw py::value_error(std::string(what) + " must be 1-D, got " + std::to_string(a.ndim()) + "-D");
  if (ready) return Tokens{py::reinterpret_borrow<py::array_t<int32_t>>(a)};
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
py::array_t<T> view(const T* data, std::vector<py::ssize_t> shape, py::handle owner) {
  return py::array_t<T>(shape, data, owner);  // zero-copy; `owner` keeps the tree alive
}

DraftParams params(int32_t budget, int32_t max_depth, int32_t min_match, int32_t max_match,
                   const py::object& cost, py::object& keep) {
  DraftParams p;
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

// ---- Hot calls: Pool.draft and draft_union run once per decode step. pybind11's generic
// dispatcher copies the kwargs dict and creates a str per parameter name on every call
// (~1.2 us of a ~6 us 64-node draft), so these two are plain METH_FASTCALL functions whose
// keyword names are interned once and matched by pointer.

int32_t int_arg(PyObject* o, const char* name, int32_t dflt) {
  if (!o) return dflt;
  if (PyFloat_Check(o) || !PyIndex_Check(o)) throw py::type_error(std::string(name) + " must be an int");
  const long long v = PyLong_AsLongLong(py::reinterpret_steal<py::object>(PyNumber_Index(o)).ptr());
  if (PyErr_Occurred()) throw py::error_already_set();
  if (v < INT32_MIN || v > INT32_MAX) throw py::value_error(std::string(name) + " is out of the int32 range");
  return int32_t(v);
}

double float_arg(PyObject* o, const char* name, double dflt) {
  if (!o) return dflt;
  const double v = PyFloat_AsDouble(o);
  if (v == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    throw py::type_error(std::string(name) + " must be a float");
  }
  return v;
}

// a = [context, budget, max_depth (already resolved into `max_depth`), min_match, max_match,
// cost, acceptance, sources, min_chance, match_levels, min_nodes]: the arguments after the pools, as
// bind_args() left them.
DraftTree run_draft(const Pool* const* pools, const double* weights, size_t n_pools, PyObject* const* a,
                    int32_t max_depth) {
  Tokens ctx = as_tokens(a[0], "context");
  for (size_t i = 0; i < n_pools; ++i)
    if (!(weights[i] > 0.0)) throw py::value_error("pool weights must be positive");
  py::object keep;  // owner of the cost buffer, if any
  DraftParams p = params(int_arg(a[1], "budget", 32), max_depth, int_arg(a[3], "min_match", 2),
                         int_arg(a[4], "max_match", 4), py::reinterpret_borrow<py::object>(a[5] ? a[5] : Py_None), keep);
  std::vector<int32_t> sources;
  if (a[6] && a[6] != Py_None) {
    if (!py::isinstance<AcceptanceModel>(a[6])) throw py::type_error("acceptance must be an AcceptanceModel or None");
    p.acceptance = &py::handle(a[6]).cast<const AcceptanceModel&>();
  }
  if (a[7] && a[7] != Py_None) {
    sources = py::handle(a[7]).cast<std::vector<int32_t>>();
    if (sources.size() != n_pools) throw py::value_error("need one source slot per pool");
    p.sources = sources.data();
  }
  p.min_chance = float_arg(a[8], "min_chance", 0.0);
  p.match_levels = int_arg(a[9], "match_levels", 1);
  p.min_nodes = int_arg(a[10], "min_nodes", 0);
  py::gil_scoped_release release;
  return laser::draft(pools, weights, int(n_pools), ctx.data(), ctx.size(), p);
}

struct Signature {
  const char* fn;
  std::vector<const char*> names;  // parameter names in positional order
  int n_required;                  // the first n_required have no default
  std::vector<PyObject*> interned{};  // filled on first use (with the GIL held), never freed
};

// out[i] = the argument for names[i], or nullptr if not given.
void bind_args(Signature& sig, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, PyObject** out) {
  const size_t n = sig.names.size();
  if (sig.interned.empty())
    for (const char* name : sig.names) sig.interned.push_back(PyUnicode_InternFromString(name));
  if (size_t(nargs) > n)
    throw py::type_error(std::string(sig.fn) + "() takes at most " + std::to_string(n) + " arguments (" +
                         std::to_string(nargs) + " given)");
  for (size_t i = 0; i < n; ++i) out[i] = i < size_t(nargs) ? args[i] : nullptr;
  const Py_ssize_t n_kw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
  for (Py_ssize_t k = 0; k < n_kw; ++k) {
    PyObject* key = PyTuple_GET_ITEM(kwnames, k);
    size_t i = 0;
    while (i < n && sig.interned[i] != key) ++i;
    if (i == n)  // not interned by the caller (e.g. **kwargs built at run time): compare text
      for (i = 0; i < n && PyUnicode_Compare(sig.interned[i], key) != 0;) ++i;
    if (i == n)
      throw py::type_error(std::string(sig.fn) + "() got an unexpected keyword argument '" +
                           py::str(key).cast<std::string>() + "'");
    if (out[i]) throw py::type_error(std::string(sig.fn) + "() got multiple values for argument '" + sig.names[i] + "'");
    out[i] = args[nargs + k];
  }
  for (int i = 0; i < sig.n_required; ++i)
    if (!out[i]) throw py::type_error(std::string(sig.fn) + "() missing required argument '" + sig.names[i] + "'");
}

template <typename F>
PyObject* guarded(F&& body) {
  try {
    return body();
  } catch (py::error_already_set& e) {
    e.restore();
  } catch (py::cast_error& e) {
    PyErr_SetString(PyExc_TypeError, e.what());
  } catch (py::builtin_exception& e) {
    e.set_error();
  } catch (std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

PyObject* draft_method(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static Signature sig{"draft",
                       {"context", "budget", "max_depth", "min_match", "max_match", "cost", "acceptance",
                        "sources", "min_chance", "match_levels", "min_nodes"},
                       1};
  return guarded([&] {
    PyObject* a[11];
    bind_args(sig, args, nargs, kwnames, a);
    const Pool* one = &py::handle(self).cast<const Pool&>();
    const double unit = 1.0;
    const int32_t max_depth = int_arg(a[2], "max_depth", 10);  // <= 0: the pool's own
    return py::cast(run_draft(&one, &unit, 1, a, max_depth > 0 ? max_depth : one->max_depth())).release().ptr();
  });
}

PyObject* draft_union_function(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  static Signature sig{"draft_union",
                       {"pools", "weights", "context", "budget", "max_depth", "min_match", "max_match", "cost", "acceptance",
                        "sources", "min_chance", "match_levels", "min_nodes"},
                       3};
  return guarded([&] {
    PyObject* a[13];
    bind_args(sig, args, nargs, kwnames, a);
    const auto pools = py::handle(a[0]).cast<std::vector<const Pool*>>();
    const auto weights = py::handle(a[1]).cast<std::vector<double>>();
    if (pools.empty()) throw py::value_error("need at least one pool");
    if (weights.size() != pools.size()) throw py::value_error("need one weight per pool");
    for (const Pool* p : pools)
      if (!p) throw py::type_error("pools must be RetrievalPool objects");
    return py::cast(run_draft(pools.data(), weights.data(), pools.size(), a + 2, int_arg(a[4], "max_depth", 10)))
        .release()
        .ptr();
  });
}

PyMethodDef draft_def{
    "draft", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&draft_method)), METH_FASTCALL | METH_KEYWORDS,
    "draft($self, /, context, budget=32, max_depth=10, min_match=2, max_match=4, cost=None, "
    "acceptance=None, sources=None, min_chance=0.0, match_levels=1, min_nodes=0)\n--\n\n"
    "Draft tree for the longest matching suffix of `context` (max_depth 0: the pool's own)."};
PyMethodDef draft_union_def{
    "draft_union", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&draft_union_function)),
    METH_FASTCALL | METH_KEYWORDS,
    "draft_union(pools, weights, context, budget=32, max_depth=10, min_match=2, max_match=4, cost=None, "
    "acceptance=None, sources=None, min_chance=0.0, match_levels=1, min_nodes=0)\n--\n\n"
    "Draft from several pools at once; a node's count is the weighted sum of the pools' counts\n"
    "(with an AcceptanceModel: nodes are scored by their calibrated chance, the best pool's for a token)."};

// cut_trees: a cost-aware cut of trees verified together (None entries: idle rows): one budget
// for all (padded) or one per row (ragged).
py::list cut_trees(const py::list& trees, const py::object& cost, bool ragged) {
  py::object keep;
  const DraftParams p = params(0, 1, 1, 1, cost, keep);
  if (!p.cost) throw py::value_error("cut_trees needs a cost curve");
  std::vector<const DraftTree*> live;
  for (const py::handle& t : trees)
    if (!t.is_none()) live.push_back(&t.cast<const DraftTree&>());
  std::vector<std::vector<double>> chance(live.size());
  std::vector<const double*> rows(live.size());
  std::vector<int32_t> sizes(live.size());
  for (size_t r = 0; r < live.size(); ++r) {
    chance[r].resize(size_t(live[r]->n));
    laser::chance_by_rank(*live[r], chance[r].data());
    rows[r] = chance[r].data(), sizes[r] = live[r]->n;
  }
  std::vector<int32_t> sizes_kept;
  if (ragged) {
    sizes_kept = laser::ragged_budgets(rows.data(), sizes.data(), int(live.size()), p.cost, p.cost_len);
  } else {
    const int32_t b = laser::best_budget(rows.data(), sizes.data(), int(live.size()), p.cost, p.cost_len);
    sizes_kept.assign(live.size(), b);
  }
  py::list out;
  size_t r = 0;
  for (const py::handle& t : trees) {
    if (t.is_none()) { out.append(t); continue; }
    const int32_t b = sizes_kept[r++];
    if (t.cast<const DraftTree&>().n <= b) out.append(t);
    else out.append(py::cast(laser::prefix(t.cast<const DraftTree&>(), b)));
  }
  return out;
}

// The tiled CPU product's arrays: float32, C-contiguous, never converted (a copy would hide
// a caller's mistake and cost what the product saves).
using Floats = py::array_t<float, py::array::c_style>;

void check_floats(const Floats& a, int ndim, const char* what) {
  if (a.ndim() != ndim) throw py::value_error(std::string(what) + " must have " + std::to_string(ndim) + " dimension(s)");
}

void tile_weight(const Floats& w, Floats& out, int threads) {
  check_floats(w, 2, "w");
  check_floats(out, 1, "out");
  const int64_t N = w.shape(0), K = w.shape(1);
  if (N < 1 || K < 1) throw py::value_error("w must be a non-empty [N, K] weight");
  if (out.shape(0) != laser::tiled_size(N, K))
    throw py::value_error("out must hold tiled_size(N, K) = " + std::to_string(laser::tiled_size(N, K)) + " floats");
  if (threads < 1) throw py::value_error("threads must be >= 1");
  const float* src = w.data();
  float* dst = out.mutable_data();
  py::gil_scoped_release release;
  laser::tile_weight(src, N, K, dst, threads);
}

void check_tiled(const Floats& tiled, int64_t N, int64_t K, int threads) {
  check_floats(tiled, 1, "tiled");
  if (K < 1 || N < 1) throw py::value_error("x must be [M, K >= 1] and N >= 1");
  if (tiled.shape(0) != laser::tiled_size(N, K))
    throw py::value_error("tiled must be tile_weight's copy of an [N, K] = [" + std::to_string(N) + ", " +
                          std::to_string(K) + "] weight");
  if (threads < 1) throw py::value_error("threads must be >= 1");
}

void run_tiled(const float* x, int64_t M, int64_t K, const float* tiled, int64_t N, const float* bias, float* y,
               int threads, const std::string& isa) {
  try {
    py::gil_scoped_release release;
    laser::tiled_linear(x, M, K, tiled, N, bias, y, threads, isa);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(e.what());
  }
}

void tiled_linear(const Floats& x, const Floats& tiled, int64_t N, const std::optional<Floats>& bias, Floats& out,
                  int threads, const std::string& isa) {
  check_floats(x, 2, "x");
  check_floats(out, 2, "out");
  const int64_t M = x.shape(0), K = x.shape(1);
  check_tiled(tiled, N, K, threads);
  if (out.shape(0) != M || out.shape(1) != N) throw py::value_error("out must be [M, N]");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != N)) throw py::value_error("bias must be [N]");
  run_tiled(x.data(), M, K, tiled.data(), N, bias ? bias->data() : nullptr, out.mutable_data(), threads, isa);
}

// tiled_linear on addresses (a torch tensor's data_ptr()): a numpy view of a torch tensor
// costs ~3 us, as much as this binding's call, and split_linear's tiled route took 19 us a
// call with them, 6 us without (Intel Xeon VM; 211 calls a SmolLM2 forward). The caller
// vouches for x [M, K], out [M, N] and bias [N] (0: none): live, float32, C-contiguous;
// tiled is checked as in tiled_linear.
void tiled_linear_at(uintptr_t x, int64_t M, int64_t K, const Floats& tiled, int64_t N, uintptr_t bias, uintptr_t out,
                     int threads) {
  check_tiled(tiled, N, K, threads);
  if (M < 0 || !x || !out) throw py::value_error("x and out must be addresses of [M >= 0, K] and [M, N] floats");
  run_tiled(reinterpret_cast<const float*>(x), M, K, tiled.data(), N, reinterpret_cast<const float*>(bias),
            reinterpret_cast<float*>(out), threads, "");
}

// The direct forward's elementwise steps (layer.h) on addresses of live float32 C-contiguous
// buffers, vouched for by the caller as in tiled_linear_at; sizes are checked.
void add_rms_norm_at(uintptr_t h, uintptr_t y, int64_t rows, int64_t C, uintptr_t w, double eps, uintptr_t out,
                     int threads) {
  if (rows < 0 || C < 1 || !h || !w || !out || threads < 1)
    throw py::value_error("add_rms_norm_at: needs rows >= 0, C >= 1, threads >= 1 and h, w, out");
  laser::add_rms_norm(reinterpret_cast<float*>(h), reinterpret_cast<const float*>(y), rows, C,
                      reinterpret_cast<const float*>(w), float(eps), reinterpret_cast<float*>(out), threads);
}

void rope_at(uintptr_t x, int64_t rows, int64_t heads, int64_t D, uintptr_t cos, uintptr_t sin, int threads) {
  if (rows < 0 || heads < 1 || D < 2 || D % 2 || !x || !cos || !sin || threads < 1)
    throw py::value_error("rope_at: needs rows >= 0, heads >= 1, an even D >= 2, threads >= 1 and x, cos, sin");
  laser::rope(reinterpret_cast<float*>(x), rows, heads, D, reinterpret_cast<const float*>(cos),
              reinterpret_cast<const float*>(sin), threads);
}

void silu_mul_at(uintptr_t gate, uintptr_t up, int64_t n, const std::string& isa, int threads) {
  if (n < 0 || !gate || !up || threads < 1) throw py::value_error("silu_mul_at: needs n >= 0, threads >= 1 and gate, up");
  try {
    laser::silu_mul(reinterpret_cast<float*>(gate), reinterpret_cast<const float*>(up), n, isa, threads);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("silu_mul_at: ") + e.what());
  }
}

// attention (layer.h) on addresses: q, out [N, Hq, D], the caches k and v (row_stride,
// head_stride, D), mask [S, T]: live float32 buffers vouched for by the caller; mask_row and
// cache_row are checked against S and R (cache rows).
void attention_at(uintptr_t q, int64_t N, int64_t Hq, int64_t D, uintptr_t k, uintptr_t v, int64_t Hkv, int64_t R,
                  int64_t row_stride, int64_t head_stride, int64_t T, uintptr_t mask, int64_t S,
                  py::array_t<int64_t, py::array::c_style> mask_row, py::array_t<int64_t, py::array::c_style> cache_row,
                  double scale, uintptr_t out, int threads, const std::string& isa) {
  if (!q || !k || !v || !mask || !out || N < 0 || Hq < 1 || D < 1 || Hkv < 1 || Hq % Hkv || T < 1 || threads < 1)
    throw py::value_error("attention_at: needs q, k, v, mask, out, N >= 0, D, T, threads >= 1 and Hkv dividing Hq");
  if (mask_row.ndim() != 1 || cache_row.ndim() != 1 || mask_row.size() != N || cache_row.size() != N)
    throw py::value_error("attention_at: mask_row and cache_row must be [N]");
  for (int64_t j = 0; j < N; ++j) {
    if (mask_row.data()[j] < 0 || mask_row.data()[j] >= S)
      throw py::value_error("attention_at: mask_row[" + std::to_string(j) + "] is outside [0, " + std::to_string(S) + ")");
    if (cache_row.data()[j] < 0 || cache_row.data()[j] >= R)
      throw py::value_error("attention_at: cache_row[" + std::to_string(j) + "] is outside [0, " + std::to_string(R) + ")");
  }
  try {
    py::gil_scoped_release free;
    laser::attention(reinterpret_cast<const float*>(q), N, Hq, D, reinterpret_cast<const float*>(k),
                     reinterpret_cast<const float*>(v), Hkv, row_stride, head_stride, T,
                     reinterpret_cast<const float*>(mask), mask_row.data(), cache_row.data(), float(scale),
                     reinterpret_cast<float*>(out), threads, isa);
  } catch (const std::invalid_argument& e) {
    throw py::value_error(std::string("attention_at: ") + e.what());
  }
}

// Every layer's parameters for DirectBlock.run, gathered once per state of the weights
// (laser/forward.py): the RMSNorm weights' addresses and epsilons, the tiled copies (checked
// against the shapes here and kept alive with it) and the biases' addresses (0: none).
struct DirectLayers {
  int64_t C, Hq, Hkv, D, I;
  std::vector<laser::LayerWeights> w;
  std::vector<Floats> keep;
};

DirectLayers make_direct_layers(int64_t C, int64_t Hq, int64_t Hkv, int64_t D, int64_t I,
                                const std::vector<uintptr_t>& norm1, const std::vector<double>& eps1,
                                const std::vector<uintptr_t>& norm2, const std::vector<double>& eps2,
                                const std::vector<std::vector<Floats>>& tiled,
                                const std::vector<std::vector<uintptr_t>>& bias) {
  const size_t n = norm1.size();
  if (eps1.size() != n || norm2.size() != n || eps2.size() != n || tiled.size() != n || bias.size() != n || n == 0)
    throw py::value_error("DirectLayers: norm1, eps1, norm2, eps2, tiled and bias need one entry per layer (>= 1)");
  const int64_t Q = Hq * D, KV = Hkv * D;
  const int64_t shape[7][2] = {{Q, C}, {KV, C}, {KV, C}, {C, Q}, {I, C}, {I, C}, {C, I}};
  DirectLayers out{C, Hq, Hkv, D, I, std::vector<laser::LayerWeights>(n), {}};
  for (size_t l = 0; l < n; ++l) {
    if (tiled[l].size() != 7 || bias[l].size() != 7)
      throw py::value_error("DirectLayers: layer " + std::to_string(l) + " needs 7 tiled copies and 7 biases");
    if (!norm1[l] || !norm2[l]) throw py::value_error("DirectLayers: layer " + std::to_string(l) + ": null norm");
    laser::LayerWeights& w = out.w[l];
    for (int i = 0; i < 7; ++i) {
      check_tiled(tiled[l][i], shape[i][0], shape[i][1], 1);
      w.tiled[i] = tiled[l][i].data();
      w.bias[i] = reinterpret_cast<const float*>(bias[l][i]);
      out.keep.push_back(tiled[l][i]);
    }
    w.norm[0] = reinterpret_cast<const float*>(norm1[l]), w.norm[1] = reinterpret_cast<const float*>(norm2[l]);
    w.eps[0] = float(eps1[l]), w.eps[1] = float(eps2[l]);
  }
  return out;
}

// decoder_layer (layer.h) over one verification block: made once per forward with the block's
// shapes, slots and addresses (the caller vouches for the addresses: live float32 C-contiguous
// buffers of layer.h's sizes, and the cache buffers [R, Hkv, capacity, D]); the slots are
// checked here and kept alive with the block. run() is every layer, in order.
struct DirectBlock {
  laser::LayerBlock b;
  py::array_t<int64_t> cache_row, cache_col, mask_row;

  void run(uintptr_t h, uintptr_t y, const DirectLayers& layers, const std::vector<uintptr_t>& k_cache,
           const std::vector<uintptr_t>& v_cache) {
    if (layers.C != b.C || layers.Hq != b.Hq || layers.Hkv != b.Hkv || layers.D != b.D || layers.I != b.I)
      throw py::value_error("DirectBlock.run: the layers' shapes are not the block's");
    const size_t n = layers.w.size();
    if (k_cache.size() != n || v_cache.size() != n)
      throw py::value_error("DirectBlock.run: one k_cache and v_cache address per layer");
    if (!h || !y) throw py::value_error("DirectBlock.run: null address");
    for (size_t l = 0; l < n; ++l)
      if (!k_cache[l] || !v_cache[l]) throw py::value_error("DirectBlock.run: null cache address");
    py::gil_scoped_release free;
    for (size_t l = 0; l < n; ++l)
      laser::decoder_layer(reinterpret_cast<float*>(h), reinterpret_cast<float*>(y), l > 0, layers.w[l], b,
                           reinterpret_cast<float*>(k_cache[l]), reinterpret_cast<float*>(v_cache[l]));
  }
};

DirectBlock make_direct_block(int64_t C, int64_t Hq, int64_t Hkv, int64_t D, int64_t I, double scale, int64_t rows,
                              uintptr_t cos, uintptr_t sin, py::array_t<int64_t, py::array::c_style> cache_row,
                              py::array_t<int64_t, py::array::c_style> cache_col,
                              py::array_t<int64_t, py::array::c_style> mask_row, uintptr_t mask, int64_t S, int64_t T,
                              int64_t R, int64_t capacity, const std::vector<uintptr_t>& scratch, int threads) {
  if (C < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 2 || D % 2 || I < 1 || rows < 1 || T < 1 || T > capacity ||
      threads < 1 || !cos || !sin || !mask)
    throw py::value_error("DirectBlock: needs C, I, rows, T <= capacity, threads >= 1, an even D, Hkv dividing Hq "
                          "and cos, sin, mask");
  if (scratch.size() != 7) throw py::value_error("DirectBlock: scratch is x, q, k, v, att, gate, up");
  for (auto a : {&cache_row, &cache_col, &mask_row})
    if (a->ndim() != 1 || a->size() != rows) throw py::value_error("DirectBlock: cache_row, cache_col, mask_row must be [rows]");
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t r = cache_row.data()[j], c = cache_col.data()[j], m = mask_row.data()[j];
    if (r < 0 || r >= R || c < 0 || c >= T || m < 0 || m >= S)
      throw py::value_error("DirectBlock: token " + std::to_string(j) + "'s slot (row " + std::to_string(r) +
                            ", column " + std::to_string(c) + ", mask row " + std::to_string(m) + ") is outside [" +
                            std::to_string(R) + ", " + std::to_string(T) + ", " + std::to_string(S) + ")");
  }
  for (auto p : scratch)
    if (!p) throw py::value_error("DirectBlock: null scratch address");
  auto f = [](uintptr_t p) { return reinterpret_cast<float*>(p); };
  laser::LayerBlock b{C, Hq, Hkv, D, I, float(scale), rows, f(cos), f(sin), cache_row.data(), cache_col.data(),
                      mask_row.data(), f(mask), T, Hkv * capacity * D, capacity * D, f(scratch[0]), f(scratch[1]),
                      f(scratch[2]), f(scratch[3]), f(scratch[4]), f(scratch[5]), f(scratch[6]), threads};
  return DirectBlock{b, cache_row, cache_col, mask_row};
}

// row_stats (accept.h) of the logits at address `logits` (live float32 C-contiguous [R, V], vouched
// for by the caller); parent_row and tokens are checked. Returns (argmax [R], prob [n], rank [n]).
py::tuple row_stats_at(uintptr_t logits, int64_t R, int64_t V, py::array_t<int64_t, py::array::c_style> parent_row,
                       py::array_t<int64_t, py::array::c_style> tokens, int64_t top_k, int threads) {
  if (!logits || R < 1 || V < 1 || top_k < 0 || threads < 1)
    throw py::value_error("row_stats_at: needs logits, R >= 1, V >= 1, top_k >= 0, threads >= 1");
  if (parent_row.ndim() != 1 || tokens.ndim() != 1 || parent_row.size() != tokens.size())
    throw py::value_error("row_stats_at: parent_row and tokens must be 1-D of one length");
  const int64_t n = parent_row.size();
  for (int64_t i = 0; i < n; ++i) {
    if (parent_row.data()[i] < 0 || parent_row.data()[i] >= R)
      throw py::value_error("row_stats_at: parent_row[" + std::to_string(i) + "] is outside [0, " + std::to_string(R) + ")");
    if (tokens.data()[i] < 0 || tokens.data()[i] >= V)
      throw py::value_error("row_stats_at: tokens[" + std::to_string(i) + "] is outside [0, " + std::to_string(V) + ")");
  }
  py::array_t<int64_t> argmax(R), rank(n);
  py::array_t<float> prob(n);
  {
    py::gil_scoped_release free;
    laser::row_stats(reinterpret_cast<const float*>(logits), R, V, parent_row.data(), tokens.data(), n, top_k,
                     argmax.mutable_data(), prob.mutable_data(), rank.mutable_data(), threads);
  }
  return py::make_tuple(argmax, prob, rank);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "LASER native core: retrieval pool (count trie), draft-tree flattening, the tiled CPU product, acceptance statistics, the direct forward's elementwise steps";

  m.def("tile_weight", &tile_weight, py::arg("w").noconvert(), py::arg("out").noconvert(), py::arg("threads") = 1,
        "Lay an [N, K] float32 weight out for tiled_linear into out [tiled_size(N, K)].");
  m.def("tiled_linear", &tiled_linear, py::arg("x").noconvert(), py::arg("tiled").noconvert(), py::arg("N"),
        py::arg("bias").noconvert().none(true), py::arg("out").noconvert(), py::arg("threads") = 1,
        py::arg("isa") = "",
        "out [M, N] = x [M, K] @ w.T (+ bias [N]) from tile_weight's copy of w; isa: '' (the best this CPU runs), "
        "'avx512', 'avx2' or 'generic'.");
  m.def("tiled_linear_at", &tiled_linear_at, py::arg("x"), py::arg("M"), py::arg("K"), py::arg("tiled").noconvert(),
        py::arg("N"), py::arg("bias"), py::arg("out"), py::arg("threads"),
        "tiled_linear on addresses: x, bias (0: none) and out are data pointers of live float32 C-contiguous "
        "[M, K], [N] and [M, N] buffers (unchecked: the caller vouches for them), on the best kernel this CPU runs.");
  m.def("add_rms_norm_at", &add_rms_norm_at, py::arg("h"), py::arg("y"), py::arg("rows"), py::arg("C"), py::arg("w"),
        py::arg("eps"), py::arg("out"), py::arg("threads") = 1,
        "h [rows, C] += y (y = 0: no add), then out [rows, C] = w * h * rsqrt(mean(h^2) + eps), per row; addresses "
        "of live float32 C-contiguous buffers (unchecked: the caller vouches for them). threads: from "
        "PARALLEL_MIN (2048) elements on, the rows are split over this many.");
  m.def("rope_at", &rope_at, py::arg("x"), py::arg("rows"), py::arg("heads"), py::arg("D"), py::arg("cos"),
        py::arg("sin"), py::arg("threads") = 1,
        "x [rows, heads, D] = x * cos + rotate_half(x) * sin in place, cos and sin [rows, D] per row; addresses of "
        "live float32 C-contiguous buffers (unchecked: the caller vouches for them). threads: as add_rms_norm_at's.");
  m.def("silu_mul_at", &silu_mul_at, py::arg("gate"), py::arg("up"), py::arg("n"), py::arg("isa") = "",
        py::arg("threads") = 1,
        "gate[i] = silu(gate[i]) * up[i] for i < n, in place; addresses of live float32 buffers (unchecked: the "
        "caller vouches for them). isa: '' (the best this CPU runs), 'avx512', 'avx2' or 'generic'; threads: as "
        "add_rms_norm_at's.");
  m.def("attention_at", &attention_at, py::arg("q"), py::arg("N"), py::arg("Hq"), py::arg("D"), py::arg("k"),
        py::arg("v"), py::arg("Hkv"), py::arg("R"), py::arg("row_stride"), py::arg("head_stride"), py::arg("T"),
        py::arg("mask"), py::arg("S"), py::arg("mask_row"), py::arg("cache_row"), py::arg("scale"), py::arg("out"),
        py::arg("threads"), py::arg("isa") = "",
        "out [N, Hq, D] = attention of q [N, Hq, D] over T columns of cache rows cache_row[j] of k and v (element "
        "(r, g, t, d) at r * row_stride + g * head_stride + t * D + d; R rows), additive mask row mask_row[j] of "
        "mask [S, T] (-inf or float's lowest hides a column), scores times scale, Hq / Hkv query heads per "
        "key/value head; a cache row's tokens consecutive. Addresses of live float32 buffers (unchecked: the "
        "caller vouches for them). isa: '' (the best this CPU runs), 'avx512', 'avx2' or 'generic'.");
  py::class_<DirectLayers>(m, "DirectLayers",
                           "Every decoder layer's parameters for DirectBlock.run: make_direct_layers(...).");
  m.def("make_direct_layers", &make_direct_layers, py::arg("C"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"),
        py::arg("I"), py::arg("norm1"), py::arg("eps1"), py::arg("norm2"), py::arg("eps2"), py::arg("tiled"),
        py::arg("bias"),
        "DirectLayers: per layer, the input / post-attention RMSNorm weights' addresses and epsilons, the "
        "tile_weight copies of q, k, v, o, gate, up, down (checked, kept alive) and their biases' addresses "
        "(0: none). Addresses unchecked (the caller vouches for them while it uses the result).");
  py::class_<DirectBlock>(m, "DirectBlock",
                          "One verification block of the direct forward (csrc/layer.h decoder_layer): "
                          "make_direct_block(...), then run(...).")
      .def("run", &DirectBlock::run, py::arg("h"), py::arg("y"), py::arg("layers"), py::arg("k_cache"),
           py::arg("v_cache"),
           "Every decoder layer in order: h [rows, C] += y (from the second layer on), ..., y = the last "
           "layer's MLP output (the add left for the final norm); k_cache, v_cache: each layer's "
           "[R, Hkv, capacity, D] buffers' addresses. Addresses unchecked (the caller vouches).");
  m.def("make_direct_block", &make_direct_block, py::arg("C"), py::arg("Hq"), py::arg("Hkv"), py::arg("D"),
        py::arg("I"), py::arg("scale"), py::arg("rows"), py::arg("cos"), py::arg("sin"), py::arg("cache_row"),
        py::arg("cache_col"), py::arg("mask_row"), py::arg("mask"), py::arg("S"), py::arg("T"), py::arg("R"),
        py::arg("capacity"), py::arg("scratch"), py::arg("threads"),
        "A DirectBlock: shapes, rotary tables cos / sin [rows, D], each token's cache row / column and mask row "
        "(checked against R, T and S), the mask [S, T], cache capacity, scratch addresses (x, q, k, v, att, "
        "gate, up) and threads. Addresses unchecked (the caller vouches for them).");
  m.def("row_stats_at", &row_stats_at, py::arg("logits"), py::arg("R"), py::arg("V"), py::arg("parent_row"),
        py::arg("tokens"), py::arg("top_k"), py::arg("threads"),
        "(argmax [R], prob [n], rank [n]) of the logits [R, V] at address `logits` (live float32 C-contiguous, "
        "unchecked: the caller vouches for it): each row's first argmax; node i's token probability in row "
        "parent_row[i] and the logits above it there, capped at top_k. n = 0: argmax alone.");
  m.def("tiled_size", &laser::tiled_size, py::arg("N"), py::arg("K"), "Floats in tile_weight's copy of an [N, K] weight.");
  m.def("tiled_isa", &laser::tiled_isa, "The kernel tiled_linear runs on this CPU: 'avx512', 'avx2' or 'generic'.");
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
      .def_property_readonly("bins", [](py::object s) { auto& t = s.cast<DraftTree&>(); return view(t.bins, {t.n}, s); })
      .def_property_readonly("mask", [](py::object s) {
        auto& t = s.cast<DraftTree&>();
        return py::array(py::dtype("bool"), {t.n, t.n}, {t.n, 1}, t.mask, s);
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

  m.def("cut_trees", &cut_trees, py::arg("trees"), py::arg("cost"), py::arg("ragged") = false,
        "Cut trees verified in one forward to their first best-first nodes. Padded (the forward is\n"
        "[rows, 1 + widest tree]): one b for all, the b that maximises sum over trees of (1 + expected\n"
        "accepted) / cost[b] (the cut draft() makes for one tree). ragged (the trees back to back): a b\n"
        "per tree, nodes taken across trees by chance, the total m maximising (rows + expected accepted)\n"
        "/ cost at m / rows nodes per row. None entries (idle rows) pass through.");

  auto state = [](const std::vector<double>& (AcceptanceModel::*get)() const) {
    return [get](const AcceptanceModel& c) {
      std::shared_lock<std::shared_mutex> lock(c.mutex());
      const std::vector<double>& v = (c.*get)();
      return py::array_t<double>(py::ssize_t(v.size()), v.data());  // a copy
    };
  };
  py::class_<AcceptanceModel>(m, "AcceptanceModel",
                          "Acceptance model of drafted nodes by (source, context length, parent count, longest, share),\n"
                          "learned from verified trees with observe(tree, accepted_path).")
      .def(py::init<double>(), py::arg("prior") = 4.0)
      .def("observe",
           [](AcceptanceModel& c, const DraftTree& t, const py::handle& path) {
             Tokens p = as_tokens(path, "path");
             py::gil_scoped_release release;
             c.observe(t, p.data(), int32_t(p.size()));
           },
           py::arg("tree"), py::arg("path"))
      .def("set_state",
           [](AcceptanceModel& c, const py::handle& hits, const py::handle& tries) {
             auto h = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(hits);
             auto t = py::array_t<double, py::array::c_style | py::array::forcecast>::ensure(tries);
             if (!h || !t || h.ndim() != 1 || t.ndim() != 1 || h.size() != AcceptanceModel::kBins || t.size() != AcceptanceModel::kBins)
               throw py::value_error("acceptance model state: hits and tries must be 1-D of length " +
                                     std::to_string(AcceptanceModel::kBins));
             c.set_state(h.data(), t.data());
           },
           py::arg("hits"), py::arg("tries"))
      .def_property_readonly("hits", state(&AcceptanceModel::hits))
      .def_property_readonly("tries", state(&AcceptanceModel::tries))
      .def_property_readonly("q", state(&AcceptanceModel::q))
      .def_property_readonly("prior", &AcceptanceModel::prior)
      .def_static("bin", &AcceptanceModel::bin, py::arg("source"), py::arg("context"), py::arg("parent_count"), py::arg("share"),
                  py::arg("longest") = true)
      .def_property_readonly_static("shape", [](py::object) {
        return py::make_tuple(AcceptanceModel::kSources, AcceptanceModel::kContexts, AcceptanceModel::kCounts, AcceptanceModel::kLongest,
                              AcceptanceModel::kShares);
      });

  py::class_<Pool> pool_cls(m, "RetrievalPool");
  pool_cls
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

  pool_cls.attr("draft") = py::reinterpret_steal<py::object>(PyDescr_NewMethod(
      reinterpret_cast<PyTypeObject*>(pool_cls.ptr()), &draft_def));
  m.attr("draft_union") = py::reinterpret_steal<py::object>(PyCFunction_NewEx(&draft_union_def, nullptr, m.attr("__name__").ptr()));
}
