// SPDX-License-Identifier: Apache-2.0
/// \file io/detail/files.hpp
/// File helpers of the io/ readers and writers: a read-only memory mapping (`mapped_file`)
/// and an atomically replaced output file (`atomic_file`: temporary, fsync, rename,
/// directory fsync), the same protocol as data/npy.hpp's write_npy.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <filesystem>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "../../config.hpp"
#include "../../data/npy.hpp"
#include "../../error.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// A whole regular file mapped read-only (MAP_PRIVATE). Move-only; an empty file maps
/// to an empty span. The descriptor is closed once the mapping exists.
/// \throws hsae::io_error "<kind> '<path>': <problem>" when the file cannot be opened,
///         is not a regular file, or cannot be mapped.
class mapped_file {
 public:
  mapped_file() = default;
  mapped_file(const std::filesystem::path& path, std::string_view kind) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) throw_error<io_error>(kind, " '", path.string(), "': cannot open: ", npy_errno_text(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      throw_error<io_error>(kind, " '", path.string(), "': cannot stat: ", npy_errno_text(err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      throw_error<io_error>(kind, " '", path.string(), "': not a regular file");
    }
    size_ = std::size_t(st.st_size);
    if (size_ > 0) {
      void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      if (m == MAP_FAILED) throw_error<io_error>(kind, " '", path.string(), "': mmap failed: ", npy_errno_text(err));
      map_ = m;
    } else {
      ::close(fd);
    }
  }
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  mapped_file(mapped_file&& o) noexcept : map_(std::exchange(o.map_, nullptr)), size_(std::exchange(o.size_, 0)) {}
  mapped_file& operator=(mapped_file&& o) noexcept {
    if (this != &o) {
      release();
      map_ = std::exchange(o.map_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~mapped_file() { release(); }

  std::span<const std::byte> bytes() const noexcept {
    return {static_cast<const std::byte*>(map_), map_ != nullptr ? size_ : 0};
  }

 private:
  void release() noexcept {
    if (map_ != nullptr) ::munmap(map_, size_);
    map_ = nullptr;
    size_ = 0;
  }
  void* map_ = nullptr;
  std::size_t size_ = 0;
};

/// std::filesystem::create_directories without std::filesystem_error: a path through a
/// regular file, a symlink loop, a read-only file system raise hsae::io_error
/// "<kind> '<dir>': cannot create directory '<dir>': <OS reason>".
inline void create_directories(const std::filesystem::path& dir, std::string_view kind) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) throw_error<io_error>(kind, " '", dir.string(), "': cannot create directory '", dir.string(), "': ", ec.message());
}

/// The pid in the name of a temporary `<name><tag><pid>` (tag ".tmp." for the files
/// here), or 0 when `entry` is not such a name (the pid in decimal, no sign, no leading 0).
inline pid_t temporary_pid(std::string_view entry, std::string_view name, std::string_view tag = ".tmp.") {
  if (entry.size() <= name.size() + tag.size() || !entry.starts_with(name) || entry.substr(name.size(), tag.size()) != tag)
    return 0;
  const std::string_view digits = entry.substr(name.size() + tag.size());
  if (digits.size() > 10 || digits.front() == '0') return 0;
  long long v = 0;
  for (const char c : digits) {
    if (c < '0' || c > '9') return 0;
    v = v * 10 + (c - '0');
  }
  return v <= std::numeric_limits<pid_t>::max() ? pid_t(v) : 0;
}

/// True when no process has `pid`: kill(pid, 0) fails with ESRCH. (Another user's live
/// process fails with EPERM: alive.) The writers here name their temporaries by pid, so a
/// temporary whose pid is gone belongs to a writer that died (killed, crashed, power
/// lost) and no one will finish or remove it. This assumes that the writers to one path
/// share a pid namespace (one host, one container): a temporary on a shared file system
/// written from another host or container is judged by a pid that means nothing here.
inline bool process_is_gone(pid_t pid) noexcept { return pid > 0 && ::kill(pid, 0) == -1 && errno == ESRCH; }

/// Removes the temporary files `<path>.tmp.<pid>` of atomic_file writers that died (see
/// process_is_gone), never a live process's or this process's own. Best effort: errors
/// (an unreadable directory, a file already removed by another writer) are ignored.
inline void remove_stale_temporary_files(const std::filesystem::path& path) noexcept {
  const std::filesystem::path dir = path.has_parent_path() ? path.parent_path() : std::filesystem::path(".");
  const std::string name = path.filename().string();
  if (name.empty()) return;
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) return;
  DIR* d = ::fdopendir(dfd);
  if (d == nullptr) {
    ::close(dfd);
    return;
  }
  std::vector<std::string> stale;
  while (const dirent* e = ::readdir(d)) {
    const pid_t pid = temporary_pid(e->d_name, name);
    if (pid == 0 || pid == ::getpid() || !process_is_gone(pid)) continue;
    struct stat st {};
    if (::fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) == 0 && S_ISREG(st.st_mode)) stale.emplace_back(e->d_name);
  }
  for (const auto& s : stale) ::unlinkat(dfd, s.c_str(), 0);
  ::closedir(d);  // closes dfd
}

/// Writes `path` atomically: the bytes go to `<path>.tmp.<pid>`, and `commit()` fsyncs,
/// renames it over `path` and fsyncs the directory (best effort). Destroyed without a
/// commit (an exception on the way), the temporary file is removed and `path` is untouched.
/// A writer killed before its commit leaves its temporary: the next atomic_file for the
/// same path removes the temporaries of writers that are gone (remove_stale_temporary_files).
/// \throws hsae::io_error "<kind> '<path>': <problem>" on any failing system call.
class atomic_file {
 public:
  atomic_file(std::filesystem::path path, std::string_view kind)
      : path_(std::move(path)), tmp_(path_.string() + ".tmp." + std::to_string(::getpid())), kind_(kind) {
    remove_stale_temporary_files(path_);
    fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd_ < 0)
      throw_error<io_error>(kind_, " '", path_.string(), "': cannot create '", tmp_.string(),
                            "': ", npy_errno_text(errno));
  }
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  void write(const void* p, std::size_t n) {
    if (!npy_write_all(fd_, p, n)) fail("write to", errno);
  }
  void write(std::string_view s) { write(s.data(), s.size()); }

  void commit() {
    if (::fsync(fd_) != 0) fail("fsync of", errno);
    const int fd = std::exchange(fd_, -1);
    if (::close(fd) != 0) fail("close of", errno);
    if (::rename(tmp_.c_str(), path_.c_str()) != 0) fail("rename of", errno);
    committed_ = true;
    const std::filesystem::path dir = path_.has_parent_path() ? path_.parent_path() : std::filesystem::path(".");
    const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
      ::fsync(dfd);
      ::close(dfd);
    }
  }

 private:
  [[noreturn]] void fail(const char* what, int err) const {
    throw_error<io_error>(kind_, " '", path_.string(), "': ", what, " '", tmp_.string(),
                          "' failed: ", npy_errno_text(err));
  }
  std::filesystem::path path_;
  std::filesystem::path tmp_;
  std::string kind_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace detail

HSAE_NAMESPACE_END
