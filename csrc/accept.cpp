// Dispatch of row_stats (accept.h) and its plain build (SSE2 on x86-64, any CPU elsewhere).
#define LASER_ISA generic
#define VEC 4
#include "accept_kernel.h"
#include "dispatch.h"

namespace laser {

#if defined(__x86_64__) && defined(LASER_X86_KERNELS)
namespace avx512 {
void row_stats(const float*, int64_t, int64_t, const int64_t*, const int64_t*, int64_t, int64_t, int64_t*, float*,
               int64_t*, int);
}
namespace avx2 {
void row_stats(const float*, int64_t, int64_t, const int64_t*, const int64_t*, int64_t, int64_t, int64_t*, float*,
               int64_t*, int);
}
#endif

void row_stats(const float* logits, int64_t R, int64_t V, const int64_t* parent_row, const int64_t* tokens, int64_t n,
               int64_t top_k, int64_t* argmax, float* prob, int64_t* rank, int threads) {
  LASER_DISPATCH(std::string(), row_stats(logits, R, V, parent_row, tokens, n, top_k, argmax, prob, rank, threads));
}

}  // namespace laser
