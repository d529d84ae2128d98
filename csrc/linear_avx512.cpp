// The CPU kernels for AVX-512 (built with -mavx512f -mfma): the tiled product (32 registers,
// 14 rows per pass), row_stats and the direct forward's silu_mul and attention.
#define LASER_ISA avx512
#define VEC 16
#define MAX_ROWS 14
#include "linear_kernel.h"
#include "accept_kernel.h"
#include "layer_kernel.h"
