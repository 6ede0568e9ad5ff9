// SPDX-License-Identifier: Apache-2.0
/// \file comm/nccl.cuh
/// The NCCL communicator (docs/DISTRIBUTED.md, "Communicator" and "Failure"): device
/// buffers, one GPU per rank. Needs nvcc and NCCL: link hsae::nccl.
///
/// `nccl_communicator::create(bootstrap, stream)` makes the communicator of a host
/// communicator's ranks (an `mpi_communicator`, or `single_process_communicator` for one
/// GPU): rank 0 draws the ncclUniqueId and broadcasts it through `bootstrap`; each rank
/// uses the CUDA device that is current when it calls. Collectives take device pointers
/// and are **stream-ordered**: they return once enqueued on `stream()`, and their results
/// are ready for the work enqueued after them there. `synchronize()` waits for the stream
/// while watching it: an asynchronous NCCL error, or the deadline passing (a rank died or
/// stalls), aborts the communicator (ncclCommAbort) and throws hsae::comm_error; `barrier()`
/// synchronises. `reduction::ordered` gathers every contribution and adds them in rank
/// order on the device, bitwise the same as the host's fold (additions only: nothing to
/// contract), so the NCCL and the MPI communicators agree bit for bit.
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>

#include "../config.hpp"
#include "../cuda/detail/kernel.cuh"
#include "../cuda/error.cuh"
#include "../error.hpp"
#include "communicator.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

template <class T>
ncclDataType_t nccl_datatype() {
  if constexpr (std::is_same_v<T, float>) return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>) return ncclFloat64;
  else if constexpr (std::is_same_v<T, std::int32_t>) return ncclInt32;
  else if constexpr (std::is_same_v<T, std::int64_t>) return ncclInt64;
  else return ncclUint8;
}

}  // namespace detail

namespace cuda::detail {
HSAE_KERNEL_NAMESPACE_BEGIN

/// out[i] = (((all[0 n + i] + all[1 n + i]) + all[2 n + i]) + ...): the rank-order fold of
/// `ranks` gathered blocks of n.
template <class T>
HSAE_KERNEL void __launch_bounds__(256) fold_ranks_kernel(const T* __restrict__ all, std::size_t n, int ranks,
                                                          T* __restrict__ out) {
  for (std::size_t i = std::size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += std::size_t(gridDim.x) * blockDim.x) {
    T acc = all[i];
    for (int r = 1; r < ranks; ++r) acc = static_cast<T>(acc + all[std::size_t(r) * n + i]);
    out[i] = acc;
  }
}

/// Enqueues fold_ranks_kernel on `stream` (nothing when n == 0).
template <class T>
void fold_ranks(const T* all, std::size_t n, int ranks, T* out, cudaStream_t stream) {
  if (n == 0) return;
  const std::size_t blocks = std::min<std::size_t>((n + 255) / 256, 4096);
  fold_ranks_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(all, n, ranks, out);
  HSAE_CUDA_CHECK_LAUNCH();
}

HSAE_KERNEL_NAMESPACE_END
}  // namespace cuda::detail

/// Settings of an `nccl_communicator`.
struct nccl_options {
  /// `synchronize()` aborts the communicator and throws when the stream has not drained
  /// after this long; zero or negative: wait forever (asynchronous errors still end it).
  std::chrono::milliseconds deadline{std::chrono::minutes(5)};
};

