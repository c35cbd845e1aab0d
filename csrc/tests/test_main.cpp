// C++ unit tests of the glass core (no framework: a few macros). Every ISA path the CPU supports is
// checked against a double-precision oracle with a derived error bound, and against the scalar path;
// odd sizes, k = 1, k = D, T = 1 and T > 1, B > 1 with shared and per-sequence indices, every dtype,
// every activation; select_neurons exactly against a naive sort; error codes for bad input.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "glass/glass.h"
#include "internal.h"  // the scalar conversions (the reference rounding the kernels must match)

namespace {

int g_failures = 0;
int g_checks = 0;

#define CHECK(cond, ...)                                      \
  do {                                                        \
    ++g_checks;                                               \
    if (!(cond)) {                                            \
      ++g_failures;                                           \
      std::fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
      std::fprintf(stderr, __VA_ARGS__);                      \
      std::fprintf(stderr, "\n");                             \
      if (g_failures > 30) std::exit(1);                      \
    }                                                         \
  } while (0)

const glass_dtype kDtypes[] = {GLASS_F32, GLASS_F16, GLASS_BF16};
const char* dtype_name(glass_dtype d) {
  return d == GLASS_F32 ? "f32" : d == GLASS_F16 ? "f16" : "bf16";
}
size_t dtype_size(glass_dtype d) { return d == GLASS_F32 ? 4 : 2; }
// Unit roundoff of the storage type (half an ulp, relative).
double unit_roundoff(glass_dtype d) {
  return d == GLASS_F32 ? std::ldexp(1.0, -24) : d == GLASS_F16 ? std::ldexp(1.0, -11)
                                                                : std::ldexp(1.0, -8);
}
const double kU32 = std::ldexp(1.0, -24);

// A buffer of values stored in a dtype, plus the exact values it holds (as double).
struct Buf {
  glass_dtype dt;
  std::vector<uint8_t> raw;
  std::vector<double> val;
  Buf(glass_dtype dt_, size_t n) : dt(dt_), raw(n * dtype_size(dt_)), val(n) {}
  void set(size_t i, float v) {
    if (dt == GLASS_F32) {
      std::memcpy(&raw[i * 4], &v, 4);
      val[i] = v;
    } else if (dt == GLASS_F16) {
      uint16_t h = glass::f32_to_f16(v);
      std::memcpy(&raw[i * 2], &h, 2);
      val[i] = glass::f16_to_f32(h);
    } else {
      uint16_t h = glass::f32_to_bf16(v);
      std::memcpy(&raw[i * 2], &h, 2);
      val[i] = glass::bf16_to_f32(h);
    }
  }
  double get(size_t i) const {
    if (dt == GLASS_F32) {
      float f;
      std::memcpy(&f, &raw[i * 4], 4);
      return f;
    }
    uint16_t h;
    std::memcpy(&h, &raw[i * 2], 2);
    return dt == GLASS_F16 ? glass::f16_to_f32(h) : glass::bf16_to_f32(h);
  }
  void* data() { return raw.data(); }
};

void fill(Buf& b, std::mt19937& rng, float scale) {
  std::normal_distribution<float> nd(0.0f, scale);
  for (size_t i = 0; i < b.val.size(); ++i) b.set(i, nd(rng));
}

double act_d(glass_activation a, double g) {
  switch (a) {
    case GLASS_ACT_SILU: return g / (1.0 + std::exp(-g));
    case GLASS_ACT_GELU_TANH:
      return 0.5 * g * (1.0 + std::tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)));
    case GLASS_ACT_GELU: return 0.5 * g * (1.0 + std::erf(g / std::sqrt(2.0)));
    default: return g > 0 ? g : 0;
  }
}
const char* act_name(glass_activation a) {
  const char* n[] = {"silu", "gelu_tanh", "gelu", "relu"};
  return n[a];
}

struct FfnCase {
  glass_dtype dt;
  glass_activation act;
  bool gated;
  int64_t B, T, d, D, k;
  bool batched;
};

