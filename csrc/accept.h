// Relaxed acceptance's per-row statistics on a CPU, in one pass per logits row:
//   argmax[r]  first index of row r's largest logit (r < R), as torch.argmax
//   prob[i]    softmax probability of tokens[i] in row parent_row[i]      (i < n)
//   rank[i]    logits of that row strictly above the token's, capped at top_k
// logits [R, V] float32 row-major. n = 0 computes argmax alone (strict mode). The exp is a
// polynomial (~1 ulp), so prob equals torch's up to fp32 rounding; argmax and rank are exact.
// Threads: OpenMP over rows, then over nodes. Compiled per instruction set like the tiled
// product (accept_kernel.h), picked at run time.
#pragma once

#include <cstdint>

namespace laser {

void row_stats(const float* logits, int64_t R, int64_t V, const int64_t* parent_row, const int64_t* tokens, int64_t n,
               int64_t top_k, int64_t* argmax, float* prob, int64_t* rank, int threads);

}  // namespace laser
