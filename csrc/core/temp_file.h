// Temporary files of the trie builder and the atomic output file.
//
// Scratch files (sorted runs, the record stream) are unnamed: created with O_TMPFILE, or created
// and unlinked at once where the file system lacks it. Whatever ends the process (an exception,
// Ctrl-C, SIGTERM, SIGKILL), the kernel frees them: a build never leaves temporary runs behind.
// The output is written the same way and linked under its final name only when complete.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace kcore {

[[noreturn]] void throw_io(const std::string& what, const std::string& path);

// An open file descriptor, closed on destruction.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd();
  Fd(Fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  Fd& operator=(Fd&& o) noexcept;
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_ = -1;
};

// A new unnamed scratch file in `dir` (read/write). `what` names it in error messages.
Fd open_scratch_file(const std::string& dir, const std::string& what);

// Buffered sequential writer over a file descriptor (the descriptor stays owned by the caller).
class FdWriter {
 public:
  FdWriter(int fd, std::string what, size_t buffer_bytes = 1 << 20);
  void write(const void* data, size_t n);
  void put(uint8_t b) {
    if (pos_ == buf_.size()) flush();
    buf_[pos_++] = b;
  }
  void put_varint(uint64_t v) {
    while (v >= 128) {
      put(static_cast<uint8_t>(v | 128));
      v >>= 7;
    }
    put(static_cast<uint8_t>(v));
  }
  void flush();
  uint64_t bytes_written() const { return written_ + pos_; }

 private:
  int fd_;
  std::string what_;
  std::vector<uint8_t> buf_;
  size_t pos_ = 0;
  uint64_t written_ = 0;
};

// Buffered sequential reader of the byte range [begin, end) of a file descriptor (pread: many
// readers may share one descriptor).
class FdReader {
 public:
  FdReader(int fd, uint64_t begin, uint64_t end, std::string what, size_t buffer_bytes = 1 << 18);
  bool at_end() { return pos_ == len_ && !refill(); }
  uint8_t get() {
    if (pos_ == len_ && !refill()) throw_truncated();
    return buf_[pos_++];
  }
  uint64_t get_varint() {
    uint64_t v = 0;
    for (unsigned shift = 0;; shift += 7) {
      const uint8_t b = get();
      v |= uint64_t{b & 127u} << shift;
      if (b < 128) return v;
      if (shift > 56) throw_truncated();
    }
  }

 private:
  bool refill();
  [[noreturn]] void throw_truncated() const;
  int fd_;
  uint64_t next_, end_;
  std::string what_;
  std::vector<uint8_t> buf_;
  size_t pos_ = 0, len_ = 0;
};

// The output file: written unnamed in the destination folder, then given its name atomically by
// commit() (an existing file of that name is replaced; a reader of the old file keeps it). Until
// commit, nothing is visible under `path`; without commit, nothing remains. Where the folder's
// file system has no O_TMPFILE, a named temporary beside `path` is used and removed on error
// (only a SIGKILL could then leave it behind).
class OutputFile {
 public:
  explicit OutputFile(const std::string& path);
  ~OutputFile();
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;
  int fd() const { return fd_.get(); }
  const std::string& path() const { return path_; }
  void commit();  // fsync, then link/rename into place

 private:
  std::string path_;
  std::string named_tmp_;  // non-empty in the fallback mode
  Fd fd_;
  bool committed_ = false;
};

// Unique suffix for temporary names within this process.
std::string unique_suffix();

}  // namespace kcore
