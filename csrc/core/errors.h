// Exception types of the C++ core. The binding layer translates them into the Python classes of
// kcore.errors, so a caller sees kcore.InvalidInputError / kcore.FileFormatError, never a crash.
#pragma once
#include <stdexcept>
#include <string>

namespace kcore {

// Bad argument from the caller: out-of-range token id, wrong size, empty fact, ...
struct InvalidInput : std::invalid_argument {
  explicit InvalidInput(const std::string& what) : std::invalid_argument(what) {}
};

// A file that is truncated, corrupted, of another format version or not a kcore file at all.
struct FileFormat : std::runtime_error {
  explicit FileFormat(const std::string& what) : std::runtime_error(what) {}
};

// Thrown by a progress callback to stop a long operation (the caller keeps the reason).
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("cancelled") {}
};

}  // namespace kcore
