// SPDX-License-Identifier: Apache-2.0
/// \file detail/files.hpp
/// File helpers of the io/ readers and writers: a read-only memory mapping (`mapped_file`),
/// an atomically replaced output file (`atomic_file`: temporary, fsync, rename, directory
/// fsync; the same protocol as data/npy.hpp's write_npy) and an atomically replaced
/// directory (`atomic_dir`: a staging directory swapped in). The temporaries are named
/// `<name>.tmp.<pid>`; a writer that died leaves them, and the next write to the same path
/// removes those whose pid is gone. A test seam (`fs_fault_hook`) fails any step.
#pragma once

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
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

#include "../config.hpp"
#include "../error.hpp"
#include "printable.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// The text of an errno value ("No such file or directory").
inline std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

/// Writes all of `n` bytes, retrying on EINTR and short writes; false (errno set) on failure.
inline bool write_all(int fd, const void* p, std::size_t n) {
  const auto* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    c += w;
    n -= std::size_t(w);
  }
  return true;
}

/// The file-system operations of the writers here that can fail for lack of space (or
/// for any other reason a test wants to simulate).
enum class fs_op { create, write, fsync, close, mkdir, link, rename, exchange };

/// Test seam: when set, the writers here call it before each operation; a non-zero
/// return is taken as that operation's errno (e.g. ENOSPC), without the operation being
/// done. Tests use it to fail a save at every step; nothing else should set it. The
/// function must not throw (it may end the process, to simulate a crash).
using fs_fault_fn = int (*)(fs_op op, const char* path) noexcept;
inline std::atomic<fs_fault_fn>& fs_fault_hook() noexcept {
  static std::atomic<fs_fault_fn> hook{nullptr};
  return hook;
}

/// An hsae::error's message without its "hsae: " prefix, to quote it inside another one.
inline std::string_view without_hsae_prefix(std::string_view what) {
  constexpr std::string_view prefix = "hsae: ";
  if (what.starts_with(prefix)) what.remove_prefix(prefix.size());
  return what;
}

/// The errno the test seam injects into `op` on `path`, 0 for none.
inline int fs_fault(fs_op op, const std::filesystem::path& path) noexcept {
  const fs_fault_fn f = fs_fault_hook().load(std::memory_order_relaxed);
  return f != nullptr ? f(op, path.c_str()) : 0;
}

/// Runs `call` (a system call: -1 and errno on failure) unless the test seam fails `op`
/// on `path` first (then -1 with its errno).
template <class Call>
int fs_call(fs_op op, const std::filesystem::path& path, Call&& call) {
  if (const int e = fs_fault(op, path)) {
    errno = e;
    return -1;
  }
  return call();
}

/// A whole regular file mapped read-only (MAP_PRIVATE). Move-only; an empty file maps
/// to an empty span. The descriptor is closed once the mapping exists.
/// \throws hsae::io_error "<kind> '<path>': <problem>" when the file cannot be opened,
///         is not a regular file, or cannot be mapped.
class mapped_file {
 public:
  mapped_file() = default;
  mapped_file(const std::filesystem::path& path, std::string_view kind) {
    // O_NONBLOCK: opening a FIFO must not wait for a writer (refused below as not regular).
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) fail(path, kind, "cannot open: ", errno_text(errno));
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      const int err = errno;
      ::close(fd);
      fail(path, kind, "cannot stat: ", errno_text(err));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail(path, kind, "not a regular file");
    }
    size_ = std::size_t(st.st_size);
    if (size_ > 0) {
      void* m = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      const int err = errno;
      ::close(fd);
      if (m == MAP_FAILED) fail(path, kind, "mmap failed: ", errno_text(err));
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
  /// "<kind> '<path>': <args>", control bytes of the path escaped.
  template <class... Args>
  [[noreturn]] static void fail(const std::filesystem::path& path, std::string_view kind, Args&&... args) {
    throw io_error(printable_utf8(concat("hsae: ", kind, " '", path.string(), "': ", std::forward<Args>(args)...)));
  }
  void* map_ = nullptr;
  std::size_t size_ = 0;
};