// Runs the case on the current ISA and checks it against the double oracle with the error bound
// of fp32 evaluation (gamma_n = n u / (1 - n u) for a length-n dot product, through the activation
// with Lipschitz constant <= 1.13, plus the final rounding to the output dtype). Returns y.
std::vector<double> run_ffn_case(const FfnCase& c, uint32_t seed, std::vector<double>* bound_out) {
  std::mt19937 rng(seed);
  const int64_t B = c.B, T = c.T, d = c.d, D = c.D, k = c.k;
  Buf x(c.dt, B * T * d), w1(c.dt, D * d), w2(c.dt, D * d), w3(c.dt, D * d), bi(c.dt, D),
      bo(c.dt, d), y(c.dt, B * T * d);
  fill(x, rng, 1.0f);
  fill(w1, rng, 1.0f / std::sqrt(static_cast<float>(d)));
  fill(w2, rng, 1.0f / std::sqrt(static_cast<float>(d)));
  fill(w3, rng, 1.0f);
  fill(bi, rng, 0.5f);
  fill(bo, rng, 0.5f);
  const int64_t nsets = c.batched ? B : 1;
  std::vector<int32_t> idx(nsets * k);
  for (int64_t s = 0; s < nsets; ++s) {
    if (k == D) {  // every neuron, in a shuffled order
      std::vector<int32_t> p(D);
      std::iota(p.begin(), p.end(), 0);
      std::shuffle(p.begin(), p.end(), rng);
      std::copy(p.begin(), p.end(), idx.begin() + s * k);
    } else {
      std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(D - 1));
      for (int64_t j = 0; j < k; ++j) idx[s * k + j] = ud(rng);  // duplicates allowed
    }
  }
  for (size_t i = 0; i < y.val.size(); ++i) y.set(i, 12345.0f);  // must be overwritten
  glass_status st;
  if (c.gated)
    st = glass_sparse_ffn(c.dt, c.act, x.data(), B, T, d, w1.data(), w2.data(), w3.data(), D,
                          idx.data(), k, c.batched, y.data());
  else
    st = glass_sparse_mlp(c.dt, c.act, x.data(), B, T, d, w1.data(), bi.data(), w3.data(),
                          bo.data(), D, idx.data(), k, c.batched, y.data());
  CHECK(st == GLASS_OK, "status %d: %s", st, glass_last_error());
  const double gd = d * kU32 / (1 - d * kU32);
  const double gk = (k + 1) * kU32 / (1 - (k + 1) * kU32);
  const double uo = unit_roundoff(c.dt);
  std::vector<double> out(B * T * d), bnd(B * T * d);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row = b * T + t;
      std::vector<double> ref(d, 0.0), mag(d, 0.0), err(d, 0.0);
      const int32_t* id = idx.data() + (c.batched ? b * k : 0);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t n = id[j];
        double g = 0, sg = 0, u = 0, su = 0;
        for (int64_t q = 0; q < d; ++q) {
          g += w1.val[n * d + q] * x.val[row * d + q];
          sg += std::fabs(w1.val[n * d + q] * x.val[row * d + q]);
          u += w2.val[n * d + q] * x.val[row * d + q];
          su += std::fabs(w2.val[n * d + q] * x.val[row * d + q]);
        }
        double h, herr;
        if (c.gated) {
          h = act_d(c.act, g) * u;
          // |d act| <= 1.13 (silu 1.1, gelu 1.13, relu 1); activation itself is ~4 ulps in fp32.
          herr = gd * (1.13 * sg * std::fabs(u) + std::fabs(act_d(c.act, g)) * su) +
                 8 * kU32 * std::fabs(h);
        } else {
          const double gb = g + bi.val[n];
          h = act_d(c.act, gb);
          herr = 1.13 * (gd * sg + kU32 * std::fabs(gb)) + 8 * kU32 * std::fabs(h);
        }
        for (int64_t q = 0; q < d; ++q) {
          ref[q] += h * w3.val[n * d + q];
          mag[q] += std::fabs(h * w3.val[n * d + q]);
          err[q] += herr * std::fabs(w3.val[n * d + q]);
        }
      }
      for (int64_t q = 0; q < d; ++q) {
        double r = ref[q], m = mag[q];
        if (!c.gated) {
          r += bo.val[q];
          m += std::fabs(bo.val[q]);
        }
        const double e32 = err[q] + gk * m + 1e-30;
        const double bound = e32 + uo * (std::fabs(r) + e32) + (c.dt == GLASS_F16 ? 6e-8 : 0);
        const double got = y.get(row * d + q);
        CHECK(std::fabs(got - r) <= bound,
              "%s %s %s gated=%d B=%lld T=%lld d=%lld D=%lld k=%lld batched=%d isa=%s: y[%lld,%lld] = "
              "%.9g, oracle %.9g, bound %.3g",
              glass_kernel_name(c.dt, c.gated), dtype_name(c.dt), act_name(c.act), c.gated,
              (long long)B, (long long)T, (long long)d, (long long)D, (long long)k, c.batched,
              glass_isa_name(glass_get_isa()), (long long)row, (long long)q, got, r, bound);
        out[row * d + q] = got;
        bnd[row * d + q] = bound;
      }
    }
  if (bound_out) *bound_out = bnd;
  return out;
}

std::vector<glass_isa> supported_isas() {
  std::vector<glass_isa> v;
  for (int i = GLASS_ISA_SCALAR; i <= GLASS_ISA_LAST_; ++i)
    if (glass_isa_supported(static_cast<glass_isa>(i))) v.push_back(static_cast<glass_isa>(i));
  return v;
}

void test_ffn() {
  const std::vector<glass_isa> isas = supported_isas();
  std::vector<FfnCase> cases;
  // Odd d (not a multiple of 8/16/32), k = 1, k = D, T in {1, 5, 9} (tile remainders), B > 1.
  const int64_t shapes[][5] = {
      // B, T, d, D, k
      {1, 1, 1, 1, 1},    {1, 1, 7, 5, 1},     {1, 1, 33, 17, 17},  {1, 1, 64, 40, 13},
      {1, 5, 37, 23, 23}, {2, 3, 130, 50, 7},  {3, 9, 19, 11, 11},  {1, 2, 257, 33, 32},
      {2, 1, 96, 64, 1},  {1, 4, 48, 300, 150}, {1, 8, 200, 61, 61},
  };
  uint32_t seed = 1;
  for (auto& s : shapes)
    for (glass_dtype dt : kDtypes)
      for (int act = 0; act < 4; ++act)
        for (int gated = 0; gated < 2; ++gated)
          for (int batched = 0; batched < 2; ++batched) {
            if (batched && s[0] == 1 && act != 0) continue;  // same as shared; keep the run short
            cases.push_back({dt, static_cast<glass_activation>(act), gated != 0, s[0], s[1], s[2],
                             s[3], s[4], batched != 0});
          }
  const int thread_counts[] = {1, 2, 3};
  // Decode settings (neurons in flight, prefetch distance): the default first (the scalar reference
  // of each case), then one at a time, an odd group with prefetch, the largest of both. They apply
  // to one token per index set only, so other cases run the first setting alone.
  const int settings[][2] = {{4, 0}, {1, 0}, {3, 2}, {8, 64}};
  size_t runs = 0;
  for (const FfnCase& c : cases) {
    ++seed;
    std::vector<double> ref_scalar, bnd;
    const int nset = (c.batched ? c.T : c.B * c.T) == 1 ? 4 : 1;
    for (int si = 0; si < nset; ++si)
    for (glass_isa isa : isas) {
      CHECK(glass_set_decode_tuning(settings[si][0], settings[si][1]) == GLASS_OK, "set_decode_tuning");
      CHECK(glass_set_isa(isa) == GLASS_OK, "set_isa(%s)", glass_isa_name(isa));
      ++runs;
      std::vector<double> one_thread;
      for (int nt : thread_counts) {
        glass_set_num_threads(nt);
        std::vector<double> b;
        std::vector<double> y = run_ffn_case(c, seed, &b);
        // The chunking does not depend on the thread count: bitwise the same result.
        if (nt == 1) one_thread = y;
        else CHECK(y == one_thread, "%s: %d threads differ from 1 thread", glass_isa_name(isa), nt);
        if (nt > 1 && glass_set_threading(GLASS_THREADING_OPENMP) == GLASS_OK) {
          // the same chunks on the OpenMP team: the same bits
          CHECK(run_ffn_case(c, seed, nullptr) == one_thread, "%s: %d OpenMP threads differ from 1 thread",
                glass_isa_name(isa), nt);
          glass_set_threading(GLASS_THREADING_POOL);
        }
        if (isa == GLASS_ISA_SCALAR && nt == 1 && si == 0) {
          ref_scalar = y;
          bnd = b;
        } else {
          // Both are within the bound of the oracle, so they differ by at most twice of it.
          for (size_t i = 0; i < y.size(); ++i)
            CHECK(std::fabs(y[i] - ref_scalar[i]) <= 2 * bnd[i], "%s (%d in flight) vs scalar at %zu: %.9g vs %.9g",
                  glass_isa_name(isa), settings[si][0], i, y[i], ref_scalar[i]);
        }
      }
    }
  }
  glass_set_isa(GLASS_ISA_AUTO);
  glass_set_num_threads(0);
  glass_set_decode_tuning(settings[0][0], settings[0][1]);
  std::printf("sparse_ffn/sparse_mlp: %zu cases, %zu (case, ISA, decode setting) runs x 3 thread counts\n",
              cases.size(), runs);
}

