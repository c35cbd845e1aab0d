// neuron_stats: GRIFFIN's per-neuron statistic (docs/method.md), summed into an fp32 [B, D] buffer.
// Two passes over h: per-token norms (parallel over tokens), then the per-neuron sums (parallel over
// column blocks, each owned by one thread: no atomics, deterministic for a fixed thread count... and
// in fact for any thread count, since every out[b, i] is summed over tokens in token order).
#include <vector>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace {

template <class W>
static float token_norm(const W* h, const float* dn, int64_t D) {
  // 8 partial sums: a long fp32 sum loses less precision and the loop vectorises.
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  if (dn) {
    for (; i + 8 <= D; i += 8)
      for (int j = 0; j < 8; ++j) {
        const float v = to_f32(h[i + j]) * dn[i + j];
        s[j] += v * v;
      }
    for (; i < D; ++i) {
      const float v = to_f32(h[i]) * dn[i];
      s[0] += v * v;
    }
  } else {
    for (; i + 8 <= D; i += 8)
      for (int j = 0; j < 8; ++j) {
        const float v = to_f32(h[i + j]);
        s[j] += v * v;
      }
    for (; i < D; ++i) {
      const float v = to_f32(h[i]);
      s[0] += v * v;
    }
  }
  const float tot = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  return sqrtf(tot);
}

template <class W>
static glass_status stats_impl(const W* h, int64_t B, int64_t T, int64_t D, const float* dn,
                               const uint8_t* mask, float* out, int nthreads) {
  thread_local std::vector<float> norms_buf;
  try {
    if (norms_buf.size() < static_cast<size_t>(B * T)) norms_buf.resize(B * T);
  } catch (...) {
    set_error("neuron_stats: cannot allocate the workspace (B*T = %lld)", static_cast<long long>(B * T));
    return GLASS_ERR_INTERNAL;
  }
  float* norms = norms_buf.data();
  // Pass 1: norms of the tokens that count (0 for masked-out tokens: they add nothing).
  parallel_for(B * T, nthreads, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t bt = b0; bt < b1; ++bt)
      norms[bt] = (mask && !mask[bt]) ? 0.0f : token_norm(h + bt * D, dn, D);
  });
  // Pass 2: blocks of 512 neurons of one sequence; every token adds (v_i / n)^2.
  const int64_t kBlk = 512;
  const int64_t nblk = (D + kBlk - 1) / kBlk;
  parallel_for(B * nblk, nthreads, 4, [&](int64_t w0, int64_t w1) {
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / nblk;
      const int64_t c0 = (w % nblk) * kBlk;
      const int64_t c1 = c0 + kBlk < D ? c0 + kBlk : D;
      float* o = out + b * D;
      for (int64_t t = 0; t < T; ++t) {
        const float n = norms[b * T + t];
        if (!(n > 0.0f)) continue;
        const W* ht = h + (b * T + t) * D;
        if (dn) {
          for (int64_t i = c0; i < c1; ++i) {
            const float q = to_f32(ht[i]) * dn[i] / n;
            o[i] += q * q;
          }
        } else {
          for (int64_t i = c0; i < c1; ++i) {
            const float q = to_f32(ht[i]) / n;
            o[i] += q * q;
          }
        }
      }
    }
  });
  return GLASS_OK;
}

}  // namespace

glass_status neuron_stats_impl(glass_dtype dtype, const void* h, int64_t B, int64_t T, int64_t D,
                               const float* down_norms, const uint8_t* mask, float* out,
                               int nthreads) {
  switch (dtype) {
    case GLASS_F32:
      return stats_impl(static_cast<const float*>(h), B, T, D, down_norms, mask, out, nthreads);
    case GLASS_F16:
      return stats_impl(static_cast<const f16_t*>(h), B, T, D, down_norms, mask, out, nthreads);
    case GLASS_BF16:
      return stats_impl(static_cast<const bf16_t*>(h), B, T, D, down_norms, mask, out, nthreads);
    default:  // rejected by the C ABI before this point
      return GLASS_ERR_ARG;
  }
}

}  // namespace glass
