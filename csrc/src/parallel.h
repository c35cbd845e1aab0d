// Tiny parallel layer: the only place that knows about threads, so a host stack can swap it.
//
//   parallel_items(n, nthreads, f)   calls f(item) once for every item in [0, n), items claimed
//                                    dynamically by the caller and up to nthreads - 1 helpers.
//
// Two implementations, chosen at run time (glass_set_threading, glass.h) when both are compiled in:
//  - the pool (default; CMake option GLASS_THREADPOOL, ON): a small persistent pool in which the
//    CALLER works too and waits only for items that a helper has actually claimed. A helper that is
//    not scheduled in time (a machine shared with other work) simply finds nothing left, and nobody
//    waits for it. Measured on the 2-core dev box under a load of ~3.5: an OpenMP parallel region
//    (whose join must wait for every team thread to arrive, scheduled or not) made sparse_ffn with
//    2 threads ~3x slower than with 1; with this pool 2 threads are never slower than 1.
//  - OpenMP (when the core is built with it): a parallel region running the same dynamic claim loop,
//    on the process's OpenMP team. Inside PyTorch that team is torch's own (same libgomp), awake
//    between torch's ops, where the pool's helpers would have to win a core from torch's spinning
//    threads first; glass_kernels switches to it in that case (glass_kernels/_ext.py).
//
// Everything in this header has internal linkage (anonymous namespace): it is included by files
// compiled with different ISA flags, and an inline function with external linkage could be merged
// by the linker into the AVX2 copy and SIGILL on an older CPU.
#pragma once

#include <cstdint>
#include <type_traits>

#if !defined(GLASS_THREADPOOL) && defined(_OPENMP)
#include <omp.h>
#endif

namespace glass {

int num_threads();  // api.cpp: the configured thread count (>= 1)
bool threading_openmp();  // api.cpp: true when glass_set_threading chose OpenMP (never without it)

// parallel.cpp: runs fn(ctx, item) for item in [0, n) on the caller + up to nthreads - 1 pool
// threads; returns when every item is done.
void pool_run(int64_t n, int nthreads, void (*fn)(void*, int64_t), void* ctx);

namespace {

template <class F>
static void parallel_items_thunk(void* ctx, int64_t item) {
  (*static_cast<F*>(ctx))(item);
}

template <class F>
static inline void parallel_items(int64_t n, int nthreads, F&& f) {
  if (n <= 0) return;
  if (nthreads > n) nthreads = static_cast<int>(n);
  if (nthreads <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
#if defined(GLASS_THREADPOOL) || !defined(_OPENMP)
  if (!threading_openmp()) {
    using Fn = typename std::remove_reference<F>::type;
    pool_run(n, nthreads, &parallel_items_thunk<Fn>, static_cast<void*>(&f));
    return;
  }
#endif
#if defined(_OPENMP)
  int64_t next = 0;
#pragma omp parallel num_threads(nthreads)
  for (;;) {
    const int64_t i = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
    if (i >= n) break;
    f(i);
  }
#endif
}

// Static split of [0, n) into parts contiguous ranges; range i is [*b, *e).
static inline void split_range(int64_t n, int i, int parts, int64_t* b, int64_t* e) {
  *b = n * i / parts;
  *e = n * (i + 1) / parts;
}

// parallel_for(n, nthreads, grain, f(begin, end)): [0, n) in blocks of >= grain, claimed
// dynamically (about 4 blocks per thread, for balance when a thread is slowed down).
template <class F>
static inline void parallel_for(int64_t n, int nthreads, int64_t grain, F&& f) {
  if (n <= 0) return;
  if (grain < 1) grain = 1;
  int64_t blocks = (n + grain - 1) / grain;
  const int64_t want = static_cast<int64_t>(nthreads) * 4;
  if (blocks > want) blocks = want;
  if (blocks < 1) blocks = 1;
  parallel_items(blocks, nthreads, [&](int64_t blk) {
    int64_t b, e;
    split_range(n, static_cast<int>(blk), static_cast<int>(blocks), &b, &e);
    if (b < e) f(b, e);
  });
}

}  // namespace
}  // namespace glass
