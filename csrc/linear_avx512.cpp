// The tiled kernel for AVX-512 (built with -mavx512f -mfma): 32 registers, 12 rows per pass.
#define LASER_ISA avx512
#define VEC 16
#define MAX_ROWS 12
#include "linear_kernel.h"
