// The steps of a Llama-architecture decoder layer on a CPU, for the direct forward
// (laser/forward.py), fp32, C-contiguous, in place where noted:
//   add_rms_norm: h[r] += y[r] (y may be null), out[r] = w * (h[r] * 1 / sqrt(mean(h[r]^2) + eps))
//   rope:         x [rows, heads, D], each head rotated by its row's cos/sin [rows, D]:
//                 x[j] * cos[j] - x[j + D/2] * sin[j]            (j < D/2)
//                 x[j] * cos[j] + x[j - D/2] * sin[j]            (j >= D/2)
//                 (transformers' x * cos + rotate_half(x) * sin)
//   silu_mul:     gate[i] = silu(gate[i]) * up[i], i < n (the MLP's act_fn(gate) * up)
//   attention:    a forward's tokens over the KV cache, grouped-query heads (G = Hq / Hkv):
//                 out[j, h] = sum_t softmax_t(scale * q[j, h] . K[c_j, h / G, t] + mask[m_j, t]) V[c_j, h / G, t]
//                 q, out [N, Hq, D]; K and V hold cache rows, element (r, g, t, d) at
//                 r * row_stride + g * head_stride + t * D + d; T columns; mask [*, T] additive
//                 (a column at -inf or float's lowest is hidden: weight exactly 0, and the columns past
//                 the last one a chunk of tokens sees, as in a causal prefill, are not computed);
//                 c_j = cache_row[j], m_j = mask_row[j]; a cache row's tokens are consecutive.
//   decoder_layer: one whole layer of a verification whose products all run tiled (linear.h):
//                 h += y (when pending); x = rms1(h); q, k, v = x Wq, x Wk, x Wv (+ biases);
//                 rope(q), rope(k); k, v into cache row cache_row[j], column cache_col[j];
//                 att = attention(q); y = att Wo; h += y; x = rms2(h);
//                 y = (silu(x Wgate) * (x Wup)) Wdown, the add pending for the next layer (or the final norm)
// Results equal torch's up to fp32 rounding (sums in another order; exp and silu through a
// polynomial, ~1 ulp). add_rms_norm, rope and silu_mul split their rows (silu_mul: elements)
// over `threads` OpenMP threads from PARALLEL_MIN elements on: below it the team's start costs
// about what it saves (AMD EPYC VM, SmolLM2's MLP at 2 rows, 3,072 elements: silu_mul 2.1 us on
// 2 threads against 2.9 on one; at 309 rows 168 against 347). silu_mul and attention are
// compiled per instruction set (layer_kernel.h), attention's threads OpenMP over (token chunk,
// key/value head) items.
#pragma once

#include <cstdint>
#include <string>

namespace laser {

constexpr int64_t PARALLEL_MIN = 1 << 11;

void add_rms_norm(float* h, const float* y, int64_t rows, int64_t C, const float* w, float eps, float* out,
                  int threads = 1);

void rope(float* x, int64_t rows, int64_t heads, int64_t D, const float* cos, const float* sin, int threads = 1);

// isa (silu_mul, attention): "" = the best this CPU runs, else as tiled_linear's (linear.h).
void silu_mul(float* gate, const float* up, int64_t n, const std::string& isa = "", int threads = 1);

// One layer's parameters: RMSNorm weights [C] and epsilons (input, post-attention), and the
// q, k, v, o, gate, up, down products as tile_weight copies with their biases (null: none).
struct LayerWeights {
  const float* norm[2];
  float eps[2];
  const float* tiled[7];
  const float* bias[7];
};

// One verification block, the same for every layer: shapes (hidden C, heads Hq / Hkv of D, MLP I),
// its rows tokens with their rotary tables [rows, D], cache slots and mask rows, the mask [*, T],
// the cache buffers' strides, and scratch buffers (x [rows, C], q and att [rows, Hq * D], k and v
// [rows, Hkv * D], gate and up [rows, I]).
struct LayerBlock {
  int64_t C, Hq, Hkv, D, I;
  float scale;
  int64_t rows;
  const float *cos, *sin;
  const int64_t *cache_row, *cache_col, *mask_row;
  const float* mask;
  int64_t T, row_stride, head_stride;
  float *x, *q, *k, *v, *att, *gate, *up;
  int threads;
};

// h [rows, C], y [rows, C] (see above); k_cache / v_cache: this layer's buffers.
void decoder_layer(float* h, float* y, bool pending, const LayerWeights& w, const LayerBlock& b, float* k_cache,
                   float* v_cache);

void attention(const float* q, int64_t N, int64_t Hq, int64_t D, const float* k, const float* v, int64_t Hkv,
               int64_t row_stride, int64_t head_stride, int64_t T, const float* mask, const int64_t* mask_row,
               const int64_t* cache_row, float scale, float* out, int threads, const std::string& isa = "");

}  // namespace laser
