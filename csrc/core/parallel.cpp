#include "core/parallel.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

namespace kcore {

static int detect_num_threads() {
  if (const char* env = std::getenv("KCORE_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

int num_threads() {
  // Read once: hardware_concurrency() reads /sys on every call (~5 us), too slow for small ops.
  static const int n = detect_num_threads();
  return n;
}

namespace {

// True on pool workers, and on a caller while it runs a job: a parallel_for from there runs inline
// (the workers are busy with the outer job; waiting for them would deadlock).
thread_local bool t_inside_job = false;

// Persistent workers parked on a condition variable. Starting std::threads on every call cost tens
// of microseconds per thread, more than small kernels (~0.3 ms) gained from splitting.
// One job at a time: `busy` is held by the caller for the whole job; a second caller that finds it
// taken runs its loop inline instead of waiting (no deadlock, and callers on several Python threads
// still run in parallel with each other).
class Pool {
 public:
  explicit Pool(int workers) {
    // A worker that cannot be started (thread limit reached) only means fewer helpers: chunks are
    // claimed dynamically, so the caller runs whatever no worker takes.
    try {
      for (; num_workers_ < workers; ++num_workers_) {
        // Detached on purpose, and the Pool is never destroyed: joining from a static destructor
        // at interpreter exit can deadlock (the loader lock, or workers already killed), and
        // parked workers hold no resource the OS does not reclaim at exit.
        std::thread([this] { worker_loop(); }).detach();
      }
    } catch (const std::system_error&) {
    }
  }

  std::mutex busy;

  // Runs fn on chunks [n*c/chunks, n*(c+1)/chunks), c < chunks; the caller holds `busy`.
  void run(int64_t n, int64_t chunks, const std::function<void(int64_t, int64_t)>& fn) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      fn_ = &fn;
      n_ = n;
      chunks_ = chunks;
      next_.store(0, std::memory_order_relaxed);
      error_ = nullptr;
      ++generation_;
    }
    // Wake only as many workers as there are chunks beyond the caller's own.
    if (chunks - 1 >= num_workers_) {
      work_cv_.notify_all();
    } else {
      for (int64_t i = 0; i < chunks - 1; ++i) work_cv_.notify_one();
    }
    t_inside_job = true;
    claim_chunks();
    t_inside_job = false;
    std::unique_lock<std::mutex> lock(mutex_);
    // All chunks are claimed now (the caller's loop ran dry); wait for workers still running one.
    done_cv_.wait(lock, [this] { return inside_ == 0; });
    fn_ = nullptr;
    if (error_) {
      std::exception_ptr e = error_;
      error_ = nullptr;
      lock.unlock();
      std::rethrow_exception(e);
    }
  }

 private:
  void claim_chunks() {
    for (;;) {
      const int64_t c = next_.fetch_add(1, std::memory_order_relaxed);
      if (c >= chunks_) return;
      try {
        (*fn_)(n_ * c / chunks_, n_ * (c + 1) / chunks_);
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!error_) error_ = std::current_exception();
      }
    }
  }

  void worker_loop() {
    t_inside_job = true;
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_cv_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      // A worker that wakes after every chunk is claimed stays out, so the caller never waits for
      // it and never returns while it could still touch the job.
      if (next_.load(std::memory_order_relaxed) >= chunks_) continue;
      ++inside_;
      lock.unlock();
      claim_chunks();
      lock.lock();
      if (--inside_ == 0) done_cv_.notify_one();
    }
  }

  int num_workers_ = 0;
  std::mutex mutex_;  // guards the job fields below, except next_ (claimed lock-free)
  std::condition_variable work_cv_, done_cv_;
  const std::function<void(int64_t, int64_t)>* fn_ = nullptr;
  int64_t n_ = 0, chunks_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
  int inside_ = 0;
  std::exception_ptr error_;
};

std::atomic<Pool*> g_pool{nullptr};
std::mutex g_create_mutex;

// fork() copies only the calling thread: in the child the workers are gone and the pool's mutexes
// may be held by threads that no longer exist. The child drops the old pool (leaked: destroying a
// mutex that may be locked is undefined) and builds a new one on its next parallel call.
void before_fork() { g_create_mutex.lock(); }
void after_fork_parent() { g_create_mutex.unlock(); }
void after_fork_child() {
  g_pool.store(nullptr, std::memory_order_relaxed);
  t_inside_job = false;
  g_create_mutex.unlock();
}

Pool* get_pool() {
  Pool* pool = g_pool.load(std::memory_order_acquire);
  if (pool) return pool;
  static bool atfork_registered = false;
  std::lock_guard<std::mutex> lock(g_create_mutex);
  pool = g_pool.load(std::memory_order_acquire);
  if (!pool) {
    if (!atfork_registered) {
      pthread_atfork(before_fork, after_fork_parent, after_fork_child);
      atfork_registered = true;
    }
    pool = new Pool(num_threads() - 1);  // never deleted: see Pool()
    g_pool.store(pool, std::memory_order_release);
  }
  return pool;
}

}  // namespace

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  // Every chunk gets at least `grain` items: chunk sizes are floor or ceil of n / chunks >= grain.
  const int64_t chunks = std::min<int64_t>(num_threads(), n / grain);
  if (chunks <= 1 || t_inside_job) {
    fn(0, n);
    return;
  }
  Pool* pool = get_pool();
  std::unique_lock<std::mutex> busy(pool->busy, std::try_to_lock);
  if (!busy.owns_lock()) {
    fn(0, n);  // another thread's job holds the workers: run this one on the calling thread
    return;
  }
  pool->run(n, chunks, fn);
}

}  // namespace kcore
