// select_neurons: rank aggregation + top-k (docs/method.md). Compiled with -ffp-contract=off: the
// aggregated score must be lam * rG + (1 - lam) * rL rounded step by step, never fused, so that every
// backend (torch reference, Triton, C++) picks the same set.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "internal.h"
#include "parallel.h"

namespace glass {
namespace {

// Order-preserving map float -> uint32 (ascending), then inverted so that ascending keys mean
// DEScending scores.
static inline uint32_t desc_key(float f) {
  if (f == 0.0f) f = 0.0f;  // -0.0 == +0.0: a tie (broken by index), as in a float comparison
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~u;
}

struct Scratch {
  std::vector<uint32_t> key, key2;
  std::vector<int32_t> ord, ord2, rl, cand;
  std::vector<double> agg;
  std::vector<uint64_t> bits;
  std::vector<uint8_t> keep;
  void resize(int64_t D) {
    size_t n = static_cast<size_t>(D);
    if (key.size() < n) {
      key.resize(n); key2.resize(n); ord.resize(n); ord2.resize(n); rl.resize(n); cand.resize(n);
      agg.resize(n); bits.resize(n); keep.resize(n);
    }
  }
};

// Local ranks: stable LSD radix sort of (key, index), 3 passes of 11 bits. Stability keeps equal
// scores in index order, which is the tie rule (lower index = better rank).
static void local_ranks(const float* s, int64_t D, Scratch& w) {
  uint32_t* k0 = w.key.data();
  uint32_t* k1 = w.key2.data();
  int32_t* o0 = w.ord.data();
  int32_t* o1 = w.ord2.data();
  for (int64_t i = 0; i < D; ++i) {
    k0[i] = desc_key(s[i]);
    o0[i] = static_cast<int32_t>(i);
  }
  // The three digit histograms in one read pass (not one per pass).
  uint32_t cnt[3][2048];
  std::memset(cnt, 0, sizeof(cnt));
  for (int64_t i = 0; i < D; ++i) {
    const uint32_t kk = k0[i];
    ++cnt[0][kk & 2047u];
    ++cnt[1][(kk >> 11) & 2047u];
    ++cnt[2][kk >> 22];
  }
  for (int pass = 0; pass < 3; ++pass) {
    const int shift = pass * 11;
    uint32_t* c = cnt[pass];
    // Skip a pass where every key has the same digit (common: the top bits of similar scores).
    bool trivial = false;
    for (int b = 0; b < 2048; ++b)
      if (c[b]) { trivial = c[b] == static_cast<uint32_t>(D); break; }
    if (trivial) continue;
    uint32_t sum = 0;
    for (int b = 0; b < 2048; ++b) {
      const uint32_t n = c[b];
      c[b] = sum;
      sum += n;
    }
    for (int64_t i = 0; i < D; ++i) {
      const uint32_t p = c[(k0[i] >> shift) & 2047u]++;
      k1[p] = k0[i];
      o1[p] = o0[i];
    }
    std::swap(k0, k1);
    std::swap(o0, o1);
  }
  int32_t* rl = w.rl.data();
  for (int64_t p = 0; p < D; ++p) rl[o0[p]] = static_cast<int32_t>(p + 1);
}

static void select_one(const float* s, int64_t D, const int32_t* rg, double lam, int64_t k,
                       int32_t* out, Scratch& w) {
  local_ranks(s, D, w);
  const int32_t* rl = w.rl.data();
  double* a = w.agg.data();
  const double one_minus = 1.0 - lam;
  for (int64_t i = 0; i < D; ++i) {
    const double g = lam * static_cast<double>(rg[i]);
    const double l = one_minus * static_cast<double>(rl[i]);
    a[i] = g + l;
  }
  uint8_t* keep = w.keep.data();
  std::memset(keep, 0, static_cast<size_t>(D));
  if (k == D) {
    std::memset(keep, 1, static_cast<size_t>(D));
  } else {
    // a >= 0, so its IEEE bits order like its value: select the k-th smallest on plain uint64
    // keys (contiguous, no indirection), then settle the ties at the threshold by r^L. r^L is a
    // permutation, so (a, r^L) is a strict order and the set is unique.
    uint64_t* bits = w.bits.data();
    std::memcpy(bits, a, static_cast<size_t>(D) * 8);
    std::nth_element(bits, bits + (k - 1), bits + D);
    double thr;
    std::memcpy(&thr, &bits[k - 1], 8);
    int64_t taken = 0;
    int32_t* tie = w.cand.data();
    int64_t nties = 0;
    for (int64_t i = 0; i < D; ++i) {
      if (a[i] < thr) {
        keep[i] = 1;
        ++taken;
      } else if (a[i] == thr) {
        tie[nties++] = static_cast<int32_t>(i);
      }
    }
    const int64_t need = k - taken;  // 1 <= need <= nties
    if (need < nties)
      std::nth_element(tie, tie + (need - 1), tie + nties,
                       [rl](int32_t i, int32_t j) { return rl[i] < rl[j]; });
    for (int64_t j = 0; j < need; ++j) keep[tie[j]] = 1;
  }
  int64_t n = 0;
  for (int64_t i = 0; i < D; ++i)
    if (keep[i]) out[n++] = static_cast<int32_t>(i);
}

}  // namespace

glass_status select_neurons_impl(const float* local, int64_t B, int64_t D,
                                 const int32_t* global_rank, double lam, int64_t k, int32_t* out,
                                 int nthreads) {
  for (int64_t i = 0; i < B * D; ++i)
    if (!std::isfinite(local[i])) {
      set_error("select_neurons: local[%lld, %lld] = %g is not finite",
                static_cast<long long>(i / D), static_cast<long long>(i % D),
                static_cast<double>(local[i]));
      return GLASS_ERR_ARG;
    }
  int failed = 0;
  parallel_for(B, nthreads, 1, [&](int64_t b0, int64_t b1) {
    thread_local Scratch w;
    try {
      w.resize(D);
    } catch (...) {  // never let an exception cross a pool thread
      __atomic_store_n(&failed, 1, __ATOMIC_RELAXED);
      return;
    }
    for (int64_t b = b0; b < b1; ++b) select_one(local + b * D, D, global_rank, lam, k, out + b * k, w);
  });
  if (failed) {
    set_error("select_neurons: cannot allocate the workspace (D = %lld)", static_cast<long long>(D));
    return GLASS_ERR_INTERNAL;
  }
  return GLASS_OK;
}

}  // namespace glass
