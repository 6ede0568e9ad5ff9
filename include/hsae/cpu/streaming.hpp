// SPDX-License-Identifier: Apache-2.0
/// \file cpu/streaming.hpp
/// Writing a large buffer that is read once, later, by another pass: non-temporal stores
/// and a huge-page-backed buffer. The decoder backward stages one D-vector per selected
/// (row, rank) pair (cpu/loss.hpp), hundreds of MB per step at the paper's shapes: with
/// ordinary stores every staged line is first read from memory (write-allocate) and then
/// evicted dirty, and the scattered 4 KiB pages miss the TLB. Measured at B=4096 D=768
/// F=16384 K=64 on a 2-core AVX2 EPYC: the row pass took 196 ms with ordinary stores into
/// a 64 MiB chunk and 71-74 ms with streaming ones (49-62 ms with no staging at all);
/// docs/CPU_STEP.md.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <type_traits>
#include <utility>

#include "../config.hpp"

#if !defined(__CUDACC__) && (defined(__SSE2__) || defined(__AVX__))
#include <immintrin.h>
#define HSAE_STREAM_STORES 1
#endif
#if defined(__linux__)
#include <sys/mman.h>
#endif

HSAE_NAMESPACE_BEGIN

namespace cpu::detail {

/// `dst[i] = a * src[i]` for `i < n`, with non-temporal stores (the lines are not read
/// first and do not displace the cache) where the compiler targets SSE2/AVX, ordinary
/// stores elsewhere; the values are the same either way (one rounding per product).
/// The aligned middle streams; the unaligned head and tail use ordinary stores. Follow
/// the last call of a thread by `stream_fence()` before another thread reads `dst`.
template <class T>
inline void stream_scaled(T* dst, T a, const T* src, std::ptrdiff_t n) {
  std::ptrdiff_t i = 0;
#if defined(HSAE_STREAM_STORES)
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
#if defined(__AVX__)
    constexpr std::size_t align = 32;
#else
    constexpr std::size_t align = 16;
#endif
    constexpr std::ptrdiff_t lanes = std::ptrdiff_t(align / sizeof(T));
    for (; i < n && (reinterpret_cast<std::uintptr_t>(dst + i) % align) != 0; ++i) dst[i] = a * src[i];
    for (; i + lanes <= n; i += lanes) {
      if constexpr (std::is_same_v<T, float>) {
#if defined(__AVX__)
        _mm256_stream_ps(dst + i, _mm256_mul_ps(_mm256_set1_ps(a), _mm256_loadu_ps(src + i)));
#else
        _mm_stream_ps(dst + i, _mm_mul_ps(_mm_set1_ps(a), _mm_loadu_ps(src + i)));
#endif
      } else {
#if defined(__AVX__)
        _mm256_stream_pd(dst + i, _mm256_mul_pd(_mm256_set1_pd(a), _mm256_loadu_pd(src + i)));
#else
        _mm_stream_pd(dst + i, _mm_mul_pd(_mm_set1_pd(a), _mm_loadu_pd(src + i)));
#endif
      }
    }
  }
#endif
  for (; i < n; ++i) dst[i] = a * src[i];
}

/// Orders this thread's streaming stores before whatever it writes next (the end of a
/// parallel region then publishes them); nothing where `stream_scaled` stores plainly.
inline void stream_fence() {
#if defined(HSAE_STREAM_STORES)
  _mm_sfence();
#endif
}

/// Asks for the cache lines of `[p, p + bytes)` ahead of a read (a hint: no effect on
/// results). The sparse passes gather one D-vector per selected pair from a matrix larger
/// than the cache. Asking for the row two ranks ahead measured, at B=4096 D=768 F=16384
/// K=64 on the 2-core EPYC: the forward gathers alone 34-41 ms against 53-56 ms; the
/// whole loss with its decoder backward a median 107-119 against 112-125 ms (5 runs each).
inline void prefetch_read(const void* p, std::size_t bytes) {
#if (defined(__GNUC__) || defined(__clang__)) && !defined(__CUDACC__)
  const char* const c = static_cast<const char*>(p);
  for (std::size_t off = 0; off < bytes; off += 64) __builtin_prefetch(c + off, 0, 3);
#else
  (void)p;
  (void)bytes;
#endif
}

/// An uninitialised array of `T` for staging, aligned to 2 MiB and advised to the kernel
/// as huge-page memory (Linux `madvise(MADV_HUGEPAGE)`; transparent huge pages set to
/// "madvise" or "always" then back it with 2 MiB pages: a scattered write or read of a
/// staged vector then costs no TLB miss). Grows only (no allocation once the size
/// settles); the contents do not survive a growth. Move-only.
template <class T>
class staging_buffer {
 public:
  staging_buffer() = default;
  staging_buffer(const staging_buffer&) = delete;
  staging_buffer& operator=(const staging_buffer&) = delete;
  staging_buffer(staging_buffer&& o) noexcept
      : data_(std::exchange(o.data_, nullptr)), capacity_(std::exchange(o.capacity_, 0)) {}
  staging_buffer& operator=(staging_buffer&& o) noexcept {
    if (this != &o) {
      release();
      data_ = std::exchange(o.data_, nullptr);
      capacity_ = std::exchange(o.capacity_, 0);
    }
    return *this;
  }
  ~staging_buffer() { release(); }

  /// Room for at least `n` elements. \throws std::bad_alloc.
  void reserve(std::size_t n) {
    if (n <= capacity_) return;
    release();
    constexpr std::size_t page = std::size_t(2) << 20;
    const std::size_t bytes = (n * sizeof(T) + page - 1) / page * page;
    void* p = std::aligned_alloc(page, bytes);
    if (p == nullptr) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    (void)::madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
#endif
    data_ = static_cast<T*>(p);
    capacity_ = bytes / sizeof(T);
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  std::size_t capacity() const { return capacity_; }

 private:
  void release() {
    std::free(data_);
    data_ = nullptr;
    capacity_ = 0;
  }
  T* data_ = nullptr;
  std::size_t capacity_ = 0;
};

}  // namespace cpu::detail

HSAE_NAMESPACE_END