void test_stats() {
  std::mt19937 rng(7);
  const int64_t shapes[][3] = {{1, 1, 1}, {1, 3, 7}, {2, 5, 33}, {3, 4, 1030}, {1, 32, 14336}};
  for (auto& s : shapes)
    for (glass_dtype dt : kDtypes)
      for (int impact = 0; impact < 2; ++impact)
        for (int masked = 0; masked < 2; ++masked) {
          const int64_t B = s[0], T = s[1], D = s[2];
          Buf h(dt, B * T * D);
          fill(h, rng, 2.0f);
          if (T > 1)  // a zero token adds nothing (and must not divide by 0)
            for (int64_t i = 0; i < D; ++i) h.set(1 * D + i, 0.0f);
          std::vector<float> dn(D), out(B * D);
          std::uniform_real_distribution<float> ud(0.1f, 3.0f);
          for (auto& v : dn) v = ud(rng);
          for (auto& v : out) v = ud(rng);  // the kernel ADDS into out
          std::vector<uint8_t> mask(B * T);
          for (auto& m : mask) m = (rng() % 3) != 0;
          std::vector<double> ref(out.begin(), out.end()), mag(out.begin(), out.end());
          for (int64_t bt = 0; bt < B * T; ++bt) {
            if (masked && !mask[bt]) continue;
            double n2 = 0;
            for (int64_t i = 0; i < D; ++i) {
              const double v = h.val[bt * D + i] * (impact ? dn[i] : 1.0);
              n2 += v * v;
            }
            if (n2 == 0) continue;
            for (int64_t i = 0; i < D; ++i) {
              const double v = h.val[bt * D + i] * (impact ? dn[i] : 1.0);
              ref[bt / T * D + i] += v * v / n2;
              mag[bt / T * D + i] += v * v / n2;
            }
          }
          glass_status st = glass_neuron_stats(dt, h.data(), B, T, D, impact ? dn.data() : nullptr,
                                               masked ? mask.data() : nullptr, out.data());
          CHECK(st == GLASS_OK, "neuron_stats status %d: %s", st, glass_last_error());
          // Each term: the norm (a D-term sum, halved by the sqrt, squared back) and 4 roundings;
          // the sum over T tokens in fp32.
          const double gD = (D + 8) * kU32 * 2;
          for (int64_t i = 0; i < B * D; ++i) {
            const double bound = (gD + (T + 4) * kU32) * mag[i] + 1e-30;
            CHECK(std::fabs(out[i] - ref[i]) <= bound,
                  "neuron_stats %s B=%lld T=%lld D=%lld impact=%d masked=%d: out[%lld] %.9g ref %.9g",
                  dtype_name(dt), (long long)B, (long long)T, (long long)D, impact, masked,
                  (long long)i, out[i], ref[i]);
          }
        }
  std::printf("neuron_stats: ok\n");
}

// Naive oracle of select_neurons: full sorts with explicit comparators.
std::vector<int32_t> naive_select(const float* s, int64_t D, const int32_t* rg, double lam,
                                  int64_t k) {
  std::vector<int32_t> o(D);
  std::iota(o.begin(), o.end(), 0);
  std::sort(o.begin(), o.end(), [&](int32_t a, int32_t b) {
    return s[a] > s[b] || (s[a] == s[b] && a < b);
  });
  std::vector<int64_t> rl(D);
  for (int64_t p = 0; p < D; ++p) rl[o[p]] = p + 1;
  std::vector<double> agg(D);
  for (int64_t i = 0; i < D; ++i) {
    volatile double g = lam * static_cast<double>(rg[i]);  // volatile: no fused multiply-add
    volatile double l = (1.0 - lam) * static_cast<double>(rl[i]);
    agg[i] = g + l;
  }
  std::iota(o.begin(), o.end(), 0);
  std::sort(o.begin(), o.end(), [&](int32_t a, int32_t b) {
    if (agg[a] != agg[b]) return agg[a] < agg[b];
    if (rl[a] != rl[b]) return rl[a] < rl[b];
    return a < b;
  });
  std::vector<int32_t> sel(o.begin(), o.begin() + k);
  std::sort(sel.begin(), sel.end());
  return sel;
}

