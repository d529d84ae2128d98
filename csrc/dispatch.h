// LASER_DISPATCH(f(args)): return the per-ISA build of f that this CPU runs (the tiled product's
// choice, linear.h: avx512, avx2, else generic). The including file declares avx512::f and
// avx2::f where LASER_X86_KERNELS builds them, and generic::f.
#pragma once

#include <string>

#include "linear.h"

#if defined(__x86_64__) && defined(LASER_X86_KERNELS)
#define LASER_DISPATCH(call)                                \
  do {                                                      \
    static const std::string best = laser::tiled_isa();     \
    if (best == "avx512") return avx512::call;              \
    if (best == "avx2") return avx2::call;                  \
    return generic::call;                                   \
  } while (0)
#else
#define LASER_DISPATCH(call) return generic::call
#endif
