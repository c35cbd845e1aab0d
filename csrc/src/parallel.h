// Tiny parallel layer over OpenMP: the only place that knows about the threading runtime, so a host
// stack can swap it. Everything here has internal linkage (anonymous namespace): this header is
// included by files compiled with different ISA flags, and an inline function with external linkage
// could be merged by the linker into the AVX2 copy and SIGILL on an older CPU.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace glass {

int num_threads();  // api.cpp: the configured thread count (>= 1)

namespace {

// Runs f(tid, nthreads) on up to n threads; f may call barrier(). nthreads is the team size actually
// obtained (can be smaller than n), callers size per-thread buffers for n.
template <class F>
inline void parallel_region(int n, F&& f) {
#ifdef _OPENMP
  if (n > 1) {
#pragma omp parallel num_threads(n)
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  (void)n;
  f(0, 1);
}

inline void barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Static split of [0, n) into nthreads contiguous chunks; chunk tid is [*b, *e).
inline void split_range(int64_t n, int tid, int nthreads, int64_t* b, int64_t* e) {
  *b = n * tid / nthreads;
  *e = n * (tid + 1) / nthreads;
}

// parallel_for(n, nthreads, f(begin, end)) over contiguous chunks; grain is the minimum chunk so
// that tiny loops stay on one thread (a fork/join costs a few microseconds).
template <class F>
inline void parallel_for(int64_t n, int nthreads, int64_t grain, F&& f) {
  if (n <= 0) return;
  int64_t max_by_grain = grain > 0 ? (n + grain - 1) / grain : n;
  int nt = static_cast<int>(max_by_grain < nthreads ? max_by_grain : nthreads);
  if (nt < 1) nt = 1;
  parallel_region(nt, [&](int tid, int nthr) {
    int64_t b, e;
    split_range(n, tid, nthr, &b, &e);
    if (b < e) f(b, e);
  });
}

}  // namespace
}  // namespace glass
