// SPDX-License-Identifier: Apache-2.0
/// \file cuda/memory.cuh
/// Device memory: `device_buffer<T>` (RAII, stream-ordered), `device_matrix<T>` (an
/// owning row-major matrix), `device_matrix_view<T>` (pointer plus extents), and
/// host <-> device copies that convert between fp32 on the host and the storage type.
#pragma once

#include <cstddef>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

#include "../config.hpp"
#include "../error.hpp"
#include "../matrix.hpp"
#include "backend.cuh"
#include "detail/types.cuh"
#include "error.cuh"

HSAE_NAMESPACE_BEGIN

/// Uninitialised device array of `size()` elements, allocated from a backend's
/// stream-ordered pool and freed (`cudaFreeAsync`) on the stream it was allocated on.
/// Move-only. The stream must outlive the buffer.
template <class T>
class device_buffer {
 public:
  device_buffer() = default;
  device_buffer(const cuda_backend& be, std::size_t n) { resize(be, n); }
  device_buffer(const device_buffer&) = delete;
  device_buffer& operator=(const device_buffer&) = delete;
  device_buffer(device_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)),
        capacity_(std::exchange(o.capacity_, 0)),
        stream_(o.stream_) {}
  device_buffer& operator=(device_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
      capacity_ = std::exchange(o.capacity_, 0);
      stream_ = o.stream_;
    }
    return *this;
  }
  ~device_buffer() { release(); }

  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t size() const { return size_; }
  std::size_t capacity() const { return capacity_; }
  bool empty() const { return size_ == 0; }

  /// Sets the size to n. Reallocates (contents lost) only when n exceeds the capacity;
  /// otherwise keeps the memory and its contents.
  void resize(const cuda_backend& be, std::size_t n) {
    ::hsae::detail::expects<config_error>(n <= std::numeric_limits<std::size_t>::max() / sizeof(T),
                                          "device_buffer: ", n, " elements overflow the address space");
    if (n > capacity_) {
      release();
      data_ = static_cast<T*>(be.allocate(n * sizeof(T)));
      capacity_ = n;
      stream_ = be.stream();
    }
    size_ = n;
  }
  /// Sets every byte to zero (`cudaMemsetAsync` on be.stream()).
  void zero(const cuda_backend& be) {
    if (size_ > 0) HSAE_CUDA_TRY(cudaMemsetAsync(data_, 0, size_ * sizeof(T), be.stream()));
  }

 private:
  void release() noexcept {
    if (data_ != nullptr) (void)cudaFreeAsync(data_, stream_);
    data_ = nullptr;
    size_ = 0;
    capacity_ = 0;
  }

  T* data_ = nullptr;
  std::size_t size_ = 0;
  std::size_t capacity_ = 0;
  cudaStream_t stream_ = nullptr;
};

/// Non-owning view of a row-major, contiguous device matrix (leading dimension = cols).
template <class T>
struct device_matrix_view {
  T* data = nullptr;
  index_t rows = 0;
  index_t cols = 0;

  std::size_t size() const { return std::size_t(rows) * std::size_t(cols); }
  /// A view of rows [first, first + count).
  device_matrix_view middle_rows(index_t first, index_t count) const {
    return {data + std::size_t(first) * std::size_t(cols), count, cols};
  }
  /// Implicit conversion to a view of const elements.
  template <class U = T>
    requires(!std::is_const_v<U>)
  operator device_matrix_view<const U>() const {
    return {data, rows, cols};
  }
};

/// Owning row-major device matrix [rows, cols]; uninitialised after construction or
/// resize. Move-only.
template <class T>
class device_matrix {
 public:
  device_matrix() = default;
  device_matrix(const cuda_backend& be, index_t rows, index_t cols) { resize(be, rows, cols); }

  /// Sets the shape; reallocates (contents lost) only when the new size exceeds the
  /// capacity. \throws hsae::shape_error on a negative extent.
  void resize(const cuda_backend& be, index_t rows, index_t cols) {
    ::hsae::detail::expects<shape_error>(rows >= 0 && cols >= 0, "device_matrix: shape [", rows, ", ", cols,
                                         "] has a negative extent");
    buf_.resize(be, std::size_t(rows) * std::size_t(cols));
    rows_ = rows;
    cols_ = cols;
  }
  void zero(const cuda_backend& be) { buf_.zero(be); }

  T* data() { return buf_.data(); }
  const T* data() const { return buf_.data(); }
  index_t rows() const { return rows_; }
  index_t cols() const { return cols_; }
  std::size_t size() const { return std::size_t(rows_) * std::size_t(cols_); }
  bool empty() const { return size() == 0; }

  device_matrix_view<T> view() { return {buf_.data(), rows_, cols_}; }
  device_matrix_view<const T> view() const { return {buf_.data(), rows_, cols_}; }

 private:
  device_buffer<T> buf_;
  index_t rows_ = 0;
  index_t cols_ = 0;
};

