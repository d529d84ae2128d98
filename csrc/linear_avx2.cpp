// The tiled kernel for AVX2 (built with -mavx2 -mfma): 16 registers, 3 rows per pass.
#define LASER_ISA avx2
#define VEC 8
#define MAX_ROWS 3
#include "linear_kernel.h"
