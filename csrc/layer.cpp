// The scalar layer steps, and dispatch of the vectorised ones (layer_kernel.h) with their plain
// build (SSE2 on x86-64, any CPU elsewhere).
#define LASER_ISA generic
#define VEC 4
#include <algorithm>
#include <cmath>
#include <cstring>

#include "layer.h"
#include "layer_kernel.h"
#include "dispatch.h"

namespace laser {

#if defined(__x86_64__) && defined(LASER_X86_KERNELS)
namespace avx512 {
void silu_mul(float*, const float*, int64_t);
void attention(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
               const float*, const int64_t*, const int64_t*, float, float*, int);
}
namespace avx2 {
void silu_mul(float*, const float*, int64_t);
void attention(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t, int64_t,
               const float*, const int64_t*, const int64_t*, float, float*, int);
}
#endif

namespace {
void silu_mul_on(float* gate, const float* up, int64_t n, const std::string& isa) {
  LASER_DISPATCH(isa, silu_mul(gate, up, n));
}
int threads_for(int64_t elements, int threads) { return elements >= PARALLEL_MIN ? std::max(threads, 1) : 1; }
}  // namespace

void silu_mul(float* gate, const float* up, int64_t n, const std::string& isa, int threads) {
  const int t = threads_for(n, threads);
  silu_mul_on(gate, up, 0, isa);  // an ISA this CPU lacks throws here, not inside the parallel region
  const int64_t chunk = (n / t + 63) / 64 * 64;  // whole vectors per thread
#pragma omp parallel for schedule(static) num_threads(t)
  for (int i = 0; i < t; ++i) {
    const int64_t a = std::min(n, i * chunk), b = std::min(n, a + chunk);
    silu_mul_on(gate + a, up + a, b - a, isa);
  }
}

void attention(const float* q, int64_t N, int64_t Hq, int64_t D, const float* k, const float* v, int64_t Hkv,
               int64_t row_stride, int64_t head_stride, int64_t T, const float* mask, const int64_t* mask_row,
               const int64_t* cache_row, float scale, float* out, int threads, const std::string& isa) {
  LASER_DISPATCH(isa, attention(q, N, Hq, D, k, v, Hkv, row_stride, head_stride, T, mask, mask_row, cache_row, scale, out,
                           threads));
}

void add_rms_norm(float* h, const float* y, int64_t rows, int64_t C, const float* w, float eps, float* out, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * C, threads))
  for (int64_t r = 0; r < rows; ++r) {
    float* x = h + r * C;
    if (y) {
      const float* d = y + r * C;
      for (int64_t j = 0; j < C; ++j) x[j] += d[j];
    }
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < C; ++j) ss += x[j] * x[j];
    const float inv = 1.f / std::sqrt(ss / float(C) + eps);
    float* o = out + r * C;
    for (int64_t j = 0; j < C; ++j) o[j] = w[j] * (x[j] * inv);
  }
}

void rope(float* x, int64_t rows, int64_t heads, int64_t D, const float* cos, const float* sin, int threads) {
  const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * heads * D, threads))
  for (int64_t r = 0; r < rows; ++r) {
    const float* c = cos + r * D;
    const float* s = sin + r * D;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * D;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j], b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j + half] + a * s[j + half];
      }
    }
  }
}

void decoder_layer(float* h, float* y, bool pending, const LayerWeights& w, const LayerBlock& b, float* k_cache,
                   float* v_cache) {
  const int64_t R = b.rows, C = b.C, Q = b.Hq * b.D, KV = b.Hkv * b.D;
  add_rms_norm(h, pending ? y : nullptr, R, C, w.norm[0], w.eps[0], b.x, b.threads);
  tiled_linear(b.x, R, C, w.tiled[0], Q, w.bias[0], b.q, b.threads);
  tiled_linear(b.x, R, C, w.tiled[1], KV, w.bias[1], b.k, b.threads);
  tiled_linear(b.x, R, C, w.tiled[2], KV, w.bias[2], b.v, b.threads);
  rope(b.q, R, b.Hq, b.D, b.cos, b.sin, b.threads);
  rope(b.k, R, b.Hkv, b.D, b.cos, b.sin, b.threads);
  for (int64_t j = 0; j < R; ++j)
    for (int64_t g = 0; g < b.Hkv; ++g) {
      const int64_t at = b.cache_row[j] * b.row_stride + g * b.head_stride + b.cache_col[j] * b.D;
      std::memcpy(k_cache + at, b.k + (j * b.Hkv + g) * b.D, b.D * sizeof(float));
      std::memcpy(v_cache + at, b.v + (j * b.Hkv + g) * b.D, b.D * sizeof(float));
    }
  attention(b.q, R, b.Hq, b.D, k_cache, v_cache, b.Hkv, b.row_stride, b.head_stride, b.T, b.mask, b.mask_row,
            b.cache_row, b.scale, b.att, b.threads);
  tiled_linear(b.att, R, Q, w.tiled[3], C, w.bias[3], y, b.threads);
  add_rms_norm(h, y, R, C, w.norm[1], w.eps[1], b.x, b.threads);
  tiled_linear(b.x, R, C, w.tiled[4], b.I, w.bias[4], b.gate, b.threads);
  tiled_linear(b.x, R, C, w.tiled[5], b.I, w.bias[5], b.up, b.threads);
  silu_mul(b.gate, b.up, R * b.I, "", b.threads);
  tiled_linear(b.gate, R, b.I, w.tiled[6], C, w.bias[6], y, b.threads);
}

}  // namespace laser
