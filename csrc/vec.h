// Vector helpers shared by the per-ISA CPU kernels (accept_kernel.h, layer_kernel.h): GCC/Clang
// vector types of VEC floats, in the namespace LASER_ISA that the including file defines.
#pragma once

#include <cstdint>
#include <cstring>

namespace laser {
namespace LASER_ISA {

typedef float fvec __attribute__((vector_size(VEC * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(VEC * sizeof(int32_t))));

static inline fvec load(const float* p) {
  fvec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// e^x for x <= 0: 2^n * e^f, n = round(x / ln 2), |f| <= ln 2 / 2, e^f by its Taylor
// polynomial to f^6 (relative error < 2e-7); x below -87 gives ~e^-87 (not 0).
static inline fvec exp_le0(fvec x) {
  const fvec lo = fvec{} - 87.f;
  x = x < lo ? lo : x;
  const fvec shift = fvec{} + 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer
  const fvec n = (x * 1.44269504f + shift) - shift;
  const fvec f = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts
  fvec p = fvec{} + 1.f / 720;
  p = p * f + 1.f / 120;
  p = p * f + 1.f / 24;
  p = p * f + 1.f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.f;
  p = p * f + 1.f;
  const ivec e = __builtin_convertvector(n, ivec) << 23;  // 2^n into the exponent bits
  return (fvec)((ivec)p + e);
}

}  // namespace LASER_ISA
}  // namespace laser
