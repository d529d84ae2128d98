// The CPU kernels for AVX2 (built with -mavx2 -mfma): the tiled product (16 registers, 3 rows
// per pass), row_stats and the direct forward's silu_mul and attention.
#define LASER_ISA avx2
#define VEC 8
#define MAX_ROWS 3
#include "linear_kernel.h"
#include "accept_kernel.h"
#include "layer_kernel.h"
