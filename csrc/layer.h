// The steps of a Llama-architecture decoder layer on a CPU, for the direct forward
// (laser/forward.py), fp32, C-contiguous, in place where noted:
//   add_rms_norm: h[r] += y[r] (y may be null), out[r] = w * (h[r] * 1 / sqrt(mean(h[r]^2) + eps))
//   rope:         x [rows, heads, D], each head rotated by its row's cos/sin [rows, D]:
//                 x[j] * cos[j] - x[j + D/2] * sin[j]            (j < D/2)
//                 x[j] * cos[j] + x[j - D/2] * sin[j]            (j >= D/2)
//                 (transformers' x * cos + rotate_half(x) * sin)
//   silu_mul:     gate[i] = silu(gate[i]) * up[i], i < n (the MLP's act_fn(gate) * up)
//   attention:    a verification's tokens over the KV cache, grouped-query heads (G = Hq / Hkv):
//                 out[j, h] = sum_t softmax_t(scale * q[j, h] . K[c_j, h / G, t] + mask[m_j, t]) V[c_j, h / G, t]
//                 q, out [N, Hq, D]; K and V hold cache rows, element (r, g, t, d) at
//                 r * row_stride + g * head_stride + t * D + d; T columns; mask [*, T] additive
//                 (a column at -inf or float's lowest is hidden: weight exactly 0); c_j = cache_row[j],
//                 m_j = mask_row[j]; a cache row's tokens are consecutive (its block).
// Results equal torch's up to fp32 rounding (sums in another order; exp and silu through a
// polynomial, ~1 ulp). add_rms_norm and rope run on one thread (rows x hidden is small in a
// verification); silu_mul and attention are compiled per instruction set (layer_kernel.h),
// attention's threads OpenMP over (token chunk, key/value head) items.
#pragma once

#include <cstdint>

namespace laser {

void add_rms_norm(float* h, const float* y, int64_t rows, int64_t C, const float* w, float eps, float* out);

void rope(float* x, int64_t rows, int64_t heads, int64_t D, const float* cos, const float* sin);

void silu_mul(float* gate, const float* up, int64_t n);

void attention(const float* q, int64_t N, int64_t Hq, int64_t D, const float* k, const float* v, int64_t Hkv,
               int64_t row_stride, int64_t head_stride, int64_t T, const float* mask, const int64_t* mask_row,
               const int64_t* cache_row, float scale, float* out, int threads);

}  // namespace laser
