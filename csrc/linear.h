// LASER's fp32 product for the few rows of a verification forward on a CPU:
//   y[M, N] = x[M, K] @ w[N, K]^T (+ bias[N])
// over a tiled copy of the weight, made once per weight (tile_weight):
//   tiled[b][k][j] = w[b * TILE + j][k]  for b < ceil(N / TILE), j < TILE (0 past N),
// so one pass streams every weight element once, TILE output features at a time, while up
// to MAX_ROWS rows of x (kept in L1) multiply each loaded vector; more rows take further
// passes, the block then coming from L2. At 1-16 rows the product is bound by the weight's
// stream from memory, not by arithmetic.
//
// No Python types here (pointer + length in); bindings.cpp converts. Threads: OpenMP over
// the weight's blocks, `threads` of them (the caller passes torch's count, so both share
// one team). The kernel is compiled for AVX-512, AVX2 and plain x86-64 / any CPU
// (linear_kernel.h, one translation unit each) and picked at run time by what the CPU has.
#pragma once

#include <cstdint>
#include <string>

namespace laser {

constexpr int64_t TILE = 32;  // output features per block (two AVX-512 vectors)

// Floats in the tiled copy of an [N, K] weight.
inline int64_t tiled_size(int64_t N, int64_t K) { return (N + TILE - 1) / TILE * TILE * K; }

// w [N, K] row-major -> out [tiled_size(N, K)] (threads: OpenMP over blocks).
void tile_weight(const float* w, int64_t N, int64_t K, float* out, int threads);

// y [M, N] = x [M, K] @ w^T + bias (bias may be null); `tiled` from tile_weight.
// isa: "" = the best this CPU runs, else "avx512", "avx2" or "generic" (std::invalid_argument
// if the CPU lacks it).
void tiled_linear(const float* x, int64_t M, int64_t K, const float* tiled, int64_t N, const float* bias, float* y,
                  int threads, const std::string& isa = "");

// The kernel tiled_linear("") runs on this CPU: "avx512", "avx2" or "generic".
std::string tiled_isa();

// Whether this CPU runs the kernels built for `isa` ("avx512", "avx2", "generic"; false for others).
bool cpu_runs(const std::string& isa);

}  // namespace laser