/// The pid in the name of a temporary `<name><tag><pid>` (tag ".tmp." for the files
/// here), or 0 when `entry` is not such a name (the pid in decimal, no sign, no leading 0).
inline pid_t temporary_pid(std::string_view entry, std::string_view name, std::string_view tag = ".tmp.") {
  if (entry.size() <= name.size() + tag.size() || !entry.starts_with(name) ||
      entry.substr(name.size(), tag.size()) != tag)
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

/// The names in directory `p` (without "." and ".."); `err` the errno when it cannot be
/// read (then the names read so far), else 0.
inline std::vector<std::string> directory_names(const std::filesystem::path& p, int& err) {
  std::vector<std::string> out;
  const int fd = ::open(p.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);  // never through a link
  if (fd < 0) {
    err = errno;
    return out;
  }
  DIR* d = ::fdopendir(fd);
  if (d == nullptr) {
    err = errno;
    ::close(fd);
    return out;
  }
  errno = 0;
  while (const dirent* e = ::readdir(d)) {
    const std::string_view n = e->d_name;
    if (n != "." && n != "..") out.emplace_back(n);
    errno = 0;
  }
  err = errno;
  ::closedir(d);
  return out;
}

/// fsync of a directory. \returns 0 or an errno.
inline int fsync_directory(const std::filesystem::path& p) {
  const int fd = ::open(p.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return errno;
  const int r = fs_call(fs_op::fsync, p, [&] { return ::fsync(fd); });
  const int err = r != 0 ? errno : 0;
  ::close(fd);
  return err;
}

/// Swaps two directory entries of one directory atomically (renameat2 RENAME_EXCHANGE).
/// \returns 0 or an errno: EINVAL, ENOSYS or ENOTSUP where the kernel or the file system
/// cannot (then the caller falls back to two renames).
inline int exchange_entries(const std::filesystem::path& a, const std::filesystem::path& b) {
  if (const int e = fs_fault(fs_op::exchange, b)) return e;
#if defined(__linux__) && defined(SYS_renameat2)
  constexpr unsigned rename_exchange = 2;  // RENAME_EXCHANGE of <linux/fs.h>
  if (::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), rename_exchange) == 0) return 0;
  return errno;
#else
  (void)a;
  return ENOSYS;
#endif
}

/// Renames `a` to `b` unless `b` exists (renameat2 RENAME_NOREPLACE where the file
/// system has it, else a check and a rename). \returns 0 or an errno (EEXIST if `b` exists).
inline int rename_noreplace(const std::filesystem::path& a, const std::filesystem::path& b) {
#if defined(__linux__) && defined(SYS_renameat2)
  constexpr unsigned noreplace = 1;  // RENAME_NOREPLACE of <linux/fs.h>
  if (::syscall(SYS_renameat2, AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), noreplace) == 0) return 0;
  if (errno != EINVAL && errno != ENOSYS) return errno;
#endif
  struct stat st {};
  if (::lstat(b.c_str(), &st) == 0) return EEXIST;
  return ::rename(a.c_str(), b.c_str()) == 0 ? 0 : errno;
}