void test_select() {
  std::mt19937 rng(11);
  const int64_t Ds[] = {1, 2, 7, 100, 1031, 14336};
  const double lams[] = {0.0, 0.25, 0.3, 0.5, 0.7, 1.0};
  int n = 0;
  for (int64_t D : Ds)
    for (int64_t B : {1, 3})
      for (double lam : lams)
        for (int ties = 0; ties < 3; ++ties) {
          std::vector<float> s(B * D);
          std::normal_distribution<float> nd(0.0f, 1.0f);
          for (auto& v : s) {
            v = nd(rng);
            if (ties == 1) v = std::round(v * 2.0f) / 2.0f;  // many equal scores, negatives, -0.0
            if (ties == 2) v = std::fabs(v) < 0.5f ? 0.0f : std::fabs(v);  // non-negative + zeros
          }
          if (ties == 1 && D > 3) s[0] = -0.0f, s[1] = 0.0f;
          std::vector<int32_t> rg(D);
          std::iota(rg.begin(), rg.end(), 1);
          std::shuffle(rg.begin(), rg.end(), rng);
          for (int64_t k : {int64_t(1), D / 3 + 1, D - 1 > 0 ? D - 1 : 1, D}) {
            std::vector<int32_t> out(B * k, -1);
            glass_status st = glass_select_neurons(s.data(), B, D, rg.data(), lam, k, out.data());
            CHECK(st == GLASS_OK, "select status %d: %s", st, glass_last_error());
            for (int64_t b = 0; b < B; ++b) {
              std::vector<int32_t> ref = naive_select(s.data() + b * D, D, rg.data(), lam, k);
              CHECK(std::equal(ref.begin(), ref.end(), out.begin() + b * k),
                    "select D=%lld B=%lld lam=%g k=%lld ties=%d row %lld differs", (long long)D,
                    (long long)B, lam, (long long)k, ties, (long long)b);
              if (lam == 1.0) {  // exactly the global top-k
                std::vector<int32_t> g;
                for (int64_t i = 0; i < D; ++i)
                  if (rg[i] <= k) g.push_back(static_cast<int32_t>(i));
                CHECK(std::equal(g.begin(), g.end(), out.begin() + b * k), "lam=1 != global top-k");
              }
            }
            ++n;
          }
        }
  // lam = 0 gives exactly the local top-k.
  {
    const int64_t D = 1000, k = 100;
    std::vector<float> s(D);
    for (int64_t i = 0; i < D; ++i) s[i] = static_cast<float>((i * 7919) % 1000);
    std::vector<int32_t> rg(D), out(k);
    std::iota(rg.begin(), rg.end(), 1);
    CHECK(glass_select_neurons(s.data(), 1, D, rg.data(), 0.0, k, out.data()) == GLASS_OK, "lam0");
    for (int64_t j = 0; j < k; ++j) CHECK(s[out[j]] >= 900.0f, "lam=0 picked a non-top score");
  }
  std::printf("select_neurons: %d cases\n", n);
}

// The *_strided entry points read row i of each weight at w + i * ldw. Weights laid out as one
// neuron-bundled block [D, n, d] (or with any ldw >= d) must give the same bits as the same values
// in separate contiguous [D, d] arrays: only the addresses differ. The block is allocated exactly,
// so a sanitizer build catches any read past its last row.
void test_strided() {
  std::mt19937 rng(77);
  const int64_t shapes[][5] = {{1, 1, 7, 5, 5}, {1, 1, 64, 40, 13}, {2, 3, 33, 17, 9}, {1, 5, 130, 50, 50}};
  const int settings[][2] = {{4, 0}, {1, 0}, {3, 2}};
  size_t runs = 0;
  for (glass_isa isa : supported_isas()) {
    CHECK(glass_set_isa(isa) == GLASS_OK, "set_isa(%s)", glass_isa_name(isa));
    for (auto& s : shapes)
      for (glass_dtype dt : kDtypes)
        for (int gated = 0; gated < 2; ++gated)
          for (int64_t extra : {int64_t(0), int64_t(3)})  // ldw = n d (bundled) and a padded stride
            for (auto& st : settings) {
              const int64_t B = s[0], T = s[1], d = s[2], D = s[3], k = s[4], n = gated ? 3 : 2;
              const int64_t ldw = n * d + extra;
              const size_t es = dtype_size(dt);
              Buf x(dt, B * T * d), bi(dt, D), bo(dt, d);
              std::vector<Buf> w(n, Buf(dt, D * d));
              fill(x, rng, 1.0f);
              fill(bi, rng, 0.5f);
              fill(bo, rng, 0.5f);
              for (auto& m : w) fill(m, rng, 0.2f);
              // the block: neuron i's rows at i * ldw + j * d, j = 0..n-1 (ends at the last row)
              std::vector<uint8_t> block(((D - 1) * ldw + n * d) * es, 0xff);
              for (int64_t i = 0; i < D; ++i)
                for (int64_t j = 0; j < n; ++j)
                  std::memcpy(&block[(i * ldw + j * d) * es], &w[j].raw[i * d * es], d * es);
              std::vector<int32_t> idx(k);
              std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(D - 1));
              for (auto& v : idx) v = ud(rng);
              Buf y1(dt, B * T * d), y2(dt, B * T * d);
              const void* p0 = block.data();
              const void* p1 = &block[d * es];
              const void* p2 = &block[2 * d * es];
              CHECK(glass_set_decode_tuning(st[0], st[1]) == GLASS_OK, "set_decode_tuning");
              glass_status a, b;
              if (gated) {
                a = glass_sparse_ffn(dt, GLASS_ACT_SILU, x.data(), B, T, d, w[0].data(), w[1].data(),
                                     w[2].data(), D, idx.data(), k, 0, y1.data());
                b = glass_sparse_ffn_strided(dt, GLASS_ACT_SILU, x.data(), B, T, d, p0, p1, p2, ldw, D,
                                             idx.data(), k, 0, y2.data());
              } else {
                a = glass_sparse_mlp(dt, GLASS_ACT_GELU, x.data(), B, T, d, w[0].data(), bi.data(),
                                     w[1].data(), bo.data(), D, idx.data(), k, 0, y1.data());
                b = glass_sparse_mlp_strided(dt, GLASS_ACT_GELU, x.data(), B, T, d, p0, bi.data(), p1,
                                             bo.data(), ldw, D, idx.data(), k, 0, y2.data());
              }
              CHECK(a == GLASS_OK && b == GLASS_OK, "strided status %d %d: %s", a, b, glass_last_error());
              CHECK(y1.raw == y2.raw, "%s: ldw %lld differs from separate rows (d %lld, gated %d)",
                    glass_isa_name(isa), static_cast<long long>(ldw), static_cast<long long>(d), gated);
              ++runs;
            }
  }
  glass_set_isa(GLASS_ISA_AUTO);
  glass_set_decode_tuning(settings[0][0], settings[0][1]);
  float xf[8] = {0}, wt[64] = {0}, yf[8];
  int32_t two[2] = {0, 1};
  CHECK(glass_sparse_ffn_strided(GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 8, wt, wt, wt, 7, 4, two, 2, 0, yf) ==
            GLASS_ERR_SIZE, "ldw < d");
  CHECK(std::strstr(glass_last_error(), "ldw") != nullptr, "message names ldw: %s", glass_last_error());
  CHECK(glass_sparse_mlp_strided(GLASS_F32, GLASS_ACT_GELU, xf, 1, 1, 8, wt, nullptr, wt, nullptr, INT64_MAX, 4,
                                 two, 2, 0, yf) == GLASS_ERR_SIZE, "D * ldw overflows");
  std::printf("strided weights: %zu runs bitwise equal to separate rows\n", runs);
}

