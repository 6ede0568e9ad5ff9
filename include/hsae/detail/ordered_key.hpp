// SPDX-License-Identifier: Apache-2.0
/// \file detail/ordered_key.hpp
/// The order-preserving integer key of a floating-point value, shared by the CPU top-k
/// (cpu/topk.hpp) and the GPU top-k kernels (cuda/detail/topk.cuh): both backends rank
/// by the same key, so they agree on every tie, on -0.0 and on NaN (docs/TOPK.md).
#pragma once

#include <cstdint>
#include <cstring>

#include "../config.hpp"

HSAE_NAMESPACE_BEGIN

namespace detail {

/// Order-preserving unsigned key of a float: a > b  <=>  key(a) > key(b); -0.0 maps to
/// +0.0's key and every NaN to 0 (below -inf).
HSAE_HOST_DEVICE inline std::uint32_t ordered_key(float v) {
  if (v != v) return 0u;
  v += 0.0f;  // -0.0 -> +0.0
  std::uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
HSAE_HOST_DEVICE inline std::uint64_t ordered_key(double v) {
  if (v != v) return 0u;
  v += 0.0;
  std::uint64_t u;
  std::memcpy(&u, &v, sizeof u);
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

}  // namespace detail

HSAE_NAMESPACE_END
