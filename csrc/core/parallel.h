// Minimal fork-join parallelism for the CPU kernels: on the host process's OpenMP team when one is
// loaded, else on kcore's own persistent thread pool (no OpenMP dependency in the wheel).
#pragma once
#include <cstdint>
#include <functional>

namespace kcore {

// Threads the CPU kernels may use: $KCORE_NUM_THREADS if set (>= 1), else the hardware count;
// read once, at the first call.
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), each of at least `grain` items, on up
// to num_threads() threads of a persistent pool (the caller's thread included; workers are started
// once, at the first parallel call). Runs inline, as fn(0, n), when one chunk suffices, when called
// from inside a chunk (nested), or when another thread's call holds the pool. The first exception
// thrown by a chunk is rethrown to the caller after all chunks finish. Fork-safe: a forked child
// starts a fresh pool.
// Inside a host-OpenMP scope of the calling thread (or everywhere with $KCORE_HOST_OPENMP=1; never
// with =0), when the process has an OpenMP runtime loaded (PyTorch's libgomp), the chunks run on
// its team instead of kcore's pool: see parallel.cpp for why and when.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Scopes nest per thread; kcore's Hugging Face hooks open one around their native calls.
void enter_host_openmp_scope();
void exit_host_openmp_scope();

// "host-openmp" or "kcore-pool": what the next parallel_for of the calling thread would run on.
const char* parallel_backend();

}  // namespace kcore