/// A communicator over an ncclComm_t and a CUDA stream (not owned). Move-only; destroys
/// the NCCL communicator and its scratch buffer on destruction. Satisfies `communicator`,
/// with device pointers and stream-ordered collectives (this file's comment).
class nccl_communicator {
 public:
  /// The communicator of `bootstrap`'s ranks on the current device, collectives on
  /// `stream`. Collective over `bootstrap` (every rank calls it).
  /// \throws hsae::comm_error when NCCL fails.
  template <communicator Bootstrap>
  static nccl_communicator create(Bootstrap& bootstrap, cudaStream_t stream, nccl_options options = {}) {
    ncclUniqueId id{};
    if (bootstrap.rank() == 0) check_static(ncclGetUniqueId(&id), "ncclGetUniqueId", nullptr, 0, bootstrap.size());
    bootstrap.broadcast(reinterpret_cast<std::uint8_t*>(&id), sizeof id, 0);
    ncclComm_t comm = nullptr;
    check_static(ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank()), "ncclCommInitRank", nullptr,
                 bootstrap.rank(), bootstrap.size());
    return nccl_communicator(comm, stream, options);
  }

  nccl_communicator(nccl_communicator&& o) noexcept
      : comm_(std::exchange(o.comm_, nullptr)), stream_(o.stream_), options_(o.options_), rank_(o.rank_),
        size_(o.size_), scratch_(std::exchange(o.scratch_, nullptr)), scratch_bytes_(std::exchange(o.scratch_bytes_, 0)) {}
  nccl_communicator& operator=(nccl_communicator&& o) noexcept {
    if (this != &o) {
      release();
      comm_ = std::exchange(o.comm_, nullptr);
      stream_ = o.stream_;
      options_ = o.options_;
      rank_ = o.rank_;
      size_ = o.size_;
      scratch_ = std::exchange(o.scratch_, nullptr);
      scratch_bytes_ = std::exchange(o.scratch_bytes_, 0);
    }
    return *this;
  }
  nccl_communicator(const nccl_communicator&) = delete;
  nccl_communicator& operator=(const nccl_communicator&) = delete;
  ~nccl_communicator() { release(); }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  cudaStream_t stream() const noexcept { return stream_; }
  /// The NCCL communicator (null after an abort).
  ncclComm_t native() const noexcept { return comm_; }

  template <comm_scalar T>
  void all_gather(const T* send, std::size_t n, T* recv) {
    check(ncclAllGather(send, recv, n, detail::nccl_datatype<T>(), live("all_gather"), stream_), "all_gather (ncclAllGather)");
  }

  template <comm_scalar T>
  void all_reduce_sum(T* data, std::size_t n, reduction red = reduction::native) {
    if (red == reduction::native || size_ == 1) {
      check(ncclAllReduce(data, data, n, detail::nccl_datatype<T>(), ncclSum, live("all_reduce_sum"), stream_),
            "all_reduce_sum (ncclAllReduce)");
      return;
    }
    T* all = scratch<T>(n * std::size_t(size_));
    check(ncclAllGather(data, all, n, detail::nccl_datatype<T>(), live("all_reduce_sum"), stream_),
          "all_reduce_sum, ordered (ncclAllGather)");
    cuda::detail::fold_ranks(all, n, size_, data, stream_);
  }

  template <comm_scalar T>
  void reduce_scatter_sum(const T* send, std::size_t n, T* recv, reduction red = reduction::native) {
    if (red == reduction::native || size_ == 1) {
      check(ncclReduceScatter(send, recv, n, detail::nccl_datatype<T>(), ncclSum, live("reduce_scatter_sum"), stream_),
            "reduce_scatter_sum (ncclReduceScatter)");
      return;
    }
    // Every rank's block for this rank (an all-to-all of point-to-point pairs), then the fold.
    T* mine = scratch<T>(n * std::size_t(size_));
    ncclComm_t c = live("reduce_scatter_sum");
    check(ncclGroupStart(), "reduce_scatter_sum, ordered (ncclGroupStart)");
    for (int r = 0; r < size_; ++r) {
      check(ncclSend(send + std::size_t(r) * n, n, detail::nccl_datatype<T>(), r, c, stream_),
            "reduce_scatter_sum, ordered (ncclSend)");
      check(ncclRecv(mine + std::size_t(r) * n, n, detail::nccl_datatype<T>(), r, c, stream_),
            "reduce_scatter_sum, ordered (ncclRecv)");
    }
    check(ncclGroupEnd(), "reduce_scatter_sum, ordered (ncclGroupEnd)");
    cuda::detail::fold_ranks(mine, n, size_, recv, stream_);
  }

  /// \throws hsae::config_error unless 0 <= root < size().
  template <comm_scalar T>
  void broadcast(T* data, std::size_t n, int root) {
    ::hsae::detail::expects<config_error>(root >= 0 && root < size_, "broadcast: root ", root,
                                          " is not a rank of a group of size ", size_);
    check(ncclBroadcast(data, data, n, detail::nccl_datatype<T>(), root, live("broadcast"), stream_),
          "broadcast (ncclBroadcast)");
  }

  /// The ranks with the same `color` (>= 0) as a new communicator (ncclCommSplit), ranked
  /// by (key, rank); same stream and options. Called by every rank.
  /// \throws hsae::config_error on a negative color.
  nccl_communicator split(int color, int key) {
    ::hsae::detail::expects<config_error>(color >= 0, "split: color ", color, " must be >= 0 (rank ", rank_, ")");
    ncclComm_t sub = nullptr;
    check(ncclCommSplit(live("split"), color, key, &sub, nullptr), "split (ncclCommSplit)");
    return nccl_communicator(sub, stream_, options_);
  }

  /// Waits until every rank has reached it (an all-reduce of one value, then synchronize).
  void barrier() {
    std::int32_t* one = scratch<std::int32_t>(1);
    check(ncclAllReduce(one, one, 1, ncclInt32, ncclSum, live("barrier"), stream_), "barrier (ncclAllReduce)");
    synchronize();
  }

  /// Waits for the stream; on an asynchronous NCCL error, or when the deadline passes,
  /// aborts the communicator (it is unusable afterwards) and throws.
  /// \throws hsae::comm_error (NCCL error or deadline), hsae::cuda_error (a CUDA error).
  void synchronize() {
    ncclComm_t c = live("synchronize");
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream_);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) HSAE_CUDA_TRY(q);
      ncclResult_t async = ncclSuccess;
      check(ncclCommGetAsyncError(c, &async), "synchronize (ncclCommGetAsyncError)");
      if (async != ncclSuccess && async != ncclInProgress) {
        abort();
        ::hsae::detail::throw_error<comm_error>("NCCL failed asynchronously on rank ", rank_, " of ", size_, ": ",
                                                ncclGetErrorString(async), "; the communicator is aborted");
      }
      if (options_.deadline.count() > 0 && std::chrono::steady_clock::now() - start > options_.deadline) {
        abort();
        ::hsae::detail::throw_error<comm_error>(
            "NCCL collectives on rank ", rank_, " of ", size_, " have not completed after ", options_.deadline.count(),
            " ms: another rank died, stalls or calls a different collective; the communicator is aborted");
      }
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  nccl_communicator(ncclComm_t comm, cudaStream_t stream, nccl_options options)
      : comm_(comm), stream_(stream), options_(options) {
    check(ncclCommUserRank(comm_, &rank_), "ncclCommUserRank");
    check(ncclCommCount(comm_, &size_), "ncclCommCount");
  }

  static void check_static(ncclResult_t r, const char* what, ncclComm_t comm, int rank, int size) {
    if (r != ncclSuccess && r != ncclInProgress) [[unlikely]] {
      const char* last = ncclGetLastError(comm);
      ::hsae::detail::throw_error<comm_error>(what, " failed on rank ", rank, " of ", size, ": ",
                                              ncclGetErrorString(r), (last && *last) ? " (" : "",
                                              (last && *last) ? last : "", (last && *last) ? ")" : "");
    }
  }
  void check(ncclResult_t r, const char* what) const { check_static(r, what, comm_, rank_, size_); }

  ncclComm_t live(const char* what) const {
    ::hsae::detail::expects<comm_error>(comm_ != nullptr, what, ": the NCCL communicator of rank ", rank_,
                                        " was aborted (or moved from)");
    return comm_;
  }

  void abort() noexcept {
    if (comm_) (void)ncclCommAbort(comm_);
    comm_ = nullptr;
  }

  /// Device scratch of at least n T (grown by reallocation: cudaFree synchronises).
  template <class T>
  T* scratch(std::size_t n) {
    const std::size_t bytes = std::max<std::size_t>(n * sizeof(T), 256);
    if (bytes > scratch_bytes_) {
      if (scratch_) HSAE_CUDA_TRY(cudaFree(scratch_));
      scratch_ = nullptr;
      scratch_bytes_ = 0;
      HSAE_CUDA_TRY(cudaMalloc(&scratch_, bytes));
      scratch_bytes_ = bytes;
    }
    return static_cast<T*>(scratch_);
  }

  void release() noexcept {
    if (comm_) (void)ncclCommDestroy(comm_);
    comm_ = nullptr;
    if (scratch_) (void)cudaFree(scratch_);
    scratch_ = nullptr;
    scratch_bytes_ = 0;
  }

  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  nccl_options options_;
  int rank_ = 0, size_ = 1;
  void* scratch_ = nullptr;
  std::size_t scratch_bytes_ = 0;
};

static_assert(communicator<nccl_communicator>);

HSAE_NAMESPACE_END
