// silu_mul and attention (see layer.h), written once with GCC/Clang vector types and compiled
// per instruction set, as linear_kernel.h: the including file defines LASER_ISA and VEC.
//
// Attention puts queries in vector lanes: a work item holds up to MAX_MB * VEC (token, head)
// queries of one cache row and one key/value head, so each key's element is broadcast once and
// multiplies every query of the item (keys and values are read row-major, as cached, with no
// transpose), and the softmax runs lane-wise:
//   Qt [D][L]  the item's queries, transposed, times scale (lanes past the item's are 0)
//   S  [T][L]  scores, then the softmax numerators (exactly 0 at hidden columns)
//   Ot [D][L]  outputs, transposed, then scattered to out [N, Hq, D]
// The mask is added only past the columns every token of the item sees (mask 0), which in a
// verification are all but the last few.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "layer.h"
#include "vec.h"

namespace laser {
namespace LASER_ISA {

void silu_mul(float* gate, const float* up, int64_t n) {
  const int64_t body = n / VEC * VEC;
  const fvec zero = {};
  for (int64_t i = 0; i < body; i += VEC) {
    const fvec x = load(gate + i);
    const fvec e = exp_le0(x < zero ? x : zero - x);  // e^-|x|
    // silu(x) = x / (1 + e^-x); for x < 0 as x e^x / (1 + e^x), so the exponent stays <= 0
    const fvec out = (x < zero ? x * e : x) / (1.f + e) * load(up + i);
    std::memcpy(gate + i, &out, sizeof(out));
  }
  for (int64_t i = body; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

constexpr int MAX_MB = VEC >= 16 ? 3 : 2;  // lane vectors per item: 4 keys x MB scores in registers
constexpr int ND = VEC >= 16 ? 8 : 4;      // output elements per pass: ND x MB accumulators in registers

struct Item {
  int64_t j0, nt;  // tokens [j0, j0 + nt), one cache row
  int64_t h0, nh;  // query heads [h0, h0 + nh), one key/value head; lane m: token j0 + m / nh, head h0 + m % nh
};

template <int MB>
struct Attend {
  static constexpr int L = MB * VEC;

  // S[t + i] = Qt . K[t + i] for the NK keys from t
  template <int NK>
  static void scores(const float* Qt, const float* K, int64_t D, int64_t t, float* S) {
    fvec acc[NK][MB];
    for (int i = 0; i < NK; ++i)
      for (int b = 0; b < MB; ++b) acc[i][b] = fvec{};
    for (int64_t d = 0; d < D; ++d) {
      fvec qv[MB];
      for (int b = 0; b < MB; ++b) qv[b] = load(Qt + d * L + b * VEC);
      for (int i = 0; i < NK; ++i) {
        const float kv = K[(t + i) * D + d];
        for (int b = 0; b < MB; ++b) acc[i][b] += qv[b] * kv;
      }
    }
    for (int i = 0; i < NK; ++i) std::memcpy(S + (t + i) * L, acc[i], sizeof(acc[i]));
  }

  // Ot[d0 + i] = inv * sum_t S[t] V[t, d0 + i], i < NO
  template <int NO>
  static void values(const float* S, const float* V, int64_t D, int64_t T, int64_t d0, const fvec* inv, float* Ot) {
    fvec acc[NO][MB];
    for (int i = 0; i < NO; ++i)
      for (int b = 0; b < MB; ++b) acc[i][b] = fvec{};
    for (int64_t t = 0; t < T; ++t) {
      fvec p[MB];
      for (int b = 0; b < MB; ++b) p[b] = load(S + t * L + b * VEC);
      for (int i = 0; i < NO; ++i) {
        const float vv = V[t * D + d0 + i];
        for (int b = 0; b < MB; ++b) acc[i][b] += p[b] * vv;
      }
    }
    for (int i = 0; i < NO; ++i)
      for (int b = 0; b < MB; ++b) {
        const fvec o = acc[i][b] * inv[b];
        std::memcpy(Ot + (d0 + i) * L + b * VEC, &o, sizeof(o));
      }
  }

  static void run(const Item& it, const float* q, int64_t Hq, int64_t D, const float* K, const float* V, int64_t T,
                  const float* mask, const int64_t* mask_row, float scale, float* out, std::vector<float>& buf) {
    const int64_t live = it.nt * it.nh;
    buf.assign((2 * D + T) * L, 0.f);
    float* Qt = buf.data();
    float* S = Qt + D * L;
    float* Ot = S + T * L;
    for (int64_t m = 0; m < live; ++m) {
      const float* src = q + ((it.j0 + m / it.nh) * Hq + it.h0 + m % it.nh) * D;
      for (int64_t d = 0; d < D; ++d) Qt[d * L + m] = src[d] * scale;
    }
    // Columns [end, T) are hidden from every token of the item (mask -inf or the lowest float:
    // a causal prefill's later keys): their weight would be exactly 0, so they are skipped.
    int64_t end = 0;
    for (int64_t a = 0; a < it.nt; ++a) {
      const float* row = mask + mask_row[it.j0 + a] * T;
      int64_t c = T;
      while (c > end && row[c - 1] <= std::numeric_limits<float>::lowest()) --c;
      end = c;
    }
    int64_t t = 0;
    for (; t + 4 <= end; t += 4) scores<4>(Qt, K, D, t, S);
    for (; t < end; ++t) scores<1>(Qt, K, D, t, S);
    int64_t seen = end;  // columns [0, seen) have mask 0 for every token of the item
    for (int64_t a = 0; a < it.nt; ++a) {
      const float* row = mask + mask_row[it.j0 + a] * T;
      int64_t c = 0;
      while (c < seen && row[c] == 0.f) ++c;
      seen = c;
    }
    for (int64_t c = seen; c < end; ++c)
      for (int64_t m = 0; m < live; ++m) S[c * L + m] += mask[mask_row[it.j0 + m / it.nh] * T + c];
    fvec mx[MB], sum[MB], inv[MB];
    for (int b = 0; b < MB; ++b) mx[b] = fvec{} + std::numeric_limits<float>::lowest(), sum[b] = fvec{};
    for (int64_t c = 0; c < end; ++c)
      for (int b = 0; b < MB; ++b) {
        const fvec s = load(S + c * L + b * VEC);
        mx[b] = s > mx[b] ? s : mx[b];
      }
    const fvec floor = fvec{} - 87.f, zero = {};
    for (int64_t c = 0; c < end; ++c)
      for (int b = 0; b < MB; ++b) {
        const fvec x = load(S + c * L + b * VEC) - mx[b];
        const fvec p = x < floor ? zero : exp_le0(x);  // hidden columns (mask -inf or lowest) weigh exactly 0
        std::memcpy(S + c * L + b * VEC, &p, sizeof(p));
        sum[b] += p;
      }
    for (int b = 0; b < MB; ++b) inv[b] = 1.f / sum[b];
    int64_t d0 = 0;
    for (; d0 + ND <= D; d0 += ND) values<ND>(S, V, D, end, d0, inv, Ot);
    for (; d0 < D; ++d0) values<1>(S, V, D, end, d0, inv, Ot);
    for (int64_t m = 0; m < live; ++m) {
      float* dst = out + ((it.j0 + m / it.nh) * Hq + it.h0 + m % it.nh) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = Ot[d * L + m];
    }
  }
};

void attention(const float* q, int64_t N, int64_t Hq, int64_t D, const float* k, const float* v, int64_t Hkv,
               int64_t row_stride, int64_t head_stride, int64_t T, const float* mask, const int64_t* mask_row,
               const int64_t* cache_row, float scale, float* out, int threads) {
  const int64_t G = Hq / Hkv, lanes = MAX_MB * VEC;
  const int64_t nh = std::min(G, lanes), per = std::max<int64_t>(1, lanes / nh);  // heads, tokens per item
  std::vector<Item> items;
  for (int64_t a = 0; a < N;) {  // each cache row's run of tokens, in chunks of at most `per`
    int64_t b = a + 1;
    while (b < N && cache_row[b] == cache_row[a]) ++b;
    const int64_t chunks = (b - a + per - 1) / per, size = (b - a + chunks - 1) / chunks;
    for (int64_t j = a; j < b; j += size)
      for (int64_t g = 0; g < Hkv; ++g)
        for (int64_t h = g * G; h < (g + 1) * G; h += nh)
          items.push_back({j, std::min(size, b - j), h, std::min(nh, (g + 1) * G - h)});
    a = b;
  }
  using Run = void (*)(const Item&, const float*, int64_t, int64_t, const float*, const float*, int64_t,
                       const float*, const int64_t*, float, float*, std::vector<float>&);
  static constexpr Run by_mb[] = {Attend<1>::run, Attend<2>::run, Attend<MAX_MB>::run};
  static_assert(MAX_MB == 2 || MAX_MB == 3, "by_mb lists MB = 1 ... MAX_MB");
#pragma omp parallel num_threads(threads)
  {
    std::vector<float> buf;
#pragma omp for schedule(dynamic, 1)
    for (size_t i = 0; i < items.size(); ++i) {
      const Item& it = items[i];
      const int64_t off = cache_row[it.j0] * row_stride + it.h0 / G * head_stride;
      const int64_t mb = (it.nt * it.nh + VEC - 1) / VEC;
      by_mb[mb - 1](it, q, Hq, D, k + off, v + off, T, mask, mask_row, scale, out, buf);
    }
  }
}

}  // namespace LASER_ISA
}  // namespace laser
