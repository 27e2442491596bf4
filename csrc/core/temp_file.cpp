#include "core/temp_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <system_error>

namespace kcore {

void throw_io(const std::string& what, const std::string& path) {
  throw std::system_error(errno, std::generic_category(), what + " '" + path + "'");
}

Fd::~Fd() {
  if (fd_ >= 0) ::close(fd_);
}

Fd& Fd::operator=(Fd&& o) noexcept {
  if (this != &o) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = o.fd_;
    o.fd_ = -1;
  }
  return *this;
}

std::string unique_suffix() {
  static std::atomic<uint64_t> counter{0};
  return std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
}

namespace {
std::string folder_or_dot(const std::string& dir) { return dir.empty() ? std::string(".") : dir; }

// O_TMPFILE where the file system has it (ext4, xfs, btrfs, tmpfs); -1 with errno otherwise.
int open_tmpfile(const std::string& dir, mode_t mode) {
#ifdef O_TMPFILE
  return ::open(dir.c_str(), O_TMPFILE | O_RDWR | O_CLOEXEC, mode);
#else
  (void)dir;
  (void)mode;
  errno = EOPNOTSUPP;
  return -1;
#endif
}

bool tmpfile_unsupported(int err) { return err == EOPNOTSUPP || err == EISDIR || err == EINVAL || err == ENOENT; }
}  // namespace

Fd open_scratch_file(const std::string& dir_in, const std::string& what) {
  const std::string dir = folder_or_dot(dir_in);
  int fd = open_tmpfile(dir, 0600);
  if (fd >= 0) return Fd(fd);
  if (!tmpfile_unsupported(errno)) throw_io("cannot create a " + what + " in tmp_dir", dir);
  std::string name = dir + "/ktrie-" + what + "." + unique_suffix() + ".XXXXXX";
  std::vector<char> buf(name.begin(), name.end());
  buf.push_back('\0');
  fd = ::mkstemp(buf.data());
  if (fd < 0) throw_io("cannot create a " + what + " in tmp_dir", dir);
  ::unlink(buf.data());  // unnamed from now on: freed when closed, however the process ends
  ::fcntl(fd, F_SETFD, FD_CLOEXEC);
  return Fd(fd);
}

FdWriter::FdWriter(int fd, std::string what, size_t buffer_bytes)
    : fd_(fd), what_(std::move(what)), buf_(buffer_bytes) {}

void FdWriter::write(const void* data, size_t n) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    if (pos_ == buf_.size()) flush();
    const size_t take = std::min(n, buf_.size() - pos_);
    std::memcpy(buf_.data() + pos_, p, take);
    pos_ += take;
    p += take;
    n -= take;
  }
}

void FdWriter::flush() {
  size_t done = 0;
  while (done < pos_) {
    const ssize_t w = ::write(fd_, buf_.data() + done, pos_ - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      throw_io("cannot write the", what_);
    }
    done += static_cast<size_t>(w);
  }
  written_ += pos_;
  pos_ = 0;
}

FdReader::FdReader(int fd, uint64_t begin, uint64_t end, std::string what, size_t buffer_bytes)
    : fd_(fd), next_(begin), end_(end), what_(std::move(what)), buf_(buffer_bytes) {}

bool FdReader::refill() {
  if (next_ >= end_) return false;
  const size_t want = static_cast<size_t>(std::min<uint64_t>(buf_.size(), end_ - next_));
  ssize_t r;
  do {
    r = ::pread(fd_, buf_.data(), want, static_cast<off_t>(next_));
  } while (r < 0 && errno == EINTR);
  if (r < 0) throw_io("cannot read the", what_);
  if (r == 0) throw_truncated();
  next_ += static_cast<uint64_t>(r);
  pos_ = 0;
  len_ = static_cast<size_t>(r);
  return true;
}

void FdReader::throw_truncated() const { throw std::runtime_error("truncated " + what_); }

OutputFile::OutputFile(const std::string& path) : path_(path) {
  const size_t slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int fd = open_tmpfile(dir, 0666);  // the umask applies, as for any new file
  if (fd >= 0) {
    // linkat through /proc is how an O_TMPFILE file gets a name without privileges.
    if (::access(("/proc/self/fd/" + std::to_string(fd)).c_str(), F_OK) == 0) {
      fd_ = Fd(fd);
      return;
    }
    ::close(fd);
  } else if (!tmpfile_unsupported(errno)) {
    throw_io("cannot create a file in the folder of", path);
  }
  named_tmp_ = path + ".tmp." + unique_suffix();
  fd = ::open(named_tmp_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) throw_io("cannot create", named_tmp_);
  fd_ = Fd(fd);
}

OutputFile::~OutputFile() {
  if (!committed_ && !named_tmp_.empty()) std::remove(named_tmp_.c_str());
}

void OutputFile::commit() {
  if (::fsync(fd_.get()) != 0) throw_io("cannot write", path_);
  if (named_tmp_.empty()) {
    // linkat cannot replace an existing file: link under a unique name, then rename over path.
    const std::string tmp = path_ + ".tmp." + unique_suffix();
    const std::string proc = "/proc/self/fd/" + std::to_string(fd_.get());
    if (::linkat(AT_FDCWD, proc.c_str(), AT_FDCWD, tmp.c_str(), AT_SYMLINK_FOLLOW) != 0)
      throw_io("cannot give the new file a name", tmp);
    if (std::rename(tmp.c_str(), path_.c_str()) != 0) {
      const int err = errno;
      std::remove(tmp.c_str());
      errno = err;
      throw_io("cannot rename the temporary file to", path_);
    }
  } else if (std::rename(named_tmp_.c_str(), path_.c_str()) != 0) {
    throw_io("cannot rename the temporary file to", path_);
  }
  committed_ = true;
}

}  // namespace kcore
