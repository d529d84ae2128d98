// Dispatch and weight tiling of the tiled product (linear.h).
#define LASER_ISA generic  // SSE2 on x86-64: 16 registers, one row per pass
#define VEC 4
#define MAX_ROWS 1
#include <stdexcept>

#include "linear_kernel.h"

namespace laser {

#if defined(__x86_64__) && defined(LASER_X86_KERNELS)
namespace avx512 {
void linear(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int);
}
namespace avx2 {
void linear(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*, int);
}
bool cpu_runs(const std::string& isa) {
  if (isa == "avx512") return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma");
  if (isa == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return isa == "generic";
}
#else
bool cpu_runs(const std::string& isa) { return isa == "generic"; }
#endif

std::string tiled_isa() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_runs(isa)) return isa;
  return "generic";
}

void tile_weight(const float* w, int64_t N, int64_t K, float* out, int threads) {
  const int64_t nb = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t j = 0; j < TILE; ++j) {
      const int64_t n = b * TILE + j;
      float* dst = out + b * TILE * K + j;
      for (int64_t k = 0; k < K; ++k) dst[k * TILE] = n < N ? w[n * K + k] : 0.f;
    }
}

void tiled_linear(const float* x, int64_t M, int64_t K, const float* tiled, int64_t N, const float* bias, float* y,
                  int threads, const std::string& isa) {
  static const std::string best = tiled_isa();
  const std::string& use = isa.empty() ? best : isa;
  if (!cpu_runs(use)) throw std::invalid_argument("tiled_linear: this CPU cannot run the '" + use + "' kernel");
  if (M < 0 || K < 1 || N < 1 || threads < 1) throw std::invalid_argument("tiled_linear: needs M >= 0, K, N, threads >= 1");
#if defined(__x86_64__) && defined(LASER_X86_KERNELS)
  if (use == "avx512") return avx512::linear(x, M, K, tiled, N, bias, y, threads);
  if (use == "avx2") return avx2::linear(x, M, K, tiled, N, bias, y, threads);
#endif
  generic::linear(x, M, K, tiled, N, bias, y, threads);
}

}  // namespace laser
