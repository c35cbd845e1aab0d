/*
 * GLASS through the C ABI alone (csrc/include/glass/glass.h): no Python, no torch.
 *
 * One gated FFN layer (silu) is built from raw fp32 arrays with deterministic pseudo-random weights.
 * The statistics of a few prompt tokens are computed with glass_neuron_stats, the neurons selected
 * with glass_select_neurons (a global rank built here, lambda 0.5, k = D/2), and a few decode steps
 * run with glass_sparse_ffn. Every result is checked against a plain C computation in double:
 * k = D must equal the dense layer, k < D the dense layer restricted to the selected neurons.
 * Exit status 0 on success, 1 on any failure.
 *
 * Vendoring build (from the repository root, after building libglass_core.a):
 *   cc -std=c11 -Icsrc/include csrc/examples/glass_example.c BUILD/libglass_core.a \
 *      -lstdc++ -lm -lpthread -o glass_example
 * (GLASS_THREADPOOL=OFF builds of the core also need -fopenmp.)
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "glass/glass.h"

enum { d = 48, D = 96, T_PROMPT = 5, STEPS = 3 };

static int g_failures = 0;

#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (!(cond)) {                                           \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
      fprintf(stderr, __VA_ARGS__);                          \
      fputc('\n', stderr);                                   \
      ++g_failures;                                          \
    }                                                        \
  } while (0)

/* xorshift32: deterministic on every platform (no rand(), whose sequence is libc-specific). */
static uint32_t g_rng = 0x9e3779b9u;
static float uniform(float scale) {
  g_rng ^= g_rng << 13;
  g_rng ^= g_rng >> 17;
  g_rng ^= g_rng << 5;
  return scale * (2.0f * (float)(g_rng >> 8) / 16777216.0f - 1.0f); /* in [-scale, scale) */
}

static double silu(double v) { return v / (1.0 + exp(-v)); }

static double dot(const float* a, const float* b, int n) {
  double s = 0.0;
  for (int j = 0; j < n; ++j) s += (double)a[j] * (double)b[j];
  return s;
}

/* Pre-activation product h_i = silu(W_gate[i].x) * (W_up[i].x) for every neuron, in double. */
static void hidden(const float* wg, const float* wu, const float* x, double* h) {
  for (int i = 0; i < D; ++i) h[i] = silu(dot(wg + i * d, x, d)) * dot(wu + i * d, x, d);
}

/*
 * Dense reference restricted to the neurons in use[] (all ones = the dense layer): y in double, plus
 * the sum of |terms| per output, which bounds the fp32 rounding error of the kernel's sums.
 */
static void dense_ref(const float* wg, const float* wu, const float* wd, const float* x,
                      const unsigned char* use, double* y, double* mag) {
  double h[D], hmag[D];
  hidden(wg, wu, x, h);
  for (int i = 0; i < D; ++i) {
    /* |silu(g)| * |u| computed from the |.| sums: bounds the error of the two dot products too. */
    double ag = 0.0, au = 0.0;
    for (int j = 0; j < d; ++j) {
      ag += fabs((double)wg[i * d + j] * x[j]);
      au += fabs((double)wu[i * d + j] * x[j]);
    }
    hmag[i] = ag * au + fabs(h[i]);
  }
  for (int j = 0; j < d; ++j) y[j] = mag[j] = 0.0;
  for (int i = 0; i < D; ++i) {
    if (!use[i]) continue;
    for (int j = 0; j < d; ++j) {
      y[j] += h[i] * wd[i * d + j];
      mag[j] += hmag[i] * fabs((double)wd[i * d + j]);
    }
  }
}

/* Max over outputs of |y - ref| / tol, tol = fp32 accumulation bound ~ n eps sum|terms| (+ tiny). */
static double err_ratio(const float* y, const double* ref, const double* mag, int nterms) {
  double worst = 0.0;
  for (int j = 0; j < d; ++j) {
    const double tol = 2.0 * (nterms + 8) * FLT_EPSILON * mag[j] + 1e-7;
    const double r = fabs((double)y[j] - ref[j]) / tol;
    if (!(r <= worst)) worst = r; /* also catches NaN */
  }
  return worst;
}

