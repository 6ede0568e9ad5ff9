// SPDX-License-Identifier: Apache-2.0
/// \file cuda/backend.cuh
/// The CUDA backend handle, passed first to every CUDA operation: a borrowed stream,
/// the device, an owned cuBLAS handle bound to that stream, and a stream-ordered
/// allocator (cudaMallocAsync on the device's default memory pool).
///
/// Nothing in hsae's CUDA path synchronises unless its documentation says so
/// (`synchronize`, `copy_to_host`), and nothing uses the legacy default stream.
#pragma once

#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>

#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../config.hpp"
#include "../error.hpp"
#include "error.cuh"

HSAE_NAMESPACE_BEGIN

/// True when the CUDA runtime reports at least one device. Never throws (no driver,
/// no device, or an insufficient driver all give false).
inline bool cuda_device_available() noexcept {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // reset the runtime's last-error state for later calls
    return false;
  }
  return n > 0;
}

/// CUDA execution resources. Move-only.
///
/// \param stream  the stream every operation is enqueued on (borrowed: the caller keeps
///                it alive and destroys it). Passing 0 means the legacy default stream,
///                which the caller then chooses explicitly.
/// \param device  the device; -1 means the current device (`cudaGetDevice`).
///
/// The constructor makes `device` current on the calling thread (`cudaSetDevice`) and
/// raises the device's default memory pool release threshold to the
/// maximum, so memory freed with `deallocate` stays cached in the pool and later
/// `allocate` calls of the same size are served without a driver allocation.
class cuda_backend {
 public:
  explicit cuda_backend(cudaStream_t stream, int device = -1) : stream_(stream), device_(device) {
    if (device_ < 0) HSAE_CUDA_TRY(cudaGetDevice(&device_));
    int count = 0;
    HSAE_CUDA_TRY(cudaGetDeviceCount(&count));
    ::hsae::detail::expects<config_error>(device_ < count, "cuda_backend: device ", device_, " does not exist (",
                                          count, " CUDA devices)");
    HSAE_CUDA_TRY(cudaSetDevice(device_));
    cudaMemPool_t pool{};
    HSAE_CUDA_TRY(cudaDeviceGetDefaultMemPool(&pool, device_));
    std::uint64_t threshold = std::numeric_limits<std::uint64_t>::max();
    HSAE_CUDA_TRY(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    HSAE_CUBLAS_TRY(cublasCreate(&cublas_));
    try {
      HSAE_CUBLAS_TRY(cublasSetStream(cublas_, stream_));
      HSAE_CUBLAS_TRY(cublasLtCreate(&cublaslt_));
    } catch (...) {
      cublasDestroy(cublas_);
      throw;
    }
  }

  cuda_backend(const cuda_backend&) = delete;
  cuda_backend& operator=(const cuda_backend&) = delete;
  cuda_backend(cuda_backend&& o) noexcept
      : deterministic(o.deterministic),
        stream_(o.stream_),
        device_(o.device_),
        cublas_(std::exchange(o.cublas_, nullptr)),
        cublaslt_(std::exchange(o.cublaslt_, nullptr)) {}
  cuda_backend& operator=(cuda_backend&& o) noexcept {
    if (this != &o) {
      release();
      deterministic = o.deterministic;
      stream_ = o.stream_;
      device_ = o.device_;
      cublas_ = std::exchange(o.cublas_, nullptr);
      cublaslt_ = std::exchange(o.cublaslt_, nullptr);
    }
    return *this;
  }
  ~cuda_backend() { release(); }

  cudaStream_t stream() const { return stream_; }
  int device() const { return device_; }
  /// cuBLAS handle owned by this backend, bound to `stream()`.
  cublasHandle_t cublas() const { return cublas_; }
  /// cuBLASLt handle owned by this backend (stream passed per call).
  cublasLtHandle_t cublaslt() const { return cublaslt_; }

  /// When true (default), sparse gradient kernels give bitwise-identical results run
  /// to run (no float atomics whose order varies).
  bool deterministic = true;

  /// Stream-ordered allocation (`cudaMallocAsync` on `stream()`); `bytes == 0` gives
  /// nullptr. \throws hsae::cuda_error when the pool cannot grow.
  void* allocate(std::size_t bytes) const {
    if (bytes == 0) return nullptr;
    void* p = nullptr;
    HSAE_CUDA_TRY(cudaMallocAsync(&p, bytes, stream_));
    return p;
  }
  /// Stream-ordered release (`cudaFreeAsync` on `stream()`); nullptr is ignored.
  void deallocate(void* p, std::size_t /*bytes*/) const {
    if (p != nullptr) HSAE_CUDA_TRY(cudaFreeAsync(p, stream_));
  }
  /// Blocks until all work enqueued on `stream()` has finished.
  void synchronize() const { HSAE_CUDA_TRY(cudaStreamSynchronize(stream_)); }

 private:
  void release() noexcept {
    if (cublaslt_ != nullptr) cublasLtDestroy(cublaslt_);
    if (cublas_ != nullptr) cublasDestroy(cublas_);
    cublaslt_ = nullptr;
    cublas_ = nullptr;
  }

  cudaStream_t stream_ = nullptr;
  int device_ = -1;
  cublasHandle_t cublas_ = nullptr;
  cublasLtHandle_t cublaslt_ = nullptr;
};

HSAE_NAMESPACE_END