/// Whether the entries `a` and `b` (not followed if symlinks) are one file (hard links).
inline bool same_file(const std::filesystem::path& a, const std::filesystem::path& b) {
  struct stat sa {}, sb {};
  return ::lstat(a.c_str(), &sa) == 0 && ::lstat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

/// Empties and removes a directory that a directory save left beside `target` (its staging
/// directory, or the replaced directory), removing only what is the save's: the entries
/// named in `managed` or their temporaries `<name>.tmp.<pid>` of a writer that is gone (or
/// of this process), and the hard links to the entries of `target` under the same name
/// (the files carried over). Anything else (a file someone wrote there, a subdirectory)
/// is moved into `target` with `move_back` (the replaced directory: a file created in it
/// during the save) where its name is free there, else stays, and so does the directory
/// then. Never throws.
inline void remove_save_directory(const std::filesystem::path& dir, const std::filesystem::path& target,
                                  std::span<const std::string_view> managed, bool move_back = false) noexcept {
  try {
    int err = 0;
    for (const auto& n : directory_names(dir, err)) {
      const std::filesystem::path p = dir / n, t = target / n;
      struct stat st {};
      if (::lstat(p.c_str(), &st) != 0) continue;
      bool ours = false;
      for (const auto m : managed) {
        const pid_t pid = temporary_pid(n, m);
        ours = ours || n == m || (pid != 0 && (pid == ::getpid() || process_is_gone(pid)));
      }
      if (!S_ISDIR(st.st_mode) && (ours || same_file(p, t))) {
        ::unlink(p.c_str());
      } else if (move_back) {
        rename_noreplace(p, t);
      }
    }
    ::rmdir(dir.c_str());
  } catch (...) {  // std::bad_alloc of a name: leave the rest
  }
}

/// Rolls an interrupted directory save of `target` forward or cleans up after it: a save
/// that fell back to two renames (no RENAME_EXCHANGE) and died between them left no
/// `target`, the old directory as `<target>.old.<pid>` and the complete new one as
/// `<target>.tmp.<pid>`: the new one is renamed into place. Then every `<target>.tmp.<pid>`
/// and `<target>.old.<pid>` directory of a process that is gone is emptied and removed by
/// remove_save_directory, except while `target` is missing and the pid has an `.old.`
/// directory (the two could not be renamed: they hold the only copies). Called as a save
/// to `target` starts, it takes this process's own such directories for leftovers of an
/// earlier save (one process does not save to one directory twice at once). Best effort:
/// never throws.
inline void recover_directory_save(const std::filesystem::path& target,
                                   std::span<const std::string_view> managed) noexcept {
  try {
    const std::filesystem::path parent = target.parent_path();
    const std::string name = target.filename().string();
    int err = 0;
    const auto names = directory_names(parent, err);
    const auto is_dir = [](const std::filesystem::path& p) {
      struct stat st {};
      return ::lstat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
    };
    const auto exists = [](const std::filesystem::path& p) {
      struct stat st {};
      return ::lstat(p.c_str(), &st) == 0;
    };
    const auto gone = [](pid_t pid) { return pid == ::getpid() || process_is_gone(pid); };
    for (const auto& n : names) {
      const pid_t pid = temporary_pid(n, name, ".old.");
      if (pid == 0 || !gone(pid) || exists(target)) continue;
      const std::filesystem::path staged = parent / (name + ".tmp." + std::to_string(pid));
      if (is_dir(parent / n) && is_dir(staged) && ::rename(staged.c_str(), target.c_str()) == 0) {
        const int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd >= 0) {
          ::fsync(dfd);
          ::close(dfd);
        }
      }
    }
    const bool have_target = exists(target);
    for (const auto& n : names) {
      pid_t pid = temporary_pid(n, name, ".tmp.");
      if (pid == 0) pid = temporary_pid(n, name, ".old.");
      if (pid == 0 || !gone(pid) || !is_dir(parent / n)) continue;
      if (!have_target && exists(parent / (name + ".old." + std::to_string(pid)))) continue;
      remove_save_directory(parent / n, target, managed);
    }
  } catch (...) {
  }
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
    // A fresh file, never through a link planted at the temporary's name: one left by an
    // earlier process with this pid is removed first.
    ::unlink(tmp_.c_str());
    fd_ = fs_call(fs_op::create, tmp_, [&] {
      return ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
    });
    if (fd_ < 0)
      throw_error<io_error>(kind_, " '", path_.string(), "': cannot create '", tmp_.string(),
                            "': ", errno_text(errno));
  }
  atomic_file(const atomic_file&) = delete;
  atomic_file& operator=(const atomic_file&) = delete;
  ~atomic_file() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(tmp_.c_str());
  }

  void write(const void* p, std::size_t n) {
    if (const int e = fs_fault(fs_op::write, tmp_)) fail("write to", e);
    if (!write_all(fd_, p, n)) fail("write to", errno);
  }
  void write(std::string_view s) { write(s.data(), s.size()); }

  void commit() {
    if (fs_call(fs_op::fsync, tmp_, [&] { return ::fsync(fd_); }) != 0) fail("fsync of", errno);
    const int fd = std::exchange(fd_, -1);
    if (const int e = fs_fault(fs_op::close, tmp_)) {
      ::close(fd);
      fail("close of", e);
    }
    if (::close(fd) != 0) fail("close of", errno);
    if (fs_call(fs_op::rename, path_, [&] { return ::rename(tmp_.c_str(), path_.c_str()); }) != 0)
      fail("rename of", errno);
    committed_ = true;
    fsync_directory(path_.has_parent_path() ? path_.parent_path() : std::filesystem::path("."));  // best effort
  }

 private:
  [[noreturn]] void fail(const char* what, int err) const {
    throw_error<io_error>(kind_, " '", path_.string(), "': ", what, " '", tmp_.string(),
                          "' failed: ", errno_text(err));
  }
  std::filesystem::path path_;
  std::filesystem::path tmp_;
  std::string kind_;
  int fd_ = -1;
  bool committed_ = false;
};

/// Writes `text` to `path` atomically (atomic_file). \throws hsae::io_error
/// "<kind> '<path>': <problem>".
inline void write_file_atomically(const std::filesystem::path& path, std::string_view text, std::string_view kind) {
  atomic_file f(path, kind);
  f.write(text);
  f.commit();
}


