// The C ABI: argument validation, ISA dispatch, thread count, workspace, error messages.
#include <atomic>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#if defined(__linux__)
#include <sched.h>
#endif
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>
#include <vector>

#include "internal.h"
#include "parallel.h"

namespace glass {

namespace {
thread_local char g_error[512] = "";
std::atomic<int> g_threads{0};  // 0: OpenMP default

// Decode tuning (neuron_groups.inc). The defaults are a starting point, not a measurement of this
// machine: 4 neurons in flight per thread reached STREAM bandwidth where one at a time reached two
// thirds of it (a 2-core Xeon), and no software prefetch, the hardware's own being enough there.
// glass_kernels measures the best setting per CPU model (glass_kernels/tuning.py) and sets it with
// glass_set_decode_tuning; a vendoring stack can do the same, or set the environment variables.
constexpr int kDefaultGroup = 4;
constexpr int kDefaultPrefetch = 0;
constexpr int kMaxGroupSetting = 8;
constexpr int kMaxPrefetchSetting = 64;

int env_int(const char* var, int dflt, int lo, int hi) {
  const char* v = std::getenv(var);
  if (!v || !*v) return dflt;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (*end != '\0' || n < lo || n > hi) return dflt;  // a malformed value changes nothing
  return static_cast<int>(n);
}
std::atomic<int>& g_group() {
  static std::atomic<int> v{env_int("GLASS_NEURONS_IN_FLIGHT", kDefaultGroup, 1, kMaxGroupSetting)};
  return v;
}
std::atomic<int>& g_prefetch() {
  static std::atomic<int> v{env_int("GLASS_PREFETCH_NEURONS", kDefaultPrefetch, 0, kMaxPrefetchSetting)};
  return v;
}

#if defined(GLASS_HAVE_AVX512_BF16) && !defined(GLASS_AVX512_EMULATED)
// GLASS_ISA_AVX512_EXT: plain AVX-512, with the bf16 kernel replaced by the AVX512-BF16 one (its only
// extension kernel so far; AVX512-FP16 or VNNI kernels would join it here, each where the CPU has it).
const FfnTable& avx512_ext_table() {
  static const FfnTable tab = [] {
    FfnTable t = avx512::kTable;
    t.ffn[GLASS_BF16] = avx512_bf16::kFfnBf16;
    t.ffn_name[GLASS_BF16] = "bf16_sparse_ffn__avx512_bf16";
    t.mlp_name[GLASS_BF16] = "bf16_sparse_mlp__avx512_bf16";
    return t;
  }();
  return tab;
}
#define GLASS_AVX512_EXT_BUILT 1
#endif

#if defined(GLASS_HAVE_NEON)
// GLASS_ISA_NEON_EXT: plain NEON, with the fp16 and bf16 kernels replaced by the extension kernels
// this build has and this CPU runs (each extension is optional on its own in ARMv8.2-8.5).
const FfnTable& neon_ext_table() {
  static const FfnTable tab = [] {
    FfnTable t = neon::kTable;
#if defined(GLASS_HAVE_NEON_FHM)
    if (cpu_has_neon_fhm()) {
      t.ffn[GLASS_F16] = neon_fhm::kFfnF16;
      t.ffn_name[GLASS_F16] = "f16_sparse_ffn__neon_fhm";
      t.mlp_name[GLASS_F16] = "f16_sparse_mlp__neon_fhm";
    }
#endif
#if defined(GLASS_HAVE_NEON_BF16)
    if (cpu_has_neon_bf16()) {
      t.ffn[GLASS_BF16] = neon_bf16::kFfnBf16;
      t.ffn_name[GLASS_BF16] = "bf16_sparse_ffn__neon_bf16";
      t.mlp_name[GLASS_BF16] = "bf16_sparse_mlp__neon_bf16";
    }
#endif
    return t;
  }();
  return tab;
}

bool neon_ext_usable() {
  bool any = false;
#if defined(GLASS_HAVE_NEON_FHM)
  any = any || cpu_has_neon_fhm();
#endif
#if defined(GLASS_HAVE_NEON_BF16)
  any = any || cpu_has_neon_bf16();
#endif
  return any && cpu_has_neon();
}
#endif

const FfnTable* table_for(glass_isa isa) {
  switch (isa) {
    case GLASS_ISA_SCALAR: return &scalar::kTable;
#if defined(GLASS_HAVE_AVX2)
    case GLASS_ISA_AVX2: return &avx2::kTable;
#endif
#if defined(GLASS_HAVE_AVX512)
    case GLASS_ISA_AVX512: return &avx512::kTable;
#endif
#if defined(GLASS_AVX512_EXT_BUILT)
    case GLASS_ISA_AVX512_EXT: return &avx512_ext_table();
#endif
#if defined(GLASS_HAVE_NEON)
    case GLASS_ISA_NEON: return &neon::kTable;
    case GLASS_ISA_NEON_EXT: return &neon_ext_table();
#endif
    default: return nullptr;
  }
}

bool supported(glass_isa isa) {
  switch (isa) {
    case GLASS_ISA_AUTO:
    case GLASS_ISA_SCALAR: return true;
#if defined(GLASS_HAVE_AVX2)
    case GLASS_ISA_AVX2: return cpu_has_avx2();
#endif
#if defined(GLASS_HAVE_AVX512) && defined(GLASS_AVX512_EMULATED)
    case GLASS_ISA_AVX512: return cpu_has_avx2();  // test build: AVX-512 emulated with SIMDe on AVX2
#elif defined(GLASS_HAVE_AVX512)
    case GLASS_ISA_AVX512: return cpu_has_avx512();
#endif
#if defined(GLASS_AVX512_EXT_BUILT)
    case GLASS_ISA_AVX512_EXT: return cpu_has_avx512bf16();
#endif
#if defined(GLASS_HAVE_NEON)
    case GLASS_ISA_NEON: return cpu_has_neon();
    case GLASS_ISA_NEON_EXT: return neon_ext_usable();
#endif
    default: return false;
  }
}

glass_isa best_isa() {
  if (supported(GLASS_ISA_AVX512_EXT)) return GLASS_ISA_AVX512_EXT;
  if (supported(GLASS_ISA_AVX512)) return GLASS_ISA_AVX512;
  if (supported(GLASS_ISA_AVX2)) return GLASS_ISA_AVX2;
  if (supported(GLASS_ISA_NEON_EXT)) return GLASS_ISA_NEON_EXT;
  if (supported(GLASS_ISA_NEON)) return GLASS_ISA_NEON;
  return GLASS_ISA_SCALAR;
}

// The initial ISA: GLASS_ISA from the environment if set and usable, else the best one. An unknown
// or unsupported request falls back to the best path (a library must not abort its host); the
// reason is kept in the error slot of the loading thread.
glass_isa initial_isa() {
  const char* env = std::getenv("GLASS_ISA");
  if (!env || !*env || std::strcmp(env, "auto") == 0) return best_isa();
  for (int i = GLASS_ISA_SCALAR; i <= GLASS_ISA_LAST_; ++i) {
    glass_isa isa = static_cast<glass_isa>(i);
    if (std::strcmp(env, glass_isa_name(isa)) == 0) {
      if (supported(isa)) return isa;
      set_error("GLASS_ISA=%s is not compiled in or not supported by this CPU; using %s", env,
                glass_isa_name(best_isa()));
      return best_isa();
    }
  }
  set_error("GLASS_ISA=%s is unknown (scalar|avx2|avx512|avx512_ext|neon|neon_ext|auto); using %s", env,
            glass_isa_name(best_isa()));
  return best_isa();
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

// Per calling thread workspace (x in fp32 + per-thread accumulators), grown on demand and kept:
// a decode step must not allocate.
struct Workspace {
  std::vector<float> buf;
  float* get(size_t n) {
    if (buf.size() < n + 16) buf.resize(n + 16);
    uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
    return reinterpret_cast<float*>((p + 63) & ~static_cast<uintptr_t>(63));
  }
};
thread_local Workspace g_ws;

bool mul_ok(int64_t a, int64_t b, int64_t* r) {
  if (a > 0 && b > (INT64_MAX / a)) return false;
  *r = a * b;
  return true;
}

const char* dtype_ok(glass_dtype dt) {
  return (dt == GLASS_F32 || dt == GLASS_F16 || dt == GLASS_BF16) ? nullptr : "dtype";
}

glass_status check_idx(const char* what, const int32_t* idx, int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    if (idx[i] < 0 || idx[i] >= D) {
      set_error("%s: idx[%lld] = %d is out of range [0, D = %lld)", what, static_cast<long long>(i), idx[i],
                static_cast<long long>(D));
      return GLASS_ERR_INDEX;
    }
  }
  return GLASS_OK;
}

// qtype < 0: weights in `dtype`; else quantized weights (glass_qtype) with activations in `dtype`.
glass_status run_ffn(glass_dtype dtype, FfnArgs& a, const char* what, int qtype = -1) {
  g_error[0] = '\0';
  if (qtype >= 0 && qtype != GLASS_Q8_0 && qtype != GLASS_Q4_0) {
    set_error("%s: wtype = %d is not a glass_qtype", what, qtype);
    return GLASS_ERR_ARG;
  }
  if (dtype_ok(dtype)) {
    set_error("%s: dtype = %d is not a glass_dtype", what, static_cast<int>(dtype));
    return GLASS_ERR_ARG;
  }
  if (a.act < GLASS_ACT_SILU || a.act > GLASS_ACT_RELU) {
    set_error("%s: activation = %d is not a glass_activation", what, static_cast<int>(a.act));
    return GLASS_ERR_ARG;
  }
  struct { int64_t v; const char* n; } sizes[] = {{a.B, "B"}, {a.T, "T"}, {a.d, "d"}, {a.D, "D"},
                                                  {a.k, "k"}};
  for (auto& s : sizes)
    if (s.v <= 0) {
      set_error("%s: %s = %lld must be > 0", what, s.n, static_cast<long long>(s.v));
      return GLASS_ERR_SIZE;
    }
  if (a.ldw < a.d) {
    set_error("%s: ldw = %lld (the weights' row stride) must be >= d = %lld", what,
              static_cast<long long>(a.ldw), static_cast<long long>(a.d));
    return GLASS_ERR_SIZE;
  }
  if (qtype >= 0 && (a.d % kQBlock != 0 || a.ldw % kQBlock != 0)) {
    set_error("%s: quantized rows need d = %lld and ldw = %lld to be multiples of %d (the block size)",
              what, static_cast<long long>(a.d), static_cast<long long>(a.ldw), kQBlock);
    return GLASS_ERR_SIZE;
  }
  int64_t bt, btd, dd, bk;
  if (!mul_ok(a.B, a.T, &bt) || !mul_ok(bt, a.d, &btd) || !mul_ok(a.D, a.ldw, &dd) ||
      !mul_ok(a.B, a.k, &bk)) {
    set_error("%s: sizes overflow int64", what);
    return GLASS_ERR_SIZE;
  }
  glass_status st = check_idx(what, a.idx, a.idx_batched ? bk : a.k, a.D);
  if (st != GLASS_OK) return st;
  const FfnTable* tab = table_for(static_cast<glass_isa>(current_isa().load()));
  if (!tab) {
    set_error("%s: internal: no kernel table for the current ISA", what);
    return GLASS_ERR_INTERNAL;
  }
  int nt = num_threads();
  const int64_t nseq = a.idx_batched ? a.B : 1;
  const int64_t rows = a.idx_batched ? a.T : bt;
  // Chunks of ~48 neurons (enough to balance 2-16 threads and to amortise zeroing and summing
  // the chunk buffers), at most 64 per set, and at most ~4M floats of chunk buffers in all.
  int64_t nch = (a.k + 47) / 48;
  if (nch > 64) nch = 64;
  const int64_t cap = (int64_t(1) << 22) / (nseq * rows * a.d);
  if (nch > cap) {
    // Very long inputs (prefill-sized T): the buffers are big, keep one chunk per thread (the
    // result then depends on the thread count; it does not below this size).
    nch = cap > nt ? cap : nt;
    if (nch > a.k) nch = a.k;
  }
  if (nch * nseq < nt) nt = static_cast<int>(nch * nseq);
  if (nt < 1) nt = 1;
  a.nthreads = nt;
  a.nchunks = nch;
  decode_tuning(&a.group, &a.prefetch);
  a.xlen = x_floats(btd, qtype >= 0);
  a.buf_len = round16(rows * a.d);
  try {
    a.acc = g_ws.get(static_cast<size_t>(a.xlen + a.buf_len * nch * nseq));
  } catch (const std::bad_alloc&) {
    set_error("%s: cannot allocate the workspace", what);
    return GLASS_ERR_INTERNAL;
  }
  if (qtype >= 0)
    tab->qffn[qtype][dtype](a);
  else
    tab->ffn[dtype](a);
  return GLASS_OK;
}

}  // namespace

namespace {
// Default thread count: GLASS_NUM_THREADS, else OMP_NUM_THREADS (what torch and most stacks
// honour), else the CPUs this process may run on.
int default_threads() {
  for (const char* var : {"GLASS_NUM_THREADS", "OMP_NUM_THREADS"}) {
    const char* v = std::getenv(var);
    if (v && *v) {
      const int n = std::atoi(v);
      if (n > 0) return n;
    }
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
#endif
  const unsigned hc = std::thread::hardware_concurrency();
  return hc > 0 ? static_cast<int>(hc) : 1;
}
}  // namespace

void decode_tuning(int* group, int* prefetch) {
  *group = g_group().load();
  *prefetch = g_prefetch().load();
}

// Threading (parallel.h): which implementations this build has, and the one in use (-1: not yet
// read from GLASS_THREADING).
#if defined(_OPENMP)
constexpr bool kHaveOpenMP = true;
#else
constexpr bool kHaveOpenMP = false;
#endif
#if defined(GLASS_THREADPOOL) || !defined(_OPENMP)
constexpr bool kHavePool = true;
#else
constexpr bool kHavePool = false;
#endif
std::atomic<int> g_threading{-1};

int default_threading() {
  const char* v = std::getenv("GLASS_THREADING");
  if (v && std::strcmp(v, "openmp") == 0 && kHaveOpenMP) return GLASS_THREADING_OPENMP;
  if (v && std::strcmp(v, "pool") == 0 && kHavePool) return GLASS_THREADING_POOL;
  return kHavePool ? GLASS_THREADING_POOL : GLASS_THREADING_OPENMP;
}

#if (defined(__unix__) || defined(__APPLE__)) && defined(_OPENMP)
// GNU OpenMP cannot start a team in a forked child once the parent has used one (the child hangs),
// so a child (DataLoader workers, forking servers) goes back to the pool, which is fork-safe.
const int kPoolAfterFork =
    pthread_atfork(nullptr, nullptr, [] { g_threading.store(kHavePool ? GLASS_THREADING_POOL : -1); });
#endif

bool threading_openmp() {
  int t = g_threading.load(std::memory_order_relaxed);
  if (t < 0) {
    t = default_threading();
    g_threading.store(t, std::memory_order_relaxed);
  }
  return t == GLASS_THREADING_OPENMP;
}

int num_threads() {
  static const int dflt = default_threads();
  const int n = g_threads.load();
  return n > 0 ? n : dflt;
}

void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
}

}  // namespace glass