// Quantized rows (glass_sparse_ffn_q / _mlp_q): random Q8_0 / Q4_0 blocks (random codes, random
// fp16 scales, so the dequantized weights are exact in double) against a double oracle of those
// weights, on every ISA, activation dtype, gated or not, T = 1 and T > 1, shared and per-sequence
// sets, separate (ldw = d) and neuron-bundled (ldw = n d) rows in one exactly-sized allocation.
struct QRows {
  glass_qtype qt;
  int64_t nblk;                   // blocks per row
  std::vector<uint8_t> bytes;     // the allocation (rows of all n matrices, ldw apart)
  std::vector<std::vector<double>> w;  // dequantized [n][D * d]
};

size_t qblock_bytes(glass_qtype qt) { return qt == GLASS_Q8_0 ? 34 : 18; }

QRows make_qrows(glass_qtype qt, int64_t n, int64_t D, int64_t d, int64_t ldw, std::mt19937& rng) {
  QRows r{qt, d / 32, {}, std::vector<std::vector<double>>(n, std::vector<double>(D * d))};
  const size_t bb = qblock_bytes(qt);
  const int64_t row_blocks = ldw / 32;
  r.bytes.assign(((D - 1) * row_blocks + (n - 1) * (d / 32) + d / 32) * bb, 0);
  std::uniform_int_distribution<int> code(qt == GLASS_Q8_0 ? -127 : 0, qt == GLASS_Q8_0 ? 127 : 15);
  // weights of magnitude <~ 1 (|code| <= 127 or 8): fp16 outputs stay finite
  std::uniform_real_distribution<float> sc(qt == GLASS_Q8_0 ? 0.0005f : 0.005f, qt == GLASS_Q8_0 ? 0.008f : 0.06f);
  for (int64_t m = 0; m < n; ++m)
    for (int64_t i = 0; i < D; ++i)
      for (int64_t b = 0; b < d / 32; ++b) {
        uint8_t* blk = &r.bytes[(i * row_blocks + m * (d / 32) + b) * bb];
        const uint16_t s = glass::f32_to_f16(sc(rng) * (code(rng) % 2 ? 1.0f : -1.0f));
        std::memcpy(blk, &s, 2);
        const double sd = glass::f16_to_f32(s);
        for (int j = 0; j < 32; ++j) {
          const int c = code(rng);
          int v;
          if (qt == GLASS_Q8_0) {
            blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(c));
            v = c;
          } else {
            uint8_t& byte = blk[2 + (j % 16)];
            byte = static_cast<uint8_t>(j < 16 ? (byte & 0xf0) | c : (byte & 0x0f) | (c << 4));
            v = c - 8;
          }
          r.w[m][i * d + b * 32 + j] = sd * v;
        }
      }
  return r;
}