/// Replaces the directory `dir` as a whole, so that a reader (or a crash) sees either the
/// old directory or the new one, never new files beside old ones:
///
///  1. the new files are written into a sibling staging directory `<dir>.tmp.<pid>`
///     (`path()`), each file fsync'd (atomic_file);
///  2. `commit()` carries the other entries of an existing `dir` (files and symlinks that
///     are not among `managed`: a README, a sparsity file) into it as hard links, fsyncs
///     it, and swaps it with `dir` in one step (renameat2 RENAME_EXCHANGE); where the file
///     system cannot exchange, it renames `dir` aside to `<dir>.old.<pid>` and the staging
///     directory to `dir`; then it fsyncs the parent and removes the old directory;
///  3. destroyed without a commit, the staging directory is removed and `dir` is untouched.
///
/// Why a swap of the whole directory: the tools that read an SAE directory open fixed file
/// names, so no pointer file or generation number can make two files change together; a
/// directory rename is the one atomic step that does. The files carried over are the same
/// files (hard links), so nothing of the user's is copied, lost or changed; only the
/// entries hsae writes (`managed`) are replaced. A directory holding a subdirectory is
/// refused (it cannot be hard-linked, and moving it would put the user's data at risk).
/// The parent directory must be writable (the staging directory lives there), and `dir`
/// gets a new inode (with the old one's permission bits): a process whose working
/// directory was `dir` is left in the removed old one (this process is moved into the
/// new one).
///
/// Crashes: killed before the swap, `dir` is the old directory and a staging directory is
/// left; killed after it, `dir` is the new one and the old one is left under the staging
/// name; killed between the fallback's two renames, there is no `dir` but a complete
/// `<dir>.tmp.<pid>` and `<dir>.old.<pid>`. The next save to `dir` (recover_directory_save)
/// renames the complete new directory into place in the last case, and empties and
/// removes the directories of writers that are gone, deleting only `managed` files and the
/// hard links it made. Two saves to one directory at once from one process are not
/// supported (they share the staging name).
/// \throws hsae::io_error "<kind> '<dir>': <problem>: <OS reason>" on any failing step
///         before the swap (then `dir` is unchanged and no temporary is left).
class atomic_dir {
 public:
  /// `managed`: the entry names hsae writes in such directories (the files of every
  /// layout); those of an existing `dir` are replaced, never carried over.
  atomic_dir(const std::filesystem::path& dir, std::string_view kind, std::vector<std::string_view> managed)
      : kind_(kind), managed_(std::move(managed)) {
    std::error_code ec;
    std::filesystem::path abs = std::filesystem::absolute(dir, ec);
    if (!ec) abs = std::filesystem::weakly_canonical(abs, ec);  // a symlink to a directory: its target
    if (ec) fail("cannot resolve the path", ec.value(), dir);
    if (!abs.has_filename()) abs = abs.parent_path();
    shown_ = dir;
    dir_ = abs;
    if (!dir_.has_parent_path() || dir_.parent_path() == dir_) fail("cannot replace a root directory", 0, dir);
    const std::filesystem::path parent = dir_.parent_path();
    std::filesystem::create_directories(parent, ec);
    if (ec) fail("cannot create directory '" + parent.string() + "'", ec.value(), dir);
    struct stat st {};
    if (::lstat(dir_.c_str(), &st) == 0 && !S_ISDIR(st.st_mode)) fail("exists and is not a directory", ENOTDIR, dir);
    recover_directory_save(dir_, managed_);
    staging_ = parent / (dir_.filename().string() + ".tmp." + std::to_string(::getpid()));
    if (::lstat(staging_.c_str(), &st) == 0) {  // left by an earlier process with this pid
      if (!S_ISDIR(st.st_mode))
        fail("the staging name '" + staging_.string() + "' is taken by something that is not a directory", EEXIST,
             dir);
      remove_save_directory(staging_, dir_, managed_);
    }
    if (fs_call(fs_op::mkdir, staging_, [&] { return ::mkdir(staging_.c_str(), 0777); }) != 0)
      fail("cannot create the staging directory '" + staging_.string() + "'", errno, dir);
  }
  atomic_dir(const atomic_dir&) = delete;
  atomic_dir& operator=(const atomic_dir&) = delete;
  ~atomic_dir() {
    if (!committed_) remove_save_directory(staging_, dir_, managed_);
  }

  /// The staging directory: write the new files here.
  const std::filesystem::path& path() const noexcept { return staging_; }

  /// Calls `write(path())` to write the new files, naming the directory being saved in
  /// the hsae::io_error a failing write raises ("<kind> '<dir>': <the writer's message>").
  template <class Write>
  void stage(Write&& write) {
    try {
      std::forward<Write>(write)(staging_);
    } catch (const io_error& e) {
      throw io_error(concat("hsae: ", kind_, " '", shown_.string(), "': ", without_hsae_prefix(e.what())));
    }
  }

