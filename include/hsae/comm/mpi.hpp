// SPDX-License-Identifier: Apache-2.0
/// \file comm/mpi.hpp
/// The MPI communicator (docs/DISTRIBUTED.md, "Communicator" and "Failure"): host buffers,
/// any MPI implementation (Debian's Open MPI in CI). Needs <mpi.h>: link hsae::mpi.
///
/// - `mpi_session`: MPI_Init_thread / MPI_Finalize as an object (asks for
///   MPI_THREAD_MULTIPLE, which the watchdog's MPI_Abort from its own thread needs); a
///   session left by an exception aborts the job instead of finalizing, so that no other
///   rank waits for this one.
/// - `mpi_communicator`: owns a duplicate of an MPI_Comm (freed on destruction), satisfies
///   the `communicator` concept; MPI errors are returned, not fatal, and thrown as
///   hsae::comm_error naming the collective, the rank and MPI's error string.
/// - The watchdog: each collective of a communicator with a deadline is armed on one
///   process-wide thread; when it has not returned by the deadline (a rank died, stalls,
///   or calls another collective) the thread prints what was waited for and calls
///   MPI_Abort, which ends every rank of the job: a failure, never a hang.
/// - `mpi_run`: runs a program body under a session and turns an escaping exception into
///   a message and MPI_Abort.
#pragma once

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <list>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../config.hpp"
#include "../error.hpp"
#include "communicator.hpp"

HSAE_NAMESPACE_BEGIN

/// The exit code with which the watchdog and `mpi_session` abort a job (MPI_Abort's
/// errorcode; mpirun returns it).
inline constexpr int mpi_abort_code = 70;

namespace detail {

template <class T>
MPI_Datatype mpi_datatype() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int32_t>) return MPI_INT32_T;
  else if constexpr (std::is_same_v<T, std::int64_t>) return MPI_INT64_T;
  else return MPI_UINT8_T;
}

inline std::string mpi_error_text(int rc) {
  char text[MPI_MAX_ERROR_STRING + 1] = {};
  int len = 0;
  if (MPI_Error_string(rc, text, &len) != MPI_SUCCESS) return concat("MPI error code ", rc);
  return std::string(text, std::size_t(std::max(len, 0)));
}

inline bool mpi_is_live() {
  int init = 0, fin = 0;
  MPI_Initialized(&init);
  MPI_Finalized(&fin);
  return init && !fin;
}

/// Aborts the job from this process: the message on stderr first (flushed), then MPI_Abort
/// on MPI_COMM_WORLD. Falls back to std::_Exit when MPI is not running.
[[noreturn]] inline void mpi_abort_job(const std::string& message) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  if (mpi_is_live()) MPI_Abort(MPI_COMM_WORLD, mpi_abort_code);
  std::_Exit(mpi_abort_code);
}

/// The process-wide watchdog thread (started by the first armed collective). Each armed
/// collective is an entry with a due time; the thread sleeps until the earliest one and
/// aborts the job when it is still armed then.
class mpi_watchdog {
 public:
  static mpi_watchdog& instance() {
    static mpi_watchdog w;
    return w;
  }

  /// Disarms its entry when the collective returns (or throws).
  class guard {
   public:
    guard() = default;
    guard(mpi_watchdog* w, std::list<std::pair<std::chrono::steady_clock::time_point, std::string>>::iterator it)
        : w_(w), it_(it) {}
    guard(const guard&) = delete;
    guard& operator=(const guard&) = delete;
    ~guard() {
      if (w_) w_->disarm(it_);
    }

   private:
    mpi_watchdog* w_ = nullptr;
    std::list<std::pair<std::chrono::steady_clock::time_point, std::string>>::iterator it_{};
  };

  /// Arms an entry due `deadline` from now; `what` is the message printed if it fires.
  /// A non-positive deadline arms nothing.
  [[nodiscard]] guard arm(std::chrono::milliseconds deadline, std::string what) {
    if (deadline.count() <= 0) return {};
    std::lock_guard lk(m_);
    if (!thread_.joinable()) thread_ = std::thread([this] { loop(); });
    entries_.emplace_back(std::chrono::steady_clock::now() + deadline, std::move(what));
    cv_.notify_all();
    return guard(this, std::prev(entries_.end()));
  }

