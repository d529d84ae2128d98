// row_stats' kernel (see accept.h), written once with GCC/Clang vector types and compiled
// per instruction set, as linear_kernel.h: the including file defines LASER_ISA and VEC.
#include <cmath>
#include <cstring>
#include <vector>

#include "accept.h"
#include "vec.h"

namespace laser {
namespace LASER_ISA {

static void one_row(const float* x, int64_t V, bool lse_too, int64_t* argmax, float* lse) {
  const int64_t body = V / VEC * VEC;
  int64_t best = 0;
  float m = x[0];
  if (body) {  // per lane: its largest value and first index of it
    fvec mv = load(x);
    ivec iv = {}, lane = {};
    for (int l = 0; l < VEC; ++l) lane[l] = l;
    iv = lane;
    for (int64_t j = VEC; j < body; j += VEC) {
      const fvec v = load(x + j);
      const ivec up = v > mv;
      mv = up ? v : mv;
      iv = up ? lane + int32_t(j) : iv;
    }
    m = mv[0], best = iv[0];
    for (int l = 1; l < VEC; ++l)
      if (mv[l] > m || (mv[l] == m && iv[l] < best)) m = mv[l], best = iv[l];
  }
  for (int64_t j = body; j < V; ++j)
    if (x[j] > m) m = x[j], best = j;
  *argmax = best;
  if (!lse_too) return;
  fvec s = {};
  const fvec mm = fvec{} + m;
  for (int64_t j = 0; j < body; j += VEC) s += exp_le0(load(x + j) - mm);
  float sum = 0.f;
  for (int l = 0; l < VEC; ++l) sum += s[l];
  for (int64_t j = body; j < V; ++j) sum += std::exp(x[j] - m);
  *lse = m + std::log(sum);
}

static int64_t count_above(const float* x, int64_t V, float t) {
  const int64_t body = V / VEC * VEC;
  ivec c = {};
  const fvec tv = fvec{} + t;
  for (int64_t j = 0; j < body; j += VEC) c -= (ivec)(load(x + j) > tv);  // true is -1
  int64_t out = 0;
  for (int l = 0; l < VEC; ++l) out += c[l];
  for (int64_t j = body; j < V; ++j) out += x[j] > t;
  return out;
}

void row_stats(const float* logits, int64_t R, int64_t V, const int64_t* parent_row, const int64_t* tokens, int64_t n,
               int64_t top_k, int64_t* argmax, float* prob, int64_t* rank, int threads) {
  std::vector<char> parent(R, 0);
  for (int64_t i = 0; i < n; ++i) parent[parent_row[i]] = 1;
  std::vector<float> lse(R, 0.f);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t r = 0; r < R; ++r) one_row(logits + r * V, V, parent[r], argmax + r, lse.data() + r);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) {
    const float* x = logits + parent_row[i] * V;
    const float t = x[tokens[i]];
    prob[i] = std::exp(t - lse[parent_row[i]]);
    const int64_t above = count_above(x, V, t);
    rank[i] = above < top_k ? above : top_k;
  }
}

}  // namespace LASER_ISA
}  // namespace laser