void test_quant() {
  std::mt19937 rng(4242);
  const int64_t shapes[][5] = {{1, 1, 32, 5, 5}, {1, 1, 64, 40, 13}, {2, 3, 96, 17, 9},
                               {1, 5, 160, 50, 50}, {3, 1, 32, 7, 1}};
  const int settings[][2] = {{4, 0}, {1, 0}, {3, 2}};
  size_t runs = 0;
  for (glass_isa isa : supported_isas()) {
    CHECK(glass_set_isa(isa) == GLASS_OK, "set_isa(%s)", glass_isa_name(isa));
    for (glass_qtype qt : {GLASS_Q8_0, GLASS_Q4_0})
      for (auto& s : shapes)
        for (glass_dtype dt : kDtypes)
          for (int gated = 0; gated < 2; ++gated)
            for (int bundled = 0; bundled < 2; ++bundled)
              for (int batched = 0; batched < 2; ++batched)
                for (auto& st : settings) {
                  if (batched && s[0] == 1) continue;
                  const int64_t B = s[0], T = s[1], d = s[2], D = s[3], k = s[4], n = gated ? 3 : 2;
                  const int64_t ldw = bundled ? n * d : d;
                  const glass_activation act = gated ? GLASS_ACT_SILU : GLASS_ACT_GELU;
                  std::vector<QRows> mats;
                  std::vector<const void*> ptr(n);
                  if (bundled) {
                    mats.push_back(make_qrows(qt, n, D, d, ldw, rng));
                    for (int64_t m = 0; m < n; ++m) ptr[m] = &mats[0].bytes[m * (d / 32) * qblock_bytes(qt)];
                  } else {
                    for (int64_t m = 0; m < n; ++m) mats.push_back(make_qrows(qt, 1, D, d, ldw, rng));
                    for (int64_t m = 0; m < n; ++m) ptr[m] = mats[m].bytes.data();
                  }
                  auto wv = [&](int64_t m, int64_t i, int64_t q) {
                    return bundled ? mats[0].w[m][i * d + q] : mats[m].w[0][i * d + q];
                  };
                  Buf x(dt, B * T * d), bi(dt, D), bo(dt, d), y(dt, B * T * d);
                  fill(x, rng, 1.0f);
                  fill(bi, rng, 0.5f);
                  fill(bo, rng, 0.5f);
                  const int64_t nsets = batched ? B : 1;
                  std::vector<int32_t> idx(nsets * k);
                  std::uniform_int_distribution<int32_t> ud(0, static_cast<int32_t>(D - 1));
                  for (auto& v : idx) v = ud(rng);
                  CHECK(glass_set_decode_tuning(st[0], st[1]) == GLASS_OK, "set_decode_tuning");
                  glass_status rc;
                  if (gated)
                    rc = glass_sparse_ffn_q(qt, dt, act, x.data(), B, T, d, ptr[0], ptr[1], ptr[2], ldw, D,
                                            idx.data(), k, batched, y.data());
                  else
                    rc = glass_sparse_mlp_q(qt, dt, act, x.data(), B, T, d, ptr[0], bi.data(), ptr[1],
                                            bo.data(), ldw, D, idx.data(), k, batched, y.data());
                  CHECK(rc == GLASS_OK, "sparse_*_q status %d: %s", rc, glass_last_error());
                  ++runs;
                  const double uo = unit_roundoff(dt);
                  const int64_t wo = gated ? 2 : 1;  // the output (down / out) matrix
                  for (int64_t b = 0; b < B; ++b)
                    for (int64_t t = 0; t < T; ++t) {
                      const int64_t row = b * T + t;
                      const int32_t* id = idx.data() + (batched ? b * k : 0);
                      std::vector<double> ref(d, gated ? 0.0 : bo.val[0] * 0.0), mag(d, 0.0), xr(d, 0.0);
                      // AVX2 / AVX-512 multiply the codes by x rounded to 16-bit fixed point per block
                      // of 32 (quant_rows.inc): each x value off by at most 2^-16 of its block's max |x|.
                      std::vector<double> xstep(d);
                      for (int64_t q0 = 0; q0 < d; q0 += 32) {
                        double m = 0;
                        for (int64_t q = q0; q < q0 + 32; ++q) m = std::max(m, std::fabs(x.val[row * d + q]));
                        for (int64_t q = q0; q < q0 + 32; ++q) xstep[q] = std::ldexp(m, -16);
                      }
                      for (int64_t q = 0; q < d && !gated; ++q) ref[q] = bo.val[q], mag[q] = std::fabs(bo.val[q]);
                      for (int64_t j = 0; j < k; ++j) {
                        const int64_t nn = id[j];
                        double g = 0, sg = 0, u = 0, su = 0, eg = 0, eu = 0;
                        for (int64_t q = 0; q < d; ++q) {
                          g += wv(0, nn, q) * x.val[row * d + q];
                          sg += std::fabs(wv(0, nn, q) * x.val[row * d + q]);
                          eg += std::fabs(wv(0, nn, q)) * xstep[q];
                          if (gated) {
                            u += wv(1, nn, q) * x.val[row * d + q];
                            su += std::fabs(wv(1, nn, q) * x.val[row * d + q]);
                            eu += std::fabs(wv(1, nn, q)) * xstep[q];
                          }
                        }
                        // |silu'|, |gelu'| < 1.13: the fixed-point x's error carried into h
                        const double he = gated ? 1.13 * (eg * std::fabs(u) + std::fabs(act_d(act, g)) * eu) : 1.13 * eg;
                        const double h = gated ? act_d(act, g) * u : act_d(act, g + bi.val[nn]);
                        const double hm = gated ? std::fabs(h) + 1.13 * (sg * std::fabs(u) + std::fabs(act_d(act, g)) * su)
                                                : std::fabs(h) + 1.13 * (sg + std::fabs(bi.val[nn]));
                        for (int64_t q = 0; q < d; ++q) {
                          ref[q] += h * wv(wo, nn, q);
                          mag[q] += hm * std::fabs(wv(wo, nn, q));
                          xr[q] += he * std::fabs(wv(wo, nn, q));
                        }
                      }
                      for (int64_t q = 0; q < d; ++q) {
                        // + the absolute rounding of fp16's subnormal outputs (spacing 2^-24)
                        const double bound = 4.0 * (d + k + 8) * kU32 * mag[q] + 2 * uo * std::fabs(ref[q]) + xr[q] +
                                             (dt == GLASS_F16 ? std::ldexp(1.0, -24) : 1e-30);
                        const double got = y.get(row * d + q);
                        CHECK(std::fabs(got - ref[q]) <= bound,
                              "%s %s %s gated %d bundled %d: y[%lld,%lld] = %.9g vs %.9g (bound %.3g)",
                              glass_isa_name(isa), qt == GLASS_Q8_0 ? "q8_0" : "q4_0", glass_isa_name(isa),
                              gated, bundled, static_cast<long long>(row), static_cast<long long>(q), got,
                              ref[q], bound);
                      }
                    }
                }
  }
  glass_set_isa(GLASS_ISA_AUTO);
  glass_set_decode_tuning(settings[0][0], settings[0][1]);
  float xf[64] = {0}, yf[64];
  uint8_t wq[34 * 8] = {0};
  int32_t two[2] = {0, 1};
  CHECK(glass_sparse_ffn_q(GLASS_Q8_0, GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 48, wq, wq, wq, 48, 2, two, 2, 0, yf) ==
            GLASS_ERR_SIZE, "d not a multiple of 32");
  CHECK(std::strstr(glass_last_error(), "multiples of 32") != nullptr, "message: %s", glass_last_error());
  CHECK(glass_sparse_ffn_q(GLASS_Q8_0, GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 32, wq, wq, wq, 48, 2, two, 2, 0, yf) ==
            GLASS_ERR_SIZE, "ldw not a multiple of 32");
  CHECK(glass_sparse_ffn_q(static_cast<glass_qtype>(5), GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 32, wq, wq, wq, 32, 2,
                           two, 2, 0, yf) == GLASS_ERR_ARG, "bad wtype");
  CHECK(glass_sparse_mlp_q(GLASS_Q4_0, GLASS_F32, GLASS_ACT_GELU, xf, 1, 1, 32, wq, nullptr, nullptr, nullptr, 32, 2,
                           two, 2, 0, yf) == GLASS_ERR_NULL, "w_out_t null");
  int32_t bad[2] = {0, 2};
  CHECK(glass_sparse_ffn_q(GLASS_Q4_0, GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 32, wq, wq, wq, 32, 2, bad, 2, 0, yf) ==
            GLASS_ERR_INDEX, "quantized idx out of range");
  // A NaN or inf in x reaches every output, on every path (the fixed-point x marks such a block NaN).
  for (glass_isa isa : supported_isas()) {
    glass_set_isa(isa);
    for (glass_qtype qt : {GLASS_Q8_0, GLASS_Q4_0})
      for (float bad_x : {std::nanf(""), INFINITY}) {
        QRows m = make_qrows(qt, 3, 6, 64, 3 * 64, rng);
        const uint8_t* base = m.bytes.data();
        const size_t rb = 2 * qblock_bytes(qt);  // one row of 64 values
        float xv[64], yv[64];
        for (float& v : xv) v = 0.25f;
        xv[40] = bad_x;
        int32_t sel[3] = {0, 2, 5};
        CHECK(glass_sparse_ffn_q(qt, GLASS_F32, GLASS_ACT_SILU, xv, 1, 1, 64, base, base + rb, base + 2 * rb, 3 * 64,
                                 6, sel, 3, 0, yv) == GLASS_OK, "non-finite x: status");
        for (float v : yv) CHECK(!std::isfinite(v), "%s: x[40] = %g gave a finite output %g", glass_isa_name(isa),
                                 bad_x, v);
      }
  }
  glass_set_isa(GLASS_ISA_AUTO);
  std::printf("quantized rows: %zu runs (Q8_0, Q4_0) against the double oracle\n", runs);
}