  ~mpi_watchdog() {
    {
      std::lock_guard lk(m_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  using entry_list = std::list<std::pair<std::chrono::steady_clock::time_point, std::string>>;
  mpi_watchdog() = default;

  void disarm(entry_list::iterator it) {
    std::lock_guard lk(m_);
    entries_.erase(it);
    cv_.notify_all();
  }

  void loop() {
    std::unique_lock lk(m_);
    while (!stop_) {
      if (entries_.empty()) {
        cv_.wait(lk);
        continue;
      }
      const auto first = std::min_element(entries_.begin(), entries_.end(),
                                          [](const auto& a, const auto& b) { return a.first < b.first; });
      const auto due = first->first;  // a copy: the entry may go while this thread waits
      if (std::chrono::steady_clock::now() >= due) {
        const std::string message = first->second;
        lk.unlock();
        mpi_abort_job(message);
      }
      cv_.wait_until(lk, due);
    }
  }

  std::mutex m_;
  std::condition_variable cv_;
  entry_list entries_;
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace detail

/// MPI_Init_thread on construction and MPI_Finalize on destruction, for the process's
/// lifetime (one per process; MPI cannot be initialised twice). When MPI is already
/// initialised (by the program or another library) the session neither initialises nor
/// finalizes. A session destroyed while an exception is in flight (a rank that throws)
/// calls MPI_Abort instead of MPI_Finalize: the other ranks would otherwise wait in their
/// next collective.
class mpi_session {
 public:
  /// \throws hsae::comm_error when MPI_Init_thread fails.
  mpi_session(int& argc, char**& argv, int required = MPI_THREAD_MULTIPLE) : exceptions_(std::uncaught_exceptions()) {
    int init = 0;
    MPI_Initialized(&init);
    if (init) {
      MPI_Query_thread(&provided_);
      return;
    }
    const int rc = MPI_Init_thread(&argc, &argv, required, &provided_);
    detail::expects<comm_error>(rc == MPI_SUCCESS, "MPI_Init_thread failed: ", detail::mpi_error_text(rc));
    owner_ = true;
  }
  /// Without the command line (MPI_Init_thread with null arguments).
  explicit mpi_session(int required = MPI_THREAD_MULTIPLE) : exceptions_(std::uncaught_exceptions()) {
    int init = 0;
    MPI_Initialized(&init);
    if (init) {
      MPI_Query_thread(&provided_);
      return;
    }
    const int rc = MPI_Init_thread(nullptr, nullptr, required, &provided_);
    detail::expects<comm_error>(rc == MPI_SUCCESS, "MPI_Init_thread failed: ", detail::mpi_error_text(rc));
    owner_ = true;
  }
  mpi_session(const mpi_session&) = delete;
  mpi_session& operator=(const mpi_session&) = delete;
  ~mpi_session() {
    if (std::uncaught_exceptions() > exceptions_ && detail::mpi_is_live()) {
      int rank = -1, size = 0;
      MPI_Comm_rank(MPI_COMM_WORLD, &rank);
      MPI_Comm_size(MPI_COMM_WORLD, &size);
      detail::mpi_abort_job(detail::concat("hsae: rank ", rank, " of ", size,
                                           " leaves its MPI session with an exception in flight; aborting the job "
                                           "so that no rank waits for it"));
    }
    if (owner_ && detail::mpi_is_live()) MPI_Finalize();
  }

  /// The thread support MPI provides (MPI_THREAD_SINGLE ... MPI_THREAD_MULTIPLE).
  int thread_level() const noexcept { return provided_; }

 private:
  int exceptions_ = 0;
  int provided_ = MPI_THREAD_SINGLE;
  bool owner_ = false;
};

/// Settings of an `mpi_communicator`.
struct mpi_options {
  /// A collective that has not returned after this long aborts the job (the watchdog);
  /// zero or negative: wait forever. A deadline bounds the wait for the slowest rank, so
  /// it must exceed the longest compute between two collectives (a step, a data load).
  std::chrono::milliseconds deadline{std::chrono::minutes(5)};
};

/// A communicator over an MPI_Comm (host buffers). Owns a duplicate of the given
/// communicator (MPI_Comm_dup: its messages never mix with the program's), with errors
/// returned instead of fatal. Move-only; frees the duplicate on destruction (while MPI
/// is running). Collectives follow comm/communicator.hpp's table; counts above INT_MAX
/// elements are refused (MPI's counts are int).
class mpi_communicator {
 public:
  /// Duplicates `comm` (MPI_COMM_WORLD by default).
  /// \throws hsae::comm_error when MPI is not initialised or the duplication fails.
  explicit mpi_communicator(MPI_Comm comm = MPI_COMM_WORLD, mpi_options options = {}) : options_(options) {
    detail::expects<comm_error>(detail::mpi_is_live(),
                                "mpi_communicator: MPI is not initialised (create an hsae::mpi_session first)");
    check(MPI_Comm_dup(comm, &comm_), "MPI_Comm_dup");
    init();
  }
  mpi_communicator(mpi_communicator&& o) noexcept
      : comm_(std::exchange(o.comm_, MPI_COMM_NULL)), options_(o.options_), rank_(o.rank_), size_(o.size_),
        calls_(o.calls_) {}
  mpi_communicator& operator=(mpi_communicator&& o) noexcept {
    if (this != &o) {
      free();
      comm_ = std::exchange(o.comm_, MPI_COMM_NULL);
      options_ = o.options_;
      rank_ = o.rank_;
      size_ = o.size_;
      calls_ = o.calls_;
    }
    return *this;
  }
  mpi_communicator(const mpi_communicator&) = delete;
  mpi_communicator& operator=(const mpi_communicator&) = delete;
  ~mpi_communicator() { free(); }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  /// The owned MPI_Comm (for calls this class does not wrap).
  MPI_Comm native() const noexcept { return comm_; }
  const mpi_options& options() const noexcept { return options_; }
  /// The watchdog's deadline for the following collectives.
  void set_deadline(std::chrono::milliseconds deadline) noexcept { options_.deadline = deadline; }

  template <comm_scalar T>
  void all_gather(const T* send, std::size_t n, T* recv) {
    auto g = watch("all_gather", n);
    check(MPI_Allgather(send, count(n, "all_gather"), detail::mpi_datatype<T>(), recv, count(n, "all_gather"),
                        detail::mpi_datatype<T>(), comm_),
          "all_gather (MPI_Allgather)");
  }

  template <comm_scalar T>
  void all_reduce_sum(T* data, std::size_t n, reduction red = reduction::native) {
    auto g = watch("all_reduce_sum", n);
    const int c = count(n, "all_reduce_sum");
    if (red == reduction::native || size_ == 1) {
      check(MPI_Allreduce(MPI_IN_PLACE, data, c, detail::mpi_datatype<T>(), MPI_SUM, comm_),
            "all_reduce_sum (MPI_Allreduce)");
      return;
    }
    T* all = scratch<T>(n * std::size_t(size_));
    check(MPI_Allgather(data, c, detail::mpi_datatype<T>(), all, c, detail::mpi_datatype<T>(), comm_),
          "all_reduce_sum, ordered (MPI_Allgather)");
    fold(all, n, data);
  }

  template <comm_scalar T>
  void reduce_scatter_sum(const T* send, std::size_t n, T* recv, reduction red = reduction::native) {
    auto g = watch("reduce_scatter_sum", n);
    const int c = count(n, "reduce_scatter_sum");
    if (red == reduction::native || size_ == 1) {
      check(MPI_Reduce_scatter_block(send, recv, c, detail::mpi_datatype<T>(), MPI_SUM, comm_),
            "reduce_scatter_sum (MPI_Reduce_scatter_block)");
      return;
    }
    // Every rank's block for this rank, in rank order, then the sum in rank order.
    T* mine = scratch<T>(n * std::size_t(size_));
    check(MPI_Alltoall(send, c, detail::mpi_datatype<T>(), mine, c, detail::mpi_datatype<T>(), comm_),
          "reduce_scatter_sum, ordered (MPI_Alltoall)");
    fold(mine, n, recv);
  }

  /// \throws hsae::config_error unless 0 <= root < size().
  template <comm_scalar T>
  void broadcast(T* data, std::size_t n, int root) {
    detail::expects<config_error>(root >= 0 && root < size_, "broadcast: root ", root,
                                  " is not a rank of a group of size ", size_);
    auto g = watch("broadcast", n);
    check(MPI_Bcast(data, count(n, "broadcast"), detail::mpi_datatype<T>(), root, comm_), "broadcast (MPI_Bcast)");
  }

  /// The ranks with the same `color` (>= 0) as a new communicator, ranked by (key, rank);
  /// same options. Called by every rank.
  /// \throws hsae::config_error on a negative color.
  mpi_communicator split(int color, int key) {
    detail::expects<config_error>(color >= 0, "split: color ", color, " must be >= 0 (rank ", rank_, ")");
    auto g = watch("split", 0);
    MPI_Comm sub = MPI_COMM_NULL;
    check(MPI_Comm_split(comm_, color, key, &sub), "split (MPI_Comm_split)");
    return mpi_communicator(sub, options_, adopt_tag{});
  }

  void barrier() {
    auto g = watch("barrier", 0);
    check(MPI_Barrier(comm_), "barrier (MPI_Barrier)");
  }

 private:
  struct adopt_tag {};
  mpi_communicator(MPI_Comm owned, mpi_options options, adopt_tag) : comm_(owned), options_(options) { init(); }

  void init() {
    MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN);
    check(MPI_Comm_rank(comm_, &rank_), "MPI_Comm_rank");
    check(MPI_Comm_size(comm_, &size_), "MPI_Comm_size");
  }

  void free() noexcept {
    if (comm_ != MPI_COMM_NULL && detail::mpi_is_live()) MPI_Comm_free(&comm_);
    comm_ = MPI_COMM_NULL;
  }

  void check(int rc, const char* what) const {
    if (rc != MPI_SUCCESS) [[unlikely]]
      detail::throw_error<comm_error>(what, " failed on rank ", rank_, " of ", size_, ": ",
                                      detail::mpi_error_text(rc));
  }

  int count(std::size_t n, const char* what) const {
    detail::expects<comm_error>(n <= std::size_t(INT_MAX), what, ": ", n, " elements exceed MPI's int count (rank ",
                                rank_, ")");
    return int(n);
  }

  detail::mpi_watchdog::guard watch(const char* what, std::size_t n) {
    const std::uint64_t call = ++calls_;
    if (options_.deadline.count() <= 0) return {};
    int world = -1;
    MPI_Comm_rank(MPI_COMM_WORLD, &world);
    return detail::mpi_watchdog::instance().arm(
        options_.deadline,
        detail::concat("hsae: MPI watchdog: ", what, " of ", n, " elements (collective #", call,
                       " on this communicator) has not returned after ", options_.deadline.count(),
                       " ms on rank ", rank_, " of ", size_, " (world rank ", world,
                       "): another rank died, stalls or calls a different collective; aborting the job"));
  }

  template <class T>
  T* scratch(std::size_t n) {
    scratch_.resize(n * sizeof(T) / sizeof(std::max_align_t) + 1);
    return reinterpret_cast<T*>(scratch_.data());
  }

  /// out[i] = (((all[0 n + i] + all[1 n + i]) + all[2 n + i]) + ...), rank order.
  template <class T>
  void fold(const T* all, std::size_t n, T* out) const {
    for (std::size_t i = 0; i < n; ++i) {
      T acc = all[i];
      for (int r = 1; r < size_; ++r) acc = static_cast<T>(acc + all[std::size_t(r) * n + i]);
      out[i] = acc;
    }
  }

  MPI_Comm comm_ = MPI_COMM_NULL;
  mpi_options options_;
  int rank_ = 0, size_ = 1;
  std::uint64_t calls_ = 0;
  std::vector<std::max_align_t> scratch_;
};

static_assert(communicator<mpi_communicator>);

/// Runs `body(world)` under an `mpi_session`, with `world` an mpi_communicator over
/// MPI_COMM_WORLD, and returns its exit code. An exception escaping `body` prints
/// "hsae: rank r of n: <what>" and aborts the job (every rank ends, with
/// `mpi_abort_code`): use it as a distributed program's main.
template <class Body>
int mpi_run(int& argc, char**& argv, Body&& body, mpi_options options = {}) {
  mpi_session session(argc, argv);
  int rank = -1, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  try {
    mpi_communicator world(MPI_COMM_WORLD, options);
    return std::forward<Body>(body)(world);
  } catch (const std::exception& e) {
    detail::mpi_abort_job(detail::concat("hsae: rank ", rank, " of ", size, ": ", e.what(), "; aborting the job"));
  } catch (...) {
    detail::mpi_abort_job(detail::concat("hsae: rank ", rank, " of ", size,
                                         ": an exception that is not a std::exception; aborting the job"));
  }
}

HSAE_NAMESPACE_END