  void commit() {
    const std::filesystem::path parent = dir_.parent_path();
    struct stat st {};
    const bool replacing = ::lstat(dir_.c_str(), &st) == 0;
    if (replacing && !S_ISDIR(st.st_mode)) fail("exists and is not a directory", ENOTDIR, shown_);
    struct stat cwd {};
    const bool in_cwd = replacing && ::stat(".", &cwd) == 0 && cwd.st_dev == st.st_dev && cwd.st_ino == st.st_ino;
    if (replacing) carry_over(st);
    if (const int e = fsync_directory(staging_))
      fail("fsync of the staging directory '" + staging_.string() + "' failed", e, shown_);
    if (!replacing) {
      if (fs_call(fs_op::rename, dir_, [&] { return ::rename(staging_.c_str(), dir_.c_str()); }) != 0)
        fail("rename of '" + staging_.string() + "' failed", errno, shown_);
      committed_ = true;
      fsync_directory(parent);  // best effort, as atomic_file
      return;
    }
    const int x = exchange_entries(staging_, dir_);
    std::filesystem::path old = staging_;  // after an exchange the old directory is there
    if (x == EINVAL || x == ENOSYS || x == ENOTSUP) {
      old = parent / (dir_.filename().string() + ".old." + std::to_string(::getpid()));
      if (fs_call(fs_op::rename, old, [&] { return ::rename(dir_.c_str(), old.c_str()); }) != 0)
        fail("rename of '" + dir_.string() + "' aside to '" + old.string() + "' failed", errno, shown_);
      if (fs_call(fs_op::rename, dir_, [&] { return ::rename(staging_.c_str(), dir_.c_str()); }) != 0) {
        const int err = errno;
        if (fs_call(fs_op::rename, dir_, [&] { return ::rename(old.c_str(), dir_.c_str()); }) != 0) {
          committed_ = true;  // keep the complete staging directory: the next save rolls it forward
          fail("rename of '" + staging_.string() + "' failed and so did the rename back of '" + old.string() +
                   "' (the next save to it renames '" + staging_.string() + "' into place)",
               err, shown_);
        }
        fail("rename of '" + staging_.string() + "' failed", err, shown_);
      }
    } else if (x != 0) {
      fail("exchange of '" + staging_.string() + "' with it failed", x, shown_);
    }
    committed_ = true;
    fsync_directory(parent);  // best effort, as atomic_file
    if (in_cwd) (void)::chdir(dir_.c_str());
    remove_save_directory(old, dir_, managed_, /*move_back=*/true);
  }

 private:
  /// Hard-links the entries of the directory being replaced that this save does not write
  /// into the staging directory and gives it the old directory's permission bits.
  void carry_over(const struct stat& dir_st) {
    int err = 0;
    const auto names = directory_names(dir_, err);
    if (err != 0) fail("cannot list it", err, shown_);
    for (const auto& n : names) {
      // Ours: the files this save writes, and the other layout's weights (a SAELens save
      // over a sparsify directory must not leave both, which no loader accepts).
      if (std::find(managed_.begin(), managed_.end(), n) != managed_.end()) continue;
      bool stale = false;  // a temporary of ours whose writer is gone: not carried
      for (const auto m : managed_) {
        const pid_t pid = temporary_pid(n, m);
        stale = stale || (pid != 0 && process_is_gone(pid));
      }
      if (stale) continue;
      const std::filesystem::path from = dir_ / n, to = staging_ / n;
      struct stat st {};
      if (::lstat(from.c_str(), &st) != 0) {
        if (errno == ENOENT) continue;  // removed meanwhile
        fail("cannot stat '" + from.string() + "'", errno, shown_);
      }
      if (S_ISDIR(st.st_mode))
        fail("holds the subdirectory '" + n +
                 "', which a save that replaces the directory as a whole does not carry over; save into another "
                 "directory or move it out",
             0, shown_);
      if (fs_call(fs_op::link, to, [&] { return ::linkat(AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), 0); }) != 0)
        fail("cannot carry '" + from.string() + "' over into the new directory (hard link)", errno, shown_);
    }
    ::chmod(staging_.c_str(), dir_st.st_mode & 07777);
  }

  [[noreturn]] void fail(const std::string& what, int err, const std::filesystem::path& dir) const {
    if (err != 0) throw_error<io_error>(kind_, " '", dir.string(), "': ", what, ": ", errno_text(err));
    throw_error<io_error>(kind_, " '", dir.string(), "': ", what);
  }

  std::string kind_;
  std::vector<std::string_view> managed_;
  std::filesystem::path shown_, dir_, staging_;
  bool committed_ = false;
};

}  // namespace detail

HSAE_NAMESPACE_END