void test_errors() {
  float xf[8] = {0}, w[64] = {0}, y[8];
  int32_t idx[2] = {0, 1};
  int32_t bad[2] = {0, 4};
  int32_t neg[2] = {-1, 0};
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 8, w, w, w, 4, bad, 2, 0, y) ==
            GLASS_ERR_INDEX, "idx out of range");
  CHECK(std::strstr(glass_last_error(), "idx") != nullptr, "message names idx: %s", glass_last_error());
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 8, w, w, w, 4, neg, 2, 0, y) ==
            GLASS_ERR_INDEX, "negative idx");
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 8, w, w, w, 4, idx, 0, 0, y) ==
            GLASS_ERR_SIZE, "k = 0");
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, xf, 1, 0, 8, w, w, w, 4, idx, 2, 0, y) ==
            GLASS_ERR_SIZE, "T = 0");
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, nullptr, 1, 1, 8, w, w, w, 4, idx, 2, 0, y) ==
            GLASS_ERR_NULL, "x null");
  CHECK(std::strstr(glass_last_error(), "x") != nullptr, "message names x");
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 8, w, nullptr, w, 4, idx, 2, 0, y) ==
            GLASS_ERR_NULL, "w_up null");
  CHECK(glass_sparse_ffn(static_cast<glass_dtype>(7), GLASS_ACT_SILU, xf, 1, 1, 8, w, w, w, 4, idx,
                         2, 0, y) == GLASS_ERR_ARG, "bad dtype");
  CHECK(glass_sparse_ffn(GLASS_F32, static_cast<glass_activation>(9), xf, 1, 1, 8, w, w, w, 4, idx,
                         2, 0, y) == GLASS_ERR_ARG, "bad activation");
  // Batched: B * k indices are checked (the second sequence's set is the bad one).
  int32_t bidx[4] = {0, 1, 2, 4};
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, w, 2, 1, 8, w, w, w, 4, bidx, 2, 1, w) ==
            GLASS_ERR_INDEX, "batched idx");
  CHECK(glass_sparse_mlp(GLASS_F32, GLASS_ACT_GELU, xf, 1, 1, 8, w, nullptr, w, nullptr, 4, bad, 2,
                         0, y) == GLASS_ERR_INDEX, "mlp idx");
  CHECK(glass_sparse_mlp(GLASS_F32, GLASS_ACT_GELU, xf, 1, 1, 8, nullptr, nullptr, w, nullptr, 4,
                         idx, 2, 0, y) == GLASS_ERR_NULL, "mlp w_in null");
  CHECK(glass_sparse_mlp(GLASS_F32, GLASS_ACT_GELU, xf, 1, 1, -8, w, nullptr, w, nullptr, 4, idx,
                         2, 0, y) == GLASS_ERR_SIZE, "d < 0");
  float out[4] = {0};
  CHECK(glass_neuron_stats(GLASS_F32, nullptr, 1, 1, 4, nullptr, nullptr, out) == GLASS_ERR_NULL,
        "stats h null");
  CHECK(glass_neuron_stats(GLASS_F32, w, 1, 1, 4, nullptr, nullptr, nullptr) == GLASS_ERR_NULL,
        "stats out null");
  CHECK(glass_neuron_stats(GLASS_F32, w, 0, 1, 4, nullptr, nullptr, out) == GLASS_ERR_SIZE,
        "stats B = 0");
  float loc[4] = {1, 2, 3, 4};
  int32_t rg[4] = {1, 2, 3, 4}, rgbad[4] = {1, 2, 3, 5}, sel[4];
  CHECK(glass_select_neurons(loc, 1, 4, rg, 0.5, 0, sel) == GLASS_ERR_SIZE, "select k = 0");
  CHECK(std::strstr(glass_last_error(), "k") != nullptr, "message names k");
  CHECK(glass_select_neurons(loc, 1, 4, rg, 0.5, 5, sel) == GLASS_ERR_SIZE, "select k > D");
  CHECK(glass_select_neurons(loc, 1, 4, rgbad, 0.5, 2, sel) == GLASS_ERR_INDEX, "global_rank");
  CHECK(glass_select_neurons(loc, 1, 4, rg, 1.5, 2, sel) == GLASS_ERR_ARG, "lam > 1");
  CHECK(glass_select_neurons(loc, 1, 4, rg, std::nan(""), 2, sel) == GLASS_ERR_ARG, "lam NaN");
  CHECK(glass_select_neurons(nullptr, 1, 4, rg, 0.5, 2, sel) == GLASS_ERR_NULL, "local null");
  loc[2] = std::nanf("");
  CHECK(glass_select_neurons(loc, 1, 4, rg, 0.5, 2, sel) == GLASS_ERR_ARG, "NaN score");
  CHECK(glass_set_isa(static_cast<glass_isa>(42)) == GLASS_ERR_ARG, "bad isa");
  int g0 = 0, p0 = 0;
  glass_get_decode_tuning(&g0, &p0);
  CHECK(glass_set_decode_tuning(0, 0) == GLASS_ERR_ARG, "0 neurons in flight");
  CHECK(glass_set_decode_tuning(9, 0) == GLASS_ERR_ARG, "9 neurons in flight");
  CHECK(glass_set_decode_tuning(4, -1) == GLASS_ERR_ARG, "negative prefetch");
  CHECK(glass_set_decode_tuning(4, 65) == GLASS_ERR_ARG, "prefetch > 64");
  int g1 = 0, p1 = 0;
  glass_get_decode_tuning(&g1, &p1);
  CHECK(g1 == g0 && p1 == p0, "a rejected decode setting changes nothing");
  glass_get_decode_tuning(nullptr, nullptr);  // NULL outputs are allowed
  CHECK(glass_get_isa() != GLASS_ISA_AUTO, "auto resolves to a concrete ISA");
  CHECK(glass_sparse_ffn(GLASS_F32, GLASS_ACT_SILU, xf, 1, 1, 8, w, w, w, 4, idx, 2, 0, y) ==
            GLASS_OK, "a good call clears the error");
  CHECK(glass_last_error()[0] == '\0', "error cleared");
  std::printf("errors: ok\n");
}

