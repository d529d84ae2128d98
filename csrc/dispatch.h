// LASER_DISPATCH(isa, f(args)): return the per-ISA build of f for `isa` (a std::string: "" = the
// best this CPU runs, the tiled product's choice, linear.h; else "avx512", "avx2" or "generic",
// std::invalid_argument if the CPU lacks it). The including file declares avx512::f and avx2::f
// where LASER_X86_KERNELS builds them, and generic::f.
#pragma once

#include <stdexcept>
#include <string>

#include "linear.h"

#if defined(__x86_64__) && defined(LASER_X86_KERNELS)
#define LASER_DISPATCH(isa, call)                                                                     \
  do {                                                                                                \
    static const std::string best = laser::tiled_isa();                                               \
    const std::string& use = (isa).empty() ? best : (isa);                                            \
    if (!laser::cpu_runs(use)) throw std::invalid_argument("this CPU cannot run the '" + use + "' kernel"); \
    if (use == "avx512") return avx512::call;                                                         \
    if (use == "avx2") return avx2::call;                                                             \
    return generic::call;                                                                             \
  } while (0)
#else
#define LASER_DISPATCH(isa, call)                                                                     \
  do {                                                                                                \
    if (!(isa).empty() && (isa) != "generic")                                                         \
      throw std::invalid_argument("this CPU cannot run the '" + std::string(isa) + "' kernel");      \
    return generic::call;                                                                             \
  } while (0)
#endif
