// The tiled product's kernel (see linear.h), written once with GCC/Clang vector types and
// compiled per instruction set: each including file defines LASER_ISA (a namespace name),
// VEC (floats per register: 16 AVX-512, 8 AVX2, 4 SSE) and MAX_ROWS (rows per pass: as
// many as keep MAX_ROWS * TILE / VEC accumulators in registers) and is built with that
// ISA's flags (CMakeLists.txt). Nothing escapes its namespace, so the builds never mix.
#include <algorithm>
#include <cstring>
#include <utility>

#include "linear.h"

namespace laser {
namespace LASER_ISA {

typedef float vec __attribute__((vector_size(VEC * sizeof(float))));  // one register
constexpr int NV = TILE / VEC;  // registers per row of a block
static_assert(TILE % VEC == 0, "a block is whole registers");
constexpr int64_t LINE = 64 / sizeof(float);                  // floats per cache line
constexpr int64_t AHEAD_K = 4096 / (TILE * sizeof(float));   // prefetch distance: 4 KiB of weight

// One block of TILE output features for R rows: y[r, n0 : n0 + TILE] (clipped at N).
template <int R>
static void block(const float* x, int64_t K, const float* wb, float* y, int64_t N, int64_t n0, const float* bias) {
  vec acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = vec{};
  for (int64_t k = 0; k < K; ++k) {
    // The weight AHEAD_K steps (4 KiB) on, into L1 (past the block's end: the next block, the
    // same thread's next): without it loads wait on memory and FMAs on loads, and 9 rows cost
    // 1.7x one row on the Intel Xeon VM; with it 1.2x, and one row streams 10-20% faster.
    for (int64_t c = 0; c < TILE; c += LINE) __builtin_prefetch(wb + (k + AHEAD_K) * TILE + c, 0, 3);
    // The same FMAs in either order; the one with fewer registers live besides the R * NV
    // accumulators: NV weight vectors + 1 broadcast of x (row by row, AVX-512 at 14 rows: 31
    // of 32), or 1 weight vector + R broadcasts (vector by vector, AVX2 at 3 rows: 16 of 16).
    if constexpr (NV < R) {
      vec w[NV];
      for (int v = 0; v < NV; ++v) std::memcpy(&w[v], wb + k * TILE + v * VEC, sizeof(vec));
      for (int r = 0; r < R; ++r) {
        const float xr = x[r * K + k];
        for (int v = 0; v < NV; ++v) acc[r][v] += w[v] * xr;
      }
    } else {
      for (int v = 0; v < NV; ++v) {
        vec w;
        std::memcpy(&w, wb + k * TILE + v * VEC, sizeof(vec));
        for (int r = 0; r < R; ++r) acc[r][v] += w * x[r * K + k];
      }
    }
  }
  const int64_t width = std::min<int64_t>(TILE, N - n0);
  for (int r = 0; r < R; ++r) {
    float out[TILE];
    std::memcpy(out, acc[r], sizeof(out));
    if (bias)
      for (int64_t j = 0; j < width; ++j) out[j] += bias[n0 + j];
    std::memcpy(y + r * N + n0, out, width * sizeof(float));
  }
}

template <int... R>
struct Blocks {
  using fn = void (*)(const float*, int64_t, const float*, float*, int64_t, int64_t, const float*);
  static constexpr fn table[] = {nullptr, block<R>...};  // table[r]: r rows
};

template <int... I>
static constexpr auto blocks_upto(std::integer_sequence<int, I...>) { return Blocks<(I + 1)...>{}; }

void linear(const float* x, int64_t M, int64_t K, const float* tiled, int64_t N, const float* bias, float* y,
            int threads) {
  using B = decltype(blocks_upto(std::make_integer_sequence<int, MAX_ROWS>{}));
  const int64_t nb = (N + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) {
      const int r = static_cast<int>(std::min<int64_t>(MAX_ROWS, M - m0));
      B::table[r](x + m0 * K, K, tiled + b * TILE * K, y + m0 * N, N, b * TILE, bias);
    }
}

}  // namespace LASER_ISA
}  // namespace laser