// glass_set_threading: the values it takes, and what a build without OpenMP answers.
void test_threading() {
  const glass_threading before = glass_get_threading();
  CHECK(glass_set_threading(static_cast<glass_threading>(7)) == GLASS_ERR_ARG, "threading 7 accepted");
  CHECK(glass_get_threading() == before, "a refused threading changed the setting");
  const glass_status omp = glass_set_threading(GLASS_THREADING_OPENMP);
#if defined(_OPENMP)
  CHECK(omp == GLASS_OK && glass_get_threading() == GLASS_THREADING_OPENMP, "OpenMP threading refused");
#else
  CHECK(omp == GLASS_ERR_UNSUPPORTED && glass_get_threading() == before, "OpenMP threading without OpenMP");
#endif
  CHECK(glass_set_threading(GLASS_THREADING_POOL) == GLASS_OK && glass_get_threading() == GLASS_THREADING_POOL,
        "pool threading refused");
  std::printf("threading: pool%s\n", omp == GLASS_OK ? " and OpenMP" : " only (built without OpenMP)");
}

void test_names() {
  for (glass_isa isa : supported_isas()) {
    glass_set_isa(isa);
    std::string n = glass_kernel_name(GLASS_BF16, 1);
    // neon_ext / avx512_ext run per dtype either an extension kernel (..._neon_bf16, ..._avx512_bf16)
    // or the plain path (..._neon, ..._avx512).
    const std::string want = std::string("bf16_sparse_ffn__") +
                             (isa == GLASS_ISA_NEON_EXT     ? "neon"
                              : isa == GLASS_ISA_AVX512_EXT ? "avx512"
                                                            : glass_isa_name(isa));
    CHECK(n.compare(0, want.size(), want) == 0, "kernel name %s", n.c_str());
  }
  glass_set_isa(GLASS_ISA_AUTO);
  // GLASS_EXPECT_KERNELS=name,name,...: the gated kernels the automatic choice must run (CI sets it
  // per emulated CPU, so a run that silently fell back to another path fails).
  const char* expect = std::getenv("GLASS_EXPECT_KERNELS");
  if (expect && *expect) {
    std::string list(expect);
    size_t pos = 0;
    while (pos <= list.size()) {
      size_t end = list.find(',', pos);
      if (end == std::string::npos) end = list.size();
      const std::string name = list.substr(pos, end - pos);
      pos = end + 1;
      if (name.empty()) continue;
      bool found = false;
      for (glass_dtype dt : {GLASS_F32, GLASS_F16, GLASS_BF16}) found = found || name == glass_kernel_name(dt, 1);
      CHECK(found, "GLASS_EXPECT_KERNELS: %s is not what the automatic ISA (%s) runs", name.c_str(),
            glass_isa_name(glass_get_isa()));
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::printf("glass core tests; ISAs:");
  for (glass_isa isa : supported_isas()) std::printf(" %s", glass_isa_name(isa));
  std::printf(" (current %s: %s, %s, %s)\n", glass_isa_name(glass_get_isa()),
              glass_kernel_name(GLASS_F32, 1), glass_kernel_name(GLASS_F16, 1),
              glass_kernel_name(GLASS_BF16, 1));
  // --isa-report: only print the ISA chosen at load time (checks the GLASS_ISA override).
  if (argc > 1 && std::strcmp(argv[1], "--isa-report") == 0) return 0;
  test_errors();
  test_names();
  test_threading();
  test_select();
  test_stats();
  test_ffn();
  test_strided();
  test_quant();
  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