using namespace glass;

#define GLASS_REQUIRE_PTR(p, what)                              \
  do {                                                          \
    if (!(p)) {                                                 \
      set_error("%s: %s is NULL", what, #p);                    \
      return GLASS_ERR_NULL;                                    \
    }                                                           \
  } while (0)

// The gated / non-gated entry points, for float rows (qtype -1) and quantized rows alike: the
// pointer checks (named as the caller's arguments) and the FfnArgs run_ffn dispatches on.
static glass_status sparse_ffn_entry(const char* what, int qtype, glass_dtype dtype, glass_activation act,
                                     const void* x, int64_t B, int64_t T, int64_t d, const void* w_gate,
                                     const void* w_up, const void* w_down_t, int64_t ldw, int64_t D,
                                     const int32_t* idx, int64_t k, int idx_batched, void* y) {
  g_error[0] = '\0';
  GLASS_REQUIRE_PTR(x, what);
  GLASS_REQUIRE_PTR(w_gate, what);
  GLASS_REQUIRE_PTR(w_up, what);
  GLASS_REQUIRE_PTR(w_down_t, what);
  GLASS_REQUIRE_PTR(idx, what);
  GLASS_REQUIRE_PTR(y, what);
  FfnArgs a{};
  a.gated = 1;
  a.act = act;
  a.x = x;
  a.B = B; a.T = T; a.d = d; a.D = D;
  a.w1 = w_gate; a.w2 = w_up; a.w3 = w_down_t; a.ldw = ldw;
  a.idx = idx; a.k = k; a.idx_batched = idx_batched != 0;
  a.y = y;
  return run_ffn(dtype, a, what, qtype);
}

static glass_status sparse_mlp_entry(const char* what, int qtype, glass_dtype dtype, glass_activation act,
                                     const void* x, int64_t B, int64_t T, int64_t d, const void* w_in,
                                     const void* b_in, const void* w_out_t, const void* b_out, int64_t ldw,
                                     int64_t D, const int32_t* idx, int64_t k, int idx_batched, void* y) {
  g_error[0] = '\0';
  GLASS_REQUIRE_PTR(x, what);
  GLASS_REQUIRE_PTR(w_in, what);
  GLASS_REQUIRE_PTR(w_out_t, what);
  GLASS_REQUIRE_PTR(idx, what);
  GLASS_REQUIRE_PTR(y, what);
  FfnArgs a{};
  a.gated = 0;
  a.act = act;
  a.x = x;
  a.B = B; a.T = T; a.d = d; a.D = D;
  a.w1 = w_in; a.w3 = w_out_t; a.b_in = b_in; a.b_out = b_out; a.ldw = ldw;
  a.idx = idx; a.k = k; a.idx_batched = idx_batched != 0;
  a.y = y;
  return run_ffn(dtype, a, what, qtype);
}

extern "C" {

const char* glass_last_error(void) { return g_error; }

glass_status glass_sparse_ffn(glass_dtype dtype, glass_activation act, const void* x, int64_t B,
                              int64_t T, int64_t d, const void* w_gate, const void* w_up,
                              const void* w_down_t, int64_t D, const int32_t* idx, int64_t k,
                              int idx_batched, void* y) {
  return glass_sparse_ffn_strided(dtype, act, x, B, T, d, w_gate, w_up, w_down_t, d, D, idx, k,
                                  idx_batched, y);
}

glass_status glass_sparse_ffn_strided(glass_dtype dtype, glass_activation act, const void* x,
                                      int64_t B, int64_t T, int64_t d, const void* w_gate,
                                      const void* w_up, const void* w_down_t, int64_t ldw,
                                      int64_t D, const int32_t* idx, int64_t k, int idx_batched,
                                      void* y) {
  return sparse_ffn_entry("sparse_ffn", -1, dtype, act, x, B, T, d, w_gate, w_up, w_down_t, ldw, D, idx, k,
                          idx_batched, y);
}

glass_status glass_sparse_mlp(glass_dtype dtype, glass_activation act, const void* x, int64_t B,
                              int64_t T, int64_t d, const void* w_in, const void* b_in,
                              const void* w_out_t, const void* b_out, int64_t D,
                              const int32_t* idx, int64_t k, int idx_batched, void* y) {
  return glass_sparse_mlp_strided(dtype, act, x, B, T, d, w_in, b_in, w_out_t, b_out, d, D, idx, k,
                                  idx_batched, y);
}

glass_status glass_sparse_mlp_strided(glass_dtype dtype, glass_activation act, const void* x,
                                      int64_t B, int64_t T, int64_t d, const void* w_in,
                                      const void* b_in, const void* w_out_t, const void* b_out,
                                      int64_t ldw, int64_t D, const int32_t* idx, int64_t k,
                                      int idx_batched, void* y) {
  return sparse_mlp_entry("sparse_mlp", -1, dtype, act, x, B, T, d, w_in, b_in, w_out_t, b_out, ldw, D, idx, k,
                          idx_batched, y);
}

glass_status glass_sparse_ffn_q(glass_qtype wtype, glass_dtype dtype, glass_activation act,
                                const void* x, int64_t B, int64_t T, int64_t d, const void* w_gate,
                                const void* w_up, const void* w_down_t, int64_t ldw, int64_t D,
                                const int32_t* idx, int64_t k, int idx_batched, void* y) {
  return sparse_ffn_entry("sparse_ffn_q", static_cast<int>(wtype), dtype, act, x, B, T, d, w_gate, w_up, w_down_t,
                          ldw, D, idx, k, idx_batched, y);
}

glass_status glass_sparse_mlp_q(glass_qtype wtype, glass_dtype dtype, glass_activation act,
                                const void* x, int64_t B, int64_t T, int64_t d, const void* w_in,
                                const void* b_in, const void* w_out_t, const void* b_out, int64_t ldw,
                                int64_t D, const int32_t* idx, int64_t k, int idx_batched, void* y) {
  return sparse_mlp_entry("sparse_mlp_q", static_cast<int>(wtype), dtype, act, x, B, T, d, w_in, b_in, w_out_t,
                          b_out, ldw, D, idx, k, idx_batched, y);
}

const char* glass_qkernel_name(glass_qtype wtype) {
  const FfnTable* tab = table_for(glass_get_isa());
  if (!tab || (wtype != GLASS_Q8_0 && wtype != GLASS_Q4_0)) return "unknown";
  return tab->qffn_name[wtype];
}

glass_status glass_neuron_stats(glass_dtype dtype, const void* h, int64_t B, int64_t T, int64_t D,
                                const float* down_norms, const uint8_t* mask, float* out) {
  g_error[0] = '\0';
  GLASS_REQUIRE_PTR(h, "neuron_stats");
  GLASS_REQUIRE_PTR(out, "neuron_stats");
  if (dtype_ok(dtype)) {
    set_error("neuron_stats: dtype = %d is not a glass_dtype", static_cast<int>(dtype));
    return GLASS_ERR_ARG;
  }
  struct { int64_t v; const char* n; } sizes[] = {{B, "B"}, {T, "T"}, {D, "D"}};
  for (auto& s : sizes)
    if (s.v <= 0) {
      set_error("neuron_stats: %s = %lld must be > 0", s.n, static_cast<long long>(s.v));
      return GLASS_ERR_SIZE;
    }
  int64_t bt, btd;
  if (!mul_ok(B, T, &bt) || !mul_ok(bt, D, &btd)) {
    set_error("neuron_stats: sizes overflow int64");
    return GLASS_ERR_SIZE;
  }
  return neuron_stats_impl(dtype, h, B, T, D, down_norms, mask, out, num_threads());
}

glass_status glass_select_neurons(const float* local, int64_t B, int64_t D,
                                  const int32_t* global_rank, double lam, int64_t k,
                                  int32_t* out) {
  g_error[0] = '\0';
  GLASS_REQUIRE_PTR(local, "select_neurons");
  GLASS_REQUIRE_PTR(global_rank, "select_neurons");
  GLASS_REQUIRE_PTR(out, "select_neurons");
  if (B <= 0) {
    set_error("select_neurons: B = %lld must be > 0", static_cast<long long>(B));
    return GLASS_ERR_SIZE;
  }
  if (D <= 0 || D > INT32_MAX) {
    set_error("select_neurons: D = %lld must be in [1, 2^31)", static_cast<long long>(D));
    return GLASS_ERR_SIZE;
  }
  if (k < 1 || k > D) {
    set_error("select_neurons: k = %lld must be in [1, D = %lld]", static_cast<long long>(k),
              static_cast<long long>(D));
    return GLASS_ERR_SIZE;
  }
  if (!(lam >= 0.0 && lam <= 1.0)) {
    set_error("select_neurons: lam = %g must be in [0, 1]", lam);
    return GLASS_ERR_ARG;
  }
  int64_t bd;
  if (!mul_ok(B, D, &bd)) {
    set_error("select_neurons: sizes overflow int64");
    return GLASS_ERR_SIZE;
  }
  for (int64_t i = 0; i < D; ++i)
    if (global_rank[i] < 1 || global_rank[i] > D) {
      set_error("select_neurons: global_rank[%lld] = %d is out of range [1, D = %lld]",
                static_cast<long long>(i), global_rank[i], static_cast<long long>(D));
      return GLASS_ERR_INDEX;
    }
  return select_neurons_impl(local, B, D, global_rank, lam, k, out, num_threads());
}

glass_status glass_set_isa(glass_isa isa) {
  g_error[0] = '\0';
  if (isa < GLASS_ISA_AUTO || isa > GLASS_ISA_LAST_) {
    set_error("set_isa: isa = %d is not a glass_isa", static_cast<int>(isa));
    return GLASS_ERR_ARG;
  }
  if (isa == GLASS_ISA_AUTO) isa = best_isa();
  if (!supported(isa)) {
    set_error("set_isa: %s is not compiled in or not supported by this CPU", glass_isa_name(isa));
    return GLASS_ERR_UNSUPPORTED;
  }
  current_isa().store(static_cast<int>(isa));
  return GLASS_OK;
}

glass_isa glass_get_isa(void) { return static_cast<glass_isa>(current_isa().load()); }

int glass_isa_supported(glass_isa isa) {
  if (isa == GLASS_ISA_AUTO) return 1;
  return (table_for(isa) != nullptr && supported(isa)) ? 1 : 0;
}

const char* glass_isa_name(glass_isa isa) {
  switch (isa) {
    case GLASS_ISA_AUTO: return "auto";
    case GLASS_ISA_SCALAR: return "scalar";
    case GLASS_ISA_AVX2: return "avx2";
    case GLASS_ISA_AVX512: return "avx512";
    case GLASS_ISA_NEON: return "neon";
    case GLASS_ISA_NEON_EXT: return "neon_ext";
    case GLASS_ISA_AVX512_EXT: return "avx512_ext";
    default: return "unknown";
  }
}

const char* glass_kernel_name(glass_dtype dtype, int gated) {
  if (dtype_ok(dtype)) return "unknown";
  const FfnTable* tab = table_for(glass_get_isa());
  if (!tab) return "unknown";
  return gated ? tab->ffn_name[dtype] : tab->mlp_name[dtype];
}

void glass_set_num_threads(int n) { g_threads.store(n > 0 ? n : 0); }

glass_status glass_set_threading(glass_threading threading) {
  g_error[0] = '\0';
  if (threading != GLASS_THREADING_POOL && threading != GLASS_THREADING_OPENMP) {
    set_error("set_threading: %d is not a glass_threading value", static_cast<int>(threading));
    return GLASS_ERR_ARG;
  }
  if ((threading == GLASS_THREADING_OPENMP && !kHaveOpenMP) || (threading == GLASS_THREADING_POOL && !kHavePool)) {
    set_error("set_threading: this build of the core has no %s threading",
              threading == GLASS_THREADING_OPENMP ? "OpenMP" : "pool");
    return GLASS_ERR_UNSUPPORTED;
  }
  g_threading.store(threading, std::memory_order_relaxed);
  return GLASS_OK;
}

glass_threading glass_get_threading(void) {
  return threading_openmp() ? GLASS_THREADING_OPENMP : GLASS_THREADING_POOL;
}

glass_status glass_set_decode_tuning(int neurons_in_flight, int prefetch_neurons) {
  g_error[0] = '\0';
  if (neurons_in_flight < 1 || neurons_in_flight > kMaxGroupSetting) {
    set_error("set_decode_tuning: neurons_in_flight = %d is outside [1, %d]", neurons_in_flight,
              kMaxGroupSetting);
    return GLASS_ERR_ARG;
  }
  if (prefetch_neurons < 0 || prefetch_neurons > kMaxPrefetchSetting) {
    set_error("set_decode_tuning: prefetch_neurons = %d is outside [0, %d]", prefetch_neurons,
              kMaxPrefetchSetting);
    return GLASS_ERR_ARG;
  }
  g_group().store(neurons_in_flight);
  g_prefetch().store(prefetch_neurons);
  return GLASS_OK;
}

void glass_get_decode_tuning(int* neurons_in_flight, int* prefetch_neurons) {
  int g, p;
  decode_tuning(&g, &p);
  if (neurons_in_flight) *neurons_in_flight = g;
  if (prefetch_neurons) *prefetch_neurons = p;
}

int glass_get_num_threads(void) { return num_threads(); }

}  // extern "C"
