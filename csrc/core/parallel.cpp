#include "core/parallel.h"

#include <dlfcn.h>
#include <link.h>
#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>
#include <string>
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

// ---------------------------------------------------------------- the host's OpenMP runtime
//
// Called from PyTorch, kcore's kernels run between torch ops, and torch's OpenMP workers spin for
// a while after each parallel region (libgomp's default wait policy) holding the cores kcore's own
// pool needs: on 2 cores a 100k-token memory-attention decode step took 82 ms per token inside
// the model against 52 ms alone. So when the process has an OpenMP runtime loaded (torch's
// libgomp, or libiomp5 / libomp, which export the same GOMP_parallel entry point), kcore runs its
// chunks on that runtime's team, the very threads that are spinning, and uses its own pool
// only otherwise. Found at run time with dl_iterate_phdr + dlsym (nothing linked): the wheel keeps
// no OpenMP dependency and works without torch. When it applies: host_mode() below.

using GompParallelFn = void (*)(void (*)(void*), void*, unsigned, unsigned);

struct HostOpenMP {
  GompParallelFn parallel;  // null: found, but not to be used by this process (a forked child)
  pid_t pid;                // the process that decided: a forked child decides again
};

std::atomic<HostOpenMP*> g_host_omp{nullptr};
std::mutex g_probe_mutex;
unsigned long long g_probe_adds = ~0ull;  // dlpi_adds at the last unsuccessful probe

struct ProbeState {
  bool first = true;
  std::string path;  // set when an OpenMP runtime is found
};

int probe_object(struct dl_phdr_info* info, size_t size, void* data) {
  auto* st = static_cast<ProbeState*>(data);
  // The first object tells whether any library was loaded since the last probe: a miss then costs
  // one callback, not a walk over every loaded object.
  if (st->first) {
    st->first = false;
    if (size >= offsetof(struct dl_phdr_info, dlpi_adds) + sizeof(info->dlpi_adds)) {
      if (info->dlpi_adds == g_probe_adds) return 1;  // nothing loaded since: still none
      g_probe_adds = info->dlpi_adds;
    }
  }
  const char* name = info->dlpi_name;
  if (name == nullptr || *name == '\0') return 0;
  const char* slash = std::strrchr(name, '/');
  const char* base = slash ? slash + 1 : name;
  if (std::strncmp(base, "libgomp", 7) == 0 || std::strncmp(base, "libiomp5", 8) == 0 ||
      std::strncmp(base, "libomp.", 7) == 0) {
    st->path = name;
    return 1;
  }
  return 0;
}

// The lines of /proc/<pid>/maps that map `path`; false if the file cannot be read.
bool mappings_of(const std::string& pid, const std::string& path, std::vector<std::string>& out) {
  std::FILE* f = std::fopen(("/proc/" + pid + "/maps").c_str(), "r");
  if (f == nullptr) return false;
  char line[4096];
  while (std::fgets(line, sizeof line, f)) {
    if (std::strstr(line, path.c_str())) out.emplace_back(line);
  }
  std::fclose(f);
  return true;
}

// True when this process may be a fork() child of a process that had the OpenMP runtime loaded:
// libgomp does not survive fork() after it started its workers (GOMP_parallel then waits forever
// for threads that do not exist in the child), and PyTorch marks such children itself but says
// so to no one. A child made by fork() alone maps every library at the parent's addresses, while
// a new program (exec) gets its own (ASLR): the same mappings in the parent mean a fork child.
// If the parent's maps cannot be read, assume the worst.
bool maybe_forked_from_openmp_user(const std::string& path) {
  std::vector<std::string> mine, parents;
  if (!mappings_of("self", path, mine) || mine.empty()) return true;
  if (!mappings_of(std::to_string(getppid()), path, parents)) return true;
  return parents == mine;
}

// $KCORE_HOST_OPENMP: "0" never, "1" always, anything else (default) only inside a
// HostOpenMPScope. The default keeps kcore from being the one that starts libgomp's workers: a
// process whose workers were started and which then forks cannot use torch in the child
// (libgomp hangs there). Inside the scopes (kcore's Hugging Face hooks, which run during or right
// after the model's forward pass) torch has already started them.
enum class HostMode { never, scoped, always };

