// SPDX-License-Identifier: Apache-2.0
/// \file config.hpp
/// Version, namespace and portability macros shared by every hsae header.
#pragma once

#include <cstdint>

#define HSAE_VERSION_MAJOR 0
#define HSAE_VERSION_MINOR 1
#define HSAE_VERSION_PATCH 0

/// Inline ABI namespace: a future incompatible layout bumps it, so two versions
/// linked into one program never share a mangled name.
#define HSAE_NAMESPACE_BEGIN \
  namespace hsae {           \
  inline namespace v0 {
#define HSAE_NAMESPACE_END \
  }                        \
  }

/// Functions that device code may call (k-schedule accessors, key transforms).
/// Under a host compiler this expands to nothing.
#if defined(__CUDACC__)
#define HSAE_HOST_DEVICE __host__ __device__
#else
#define HSAE_HOST_DEVICE
#endif

/// `#pragma omp simd` loops (with a sum reduction) where OpenMP is on; plain loops,
/// still auto-vectorised where the compiler may, otherwise. The reduction order is
/// fixed by the compiled vector width, never by the thread count.
#define HSAE_PRAGMA(x) _Pragma(#x)
#if defined(_OPENMP)
#define HSAE_SIMD HSAE_PRAGMA(omp simd)
#define HSAE_SIMD_SUM(var) HSAE_PRAGMA(omp simd reduction(+ : var))
#else
#define HSAE_SIMD
#define HSAE_SIMD_SUM(var)
#endif

HSAE_NAMESPACE_BEGIN

/// Index type for latents and rows inside kernels. 32 bits: d_sae and batch sizes
/// beyond 2^31 - 1 are rejected by the public entry points.
using index_t = std::int32_t;

/// Marks a dictionary width known only at run time (Eigen's `Dynamic` idea).
inline constexpr int dynamic = -1;

HSAE_NAMESPACE_END
