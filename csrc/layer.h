// The elementwise steps of a Llama-architecture decoder layer on a CPU, for the direct
// forward (laser/forward.py), fp32, C-contiguous, in place where noted:
//   add_rms_norm: h[r] += y[r] (y may be null), out[r] = w * (h[r] * 1 / sqrt(mean(h[r]^2) + eps))
//   rope:         x [rows, heads, D], each head rotated by its row's cos/sin [rows, D]:
//                 x[j] * cos[j] - x[j + D/2] * sin[j]            (j < D/2)
//                 x[j] * cos[j] + x[j - D/2] * sin[j]            (j >= D/2)
// transformers' x * cos + rotate_half(x) * sin. Results equal torch's up to fp32 rounding
// (the norm's sum runs in another order). One thread: rows x hidden is small in a
// verification (1 + a tree, a few rows of it).
#pragma once

#include <cstdint>

namespace laser {

void add_rms_norm(float* h, const float* y, int64_t rows, int64_t C, const float* w, float eps, float* out);

void rope(float* x, int64_t rows, int64_t heads, int64_t D, const float* cos, const float* sin);

}  // namespace laser