HostMode host_mode() {
  static const HostMode mode = [] {
    const char* env = std::getenv("KCORE_HOST_OPENMP");
    if (env == nullptr) return HostMode::scoped;
    for (const char* off : {"0", "false", "no", "off", "FALSE", "False", "NO", "OFF"}) {
      if (std::strcmp(env, off) == 0) return HostMode::never;
    }
    for (const char* on : {"1", "true", "yes", "on", "TRUE", "True", "YES", "ON"}) {
      if (std::strcmp(env, on) == 0) return HostMode::always;
    }
    return HostMode::scoped;  // unset or anything else: the default
  }();
  return mode;
}

thread_local int t_host_scope = 0;

bool host_openmp_allowed() {
  const HostMode mode = host_mode();
  return mode == HostMode::always || (mode == HostMode::scoped && t_host_scope > 0);
}

void probe_lock() { g_probe_mutex.lock(); }
void probe_unlock() { g_probe_mutex.unlock(); }

const HostOpenMP* host_openmp() {
  if (!host_openmp_allowed()) return nullptr;
  // No thread may hold the probe lock across fork(): the child takes it to decide again.
  static const int atfork = pthread_atfork(probe_lock, probe_unlock, probe_unlock);
  (void)atfork;
  const pid_t pid = getpid();
  HostOpenMP* h = g_host_omp.load(std::memory_order_acquire);
  if (h == nullptr || h->pid != pid) {
    std::lock_guard<std::mutex> lock(g_probe_mutex);
    h = g_host_omp.load(std::memory_order_acquire);
    if (h != nullptr && h->pid != pid) {
      // Decided by the parent before this process forked: never use the parent's team here.
      h = new HostOpenMP{nullptr, pid};  // the parent's record is leaked (its owner is gone)
      g_host_omp.store(h, std::memory_order_release);
    } else if (h == nullptr) {
      ProbeState st;
      dl_iterate_phdr(probe_object, &st);
      if (st.path.empty()) return nullptr;  // none loaded yet: probed again once a library loads
      void* lib = dlopen(st.path.c_str(), RTLD_LAZY | RTLD_NOLOAD);  // already loaded: no side effect
      void* sym = lib ? dlsym(lib, "GOMP_parallel") : nullptr;
      GompParallelFn fn = reinterpret_cast<GompParallelFn>(sym);
      if (fn != nullptr && maybe_forked_from_openmp_user(st.path)) fn = nullptr;
      h = new HostOpenMP{fn, pid};  // kept for the process
      g_host_omp.store(h, std::memory_order_release);
    }
  }
  return h->parallel != nullptr ? h : nullptr;
}

struct OmpJob {
  const std::function<void(int64_t, int64_t)>* fn;
  int64_t n, chunks;
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::exception_ptr error;
};

// Run by every thread of the OpenMP team (the caller included). Chunks are claimed dynamically,
// so a smaller team than asked for still covers every chunk. No exception may leave an OpenMP
// region: the first one is kept and rethrown by the caller.
void omp_team_body(void* data) {
  auto* job = static_cast<OmpJob*>(data);
  const bool was_inside = t_inside_job;
  t_inside_job = true;
  for (;;) {
    const int64_t c = job->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= job->chunks) break;
    try {
      (*job->fn)(job->n * c / job->chunks, job->n * (c + 1) / job->chunks);
    } catch (...) {
      std::lock_guard<std::mutex> lock(job->error_mutex);
      if (!job->error) job->error = std::current_exception();
    }
  }
  t_inside_job = was_inside;
}

}  // namespace

void enter_host_openmp_scope() { ++t_host_scope; }
void exit_host_openmp_scope() {
  if (t_host_scope > 0) --t_host_scope;
}

const char* parallel_backend() {
  return host_openmp() ? "host-openmp" : "kcore-pool";
}

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  // Every chunk gets at least `grain` items: chunk sizes are floor or ceil of n / chunks >= grain.
  const int64_t chunks = std::min<int64_t>(num_threads(), n / grain);
  if (chunks <= 1 || t_inside_job) {
    fn(0, n);
    return;
  }
  if (const HostOpenMP* omp = host_openmp()) {
    OmpJob job;
    job.fn = &fn;
    job.n = n;
    job.chunks = chunks;
    omp->parallel(omp_team_body, &job, static_cast<unsigned>(chunks), 0);
    if (job.error) std::rethrow_exception(job.error);
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