int main(void) {
  static float wg[D * d], wu[D * d], wd[D * d];
  const float ws = 1.0f / sqrtf((float)d), wds = 1.0f / sqrtf((float)D);
  for (int i = 0; i < D * d; ++i) {
    wg[i] = uniform(ws);
    wu[i] = uniform(ws);
    wd[i] = uniform(wds);
  }

  printf("glass C example: d=%d D=%d fp32, isa=%s, kernel=%s, threads=%d\n", d, D,
         glass_isa_name(glass_get_isa()), glass_kernel_name(GLASS_F32, 1), glass_get_num_threads());

  /* 1. Statistics of the prompt: h [1, T, D] computed in C, then glass_neuron_stats. */
  static float xp[T_PROMPT * d], hp[T_PROMPT * D];
  double stats_ref[D] = {0};
  for (int t = 0; t < T_PROMPT; ++t) {
    double h[D], n2 = 0.0;
    for (int j = 0; j < d; ++j) xp[t * d + j] = uniform(1.0f);
    hidden(wg, wu, xp + t * d, h);
    for (int i = 0; i < D; ++i) {
      hp[t * D + i] = (float)h[i];
      n2 += (double)hp[t * D + i] * hp[t * D + i];
    }
    for (int i = 0; i < D; ++i) stats_ref[i] += (double)hp[t * D + i] * hp[t * D + i] / n2;
  }
  float stats[D] = {0}; /* glass_neuron_stats ADDS into out */
  glass_status st = glass_neuron_stats(GLASS_F32, hp, 1, T_PROMPT, D, NULL, NULL, stats);
  CHECK(st == GLASS_OK, "glass_neuron_stats: status %d: %s", (int)st, glass_last_error());
  double stats_err = 0.0;
  for (int i = 0; i < D; ++i) {
    const double e = fabs(stats[i] - stats_ref[i]);
    if (!(e <= stats_err)) stats_err = e;
  }
  /* Each term is <= 1 and the sums have D + T terms: a few hundred fp32 ulps of 1 at most. */
  CHECK(stats_err <= 2.0 * (D + T_PROMPT) * FLT_EPSILON, "neuron_stats max error %g", stats_err);

  /* 2. A global rank (1 = most important): here by descending ||W_down_t[i]||, ties -> lower index.
   * A real stack loads it from the offline statistics. */
  double gscore[D];
  int32_t grank[D];
  for (int i = 0; i < D; ++i) gscore[i] = dot(wd + i * d, wd + i * d, d);
  for (int i = 0; i < D; ++i) {
    int r = 1;
    for (int j = 0; j < D; ++j)
      if (gscore[j] > gscore[i] || (gscore[j] == gscore[i] && j < i)) ++r;
    grank[i] = r;
  }

  /* 3. Selection: k = D/2 neurons, lambda 0.5. */
  enum { K = D / 2 };
  int32_t idx[K];
  st = glass_select_neurons(stats, 1, D, grank, 0.5, K, idx);
  CHECK(st == GLASS_OK, "glass_select_neurons: status %d: %s", (int)st, glass_last_error());
  unsigned char sel[D] = {0}, all[D];
  memset(all, 1, sizeof(all));
  for (int j = 0; j < K; ++j) {
    CHECK(idx[j] >= 0 && idx[j] < D, "selected index %d out of range", (int)idx[j]);
    CHECK(j == 0 || idx[j] > idx[j - 1], "selection not strictly ascending at %d", j);
    if (idx[j] >= 0 && idx[j] < D) sel[idx[j]] = 1;
  }
  /* The same selection recomputed here from the contract in glass.h: r^L by descending local score
   * (ties -> lower index), a = lam r^G + (1 - lam) r^L, the K smallest a (ties -> smaller r^L, then
   * lower index). */
  {
    int rl[D];
    double a[D];
    for (int i = 0; i < D; ++i) {
      rl[i] = 1;
      for (int j = 0; j < D; ++j)
        if (stats[j] > stats[i] || (stats[j] == stats[i] && j < i)) ++rl[i];
      a[i] = 0.5 * grank[i] + 0.5 * rl[i];
    }
    int agree = 1;
    for (int i = 0; i < D; ++i) {
      int before = 0; /* neurons that come before i in the aggregated order */
      for (int j = 0; j < D; ++j)
        if (a[j] < a[i] || (a[j] == a[i] && (rl[j] < rl[i] || (rl[j] == rl[i] && j < i)))) ++before;
      if ((before < K) != (sel[i] != 0)) agree = 0;
    }
    CHECK(agree, "glass_select_neurons differs from the rank aggregation recomputed in C");
  }
  int32_t idx_all[D];
  for (int i = 0; i < D; ++i) idx_all[i] = i;

  /* 4. Decode steps: sparse (k = D/2) and full (k = D) against the C reference. */
  static float bundled[D][3][d];
  double worst_full = 0.0, worst_sparse = 0.0, sparse_vs_dense = 0.0;
  for (int s = 0; s < STEPS; ++s) {
    float x[d], y[d];
    double ref[d], mag[d];
    for (int j = 0; j < d; ++j) x[j] = uniform(1.0f);

    st = glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, x, 1, 1, d, wg, wu, wd, D, idx_all, D, 0, y);
    CHECK(st == GLASS_OK, "glass_sparse_ffn k=D: status %d: %s", (int)st, glass_last_error());
    dense_ref(wg, wu, wd, x, all, ref, mag);
    double r = err_ratio(y, ref, mag, d + D);
    if (!(r <= worst_full)) worst_full = r;
    double full[d];
    for (int j = 0; j < d; ++j) full[j] = ref[j];

    st = glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, x, 1, 1, d, wg, wu, wd, D, idx, K, 0, y);
    CHECK(st == GLASS_OK, "glass_sparse_ffn k=D/2: status %d: %s", (int)st, glass_last_error());
    dense_ref(wg, wu, wd, x, sel, ref, mag);
    r = err_ratio(y, ref, mag, d + K);
    if (!(r <= worst_sparse)) worst_sparse = r;

    /* The same weights in the neuron-bundled layout (glass.h): neuron i's gate, up and down rows
     * adjacent in one [D, 3, d] block, read with the row stride ldw = 3 d: the same bits. */
    {
      float yb[d];
      for (int i = 0; i < D; ++i)
        for (int j = 0; j < d; ++j) {
          bundled[i][0][j] = wg[i * d + j];
          bundled[i][1][j] = wu[i * d + j];
          bundled[i][2][j] = wd[i * d + j];
        }
      st = glass_sparse_ffn_strided(GLASS_F32, GLASS_ACT_SILU, x, 1, 1, d, bundled[0][0], bundled[0][1],
                                    bundled[0][2], 3 * d, D, idx, K, 0, yb);
      CHECK(st == GLASS_OK, "glass_sparse_ffn_strided: status %d: %s", (int)st, glass_last_error());
      CHECK(memcmp(yb, y, sizeof(yb)) == 0, "bundled layout differs from separate rows");
    }
    for (int j = 0; j < d; ++j) {
      const double e = fabs(y[j] - full[j]);
      if (e > sparse_vs_dense) sparse_vs_dense = e;
    }
  }
  CHECK(worst_full <= 1.0, "k=D: sparse != dense, max error / tolerance = %g", worst_full);
  CHECK(worst_sparse <= 1.0, "k=D/2: sparse != restricted dense, max error / tolerance = %g",
        worst_sparse);
  /* Dropping half the neurons must change the output: otherwise the checks above prove nothing. */
  CHECK(sparse_vs_dense > 1e-3, "k=D/2 output equals the dense output (%g)", sparse_vs_dense);

  /* 5. Bad input: an index out of range is an error status with a message, not a crash. */
  {
    float x[d] = {0}, y[d];
    int32_t bad[2] = {0, D};
    st = glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, x, 1, 1, d, wg, wu, wd, D, bad, 2, 0, y);
    const char* msg = glass_last_error();
    CHECK(st == GLASS_ERR_INDEX, "out-of-range index: status %d, expected GLASS_ERR_INDEX", (int)st);
    CHECK(msg != NULL && msg[0] != '\0', "out-of-range index: empty glass_last_error()");
    printf("out-of-range index -> status %d: %s\n", (int)st, msg ? msg : "(null)");
  }

  printf("neuron_stats max error %.3g; selected %d of %d neurons (lambda 0.5)\n", stats_err, K, D);
  printf("decode %d steps: k=D error/tol %.3g, k=D/2 error/tol %.3g, |sparse - dense| max %.3g\n",
         STEPS, worst_full, worst_sparse, sparse_vs_dense);
  if (g_failures) {
    printf("FAILED (%d checks)\n", g_failures);
    return 1;
  }
  printf("OK\n");
  return 0;
}