namespace cuda::detail {

inline void check_extents(const char* what, Eigen::Index rows, Eigen::Index cols) {
  ::hsae::detail::expects<shape_error>(rows <= std::numeric_limits<index_t>::max() &&
                                           cols <= std::numeric_limits<index_t>::max(),
                                       what, ": shape [", rows, ", ", cols, "] exceeds the 32-bit index range");
}

}  // namespace cuda::detail

/// Copies `host` [rows, cols] (fp32, any outer stride) into `dev` (resized to that
/// shape), converting to T with round-to-nearest-even. Enqueued on be.stream(); the
/// host memory may be reused as soon as the call returns (pageable copies are staged).
template <class T>
  requires cuda_storage<T>
void copy_to_device(const cuda_backend& be, cref<float> host, device_matrix<T>& dev) {
  cuda::detail::check_extents("copy_to_device", host.rows(), host.cols());
  dev.resize(be, index_t(host.rows()), index_t(host.cols()));
  if (dev.empty()) return;
  const std::size_t cols = std::size_t(host.cols());
  if constexpr (std::is_same_v<T, float>) {
    HSAE_CUDA_TRY(cudaMemcpy2DAsync(dev.data(), cols * sizeof(float), host.data(),
                                    std::size_t(host.outerStride()) * sizeof(float), cols * sizeof(float),
                                    std::size_t(host.rows()), cudaMemcpyHostToDevice, be.stream()));
  } else {
    std::vector<T> staged(dev.size());
    for (Eigen::Index r = 0; r < host.rows(); ++r)
      for (Eigen::Index c = 0; c < host.cols(); ++c)
        staged[std::size_t(r) * cols + std::size_t(c)] = storage_traits<T>::from_float(host(r, c));
    HSAE_CUDA_TRY(
        cudaMemcpyAsync(dev.data(), staged.data(), staged.size() * sizeof(T), cudaMemcpyHostToDevice, be.stream()));
    // Pageable source: the call returns after the data is staged, so `staged` may go.
  }
}

/// Copies a host fp32 vector into a device buffer of T (resized to its length).
template <class T>
  requires cuda_storage<T>
void copy_to_device(const cuda_backend& be, cvref<float> host, device_buffer<T>& dev) {
  dev.resize(be, std::size_t(host.size()));
  if (dev.empty()) return;
  std::vector<T> staged(dev.size());
  for (Eigen::Index i = 0; i < host.size(); ++i) staged[std::size_t(i)] = storage_traits<T>::from_float(host(i));
  HSAE_CUDA_TRY(
      cudaMemcpyAsync(dev.data(), staged.data(), staged.size() * sizeof(T), cudaMemcpyHostToDevice, be.stream()));
}

/// Copies `dev` into `host` (resized), converting T to fp32. Synchronises be.stream().
template <class T>
  requires cuda_storage<T>
void copy_to_host(const cuda_backend& be, const device_matrix<T>& dev, row_matrix<float>& host) {
  host.resize(dev.rows(), dev.cols());
  if (dev.empty()) return;
  if constexpr (std::is_same_v<T, float>) {
    HSAE_CUDA_TRY(
        cudaMemcpyAsync(host.data(), dev.data(), dev.size() * sizeof(float), cudaMemcpyDeviceToHost, be.stream()));
    be.synchronize();
  } else {
    std::vector<T> staged(dev.size());
    HSAE_CUDA_TRY(
        cudaMemcpyAsync(staged.data(), dev.data(), dev.size() * sizeof(T), cudaMemcpyDeviceToHost, be.stream()));
    be.synchronize();
    for (std::size_t i = 0; i < staged.size(); ++i) host.data()[i] = storage_traits<T>::to_float(staged[i]);
  }
}

/// Copies an index matrix to the host. Synchronises be.stream().
inline void copy_to_host(const cuda_backend& be, const device_matrix<index_t>& dev, index_matrix& host) {
  host.resize(dev.rows(), dev.cols());
  if (dev.empty()) return;
  HSAE_CUDA_TRY(
      cudaMemcpyAsync(host.data(), dev.data(), dev.size() * sizeof(index_t), cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
}

/// Copies a device buffer of T into a host fp32 vector (resized). Synchronises.
template <class T>
  requires cuda_storage<T>
void copy_to_host(const cuda_backend& be, const device_buffer<T>& dev, vector<float>& host) {
  host.resize(Eigen::Index(dev.size()));
  if (dev.empty()) return;
  std::vector<T> staged(dev.size());
  HSAE_CUDA_TRY(
      cudaMemcpyAsync(staged.data(), dev.data(), dev.size() * sizeof(T), cudaMemcpyDeviceToHost, be.stream()));
  be.synchronize();
  for (std::size_t i = 0; i < staged.size(); ++i) host(Eigen::Index(i)) = storage_traits<T>::to_float(staged[i]);
}

HSAE_NAMESPACE_END
