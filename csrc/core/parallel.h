// Minimal fork-join parallelism for the CPU kernels (no OpenMP dependency in the wheel).
#pragma once
#include <cstdint>
#include <functional>

namespace kcore {

// Threads the CPU kernels may use: $KCORE_NUM_THREADS if set (>= 1), else the hardware count;
// read once, at the first call.
int num_threads();

// Calls fn(begin, end) on disjoint chunks covering [0, n), each of at least `grain` items, on up
// to num_threads() threads (the caller's thread included); runs inline when one chunk suffices.
// The first exception thrown by a chunk is rethrown to the caller after all chunks finish.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

}  // namespace kcore
