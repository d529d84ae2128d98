#include "layer.h"

#include <cmath>

namespace laser {

void add_rms_norm(float* h, const float* y, int64_t rows, int64_t C, const float* w, float eps, float* out) {
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

void rope(float* x, int64_t rows, int64_t heads, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
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

}  // namespace laser
