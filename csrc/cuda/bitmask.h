// CUDA entry of the token-bitmask op (compiled only when KCORE_WITH_CUDA). Plain C++ header: the
// binding layer includes it without the CUDA toolkit headers.
#pragma once
#include <string>

#include "core/bitmask.h"

namespace kcore::cuda {

// Launches the kernel on `stream` (a cudaStream_t); every pointer in `args` is a device pointer.
// Returns an empty string on success, else the CUDA error text (launch errors only: the kernel
// runs asynchronously).
std::string apply_token_bitmask(const BitmaskArgs& args, void* stream);

}  // namespace kcore::cuda
