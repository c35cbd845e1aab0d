// The thread pool behind parallel_items (see parallel.h for why it exists).
//
// Protocol. The caller publishes a job (fn, ctx, n) under a new job id, wakes the helpers, then
// claims items itself from an atomic counter. A helper that wakes up registers in `active` and
// re-checks that the job is still open before it touches fn/ctx; the caller, once every claimed
// item is finished, closes the job and waits only for helpers registered at that moment (which
// are running: they see `closed` and leave at once). A helper still waiting for a CPU never
// delays the caller.
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include "parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GLASS_PAUSE() _mm_pause()
#elif defined(__aarch64__)
#define GLASS_PAUSE() __asm__ __volatile__("yield")
#else
#define GLASS_PAUSE() ((void)0)
#endif

namespace glass {
namespace {

class Pool {
 public:
  void run(int64_t n, int nthreads, void (*fn)(void*, int64_t), void* ctx) {
    std::lock_guard<std::mutex> one_job(run_mu_);  // one job at a time (calls from many threads)
    ensure_helpers(nthreads - 1);
    fn_ = fn;
    ctx_ = ctx;
    n_ = n;
    next_.store(0);
    done_.store(0);
    want_.store(nthreads - 1);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_.fetch_add(1);
    }
    cv_.notify_all();
    work();
    // Every item claimed by a helper must finish (they are running: they claimed it).
    for (int spin = 0; done_.load(std::memory_order_acquire) < n_; ++spin) {
      if (spin < 4096) GLASS_PAUSE(); else std::this_thread::yield();
    }
    closed_.store(job_.load());
    for (int spin = 0; active_.load() != 0; ++spin) {
      if (spin < 4096) GLASS_PAUSE(); else std::this_thread::yield();
    }
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }

 private:
  void work() {
    for (;;) {
      const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= n_) return;
      fn_(ctx_, i);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  void helper(int rank) {
    uint64_t seen = job_.load();
    for (;;) {
      // Short spin first: decode calls one layer after another, a sleep/wake per call costs more.
      uint64_t j = job_.load();
      for (int spin = 0; j == seen && spin < 5000 && !stop_.load(); ++spin) {
        GLASS_PAUSE();
        j = job_.load();
      }
      if (j == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_.load() || job_.load() != seen; });
        if (stop_.load()) return;
        j = job_.load();
      }
      seen = j;
      active_.fetch_add(1);
      // The job may already be closed (this helper was late) or not want this many helpers.
      if (closed_.load() < j && rank < want_.load()) work();
      active_.fetch_sub(1);
    }
  }

  void ensure_helpers(int n) {
    while (static_cast<int>(threads_.size()) < n) {
      const int rank = static_cast<int>(threads_.size());
      threads_.emplace_back([this, rank] { helper(rank); });
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_;
  std::vector<std::thread> threads_;
  std::atomic<bool> stop_{false};
  std::atomic<uint64_t> job_{0}, closed_{0};
  std::atomic<int> active_{0}, want_{0};
  std::atomic<int64_t> next_{0}, done_{0};
  void (*fn_)(void*, int64_t) = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0;
};

// Never destroyed: helpers may outlive static destruction. After fork() the child has none of the
// parent's helper threads (and maybe a held mutex): it starts over with a fresh, empty pool.
std::atomic<Pool*> g_pool{nullptr};
std::once_flag g_pool_once;

Pool& pool() {
  std::call_once(g_pool_once, [] {
    g_pool.store(new Pool());
#if defined(__unix__) || defined(__APPLE__)
    pthread_atfork(nullptr, nullptr, [] { g_pool.store(new Pool()); });
#endif
  });
  return *g_pool.load();
}

}  // namespace

void pool_run(int64_t n, int nthreads, void (*fn)(void*, int64_t), void* ctx) {
  pool().run(n, nthreads, fn, ctx);
}

}  // namespace glass
