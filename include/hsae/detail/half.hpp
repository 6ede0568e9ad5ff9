// SPDX-License-Identifier: Apache-2.0
/// \file detail/half.hpp
/// Hand-written IEEE binary16 and bfloat16 <-> binary32/64 conversions, correctly rounded
/// (nearest, ties to even), exact for every pattern on the way up: the codecs of the .npy
/// and safetensors readers and writers (public as hsae::half_to_float, ...), and the one
/// loop both readers decode stored floats with (detail::decode_floats).
#pragma once

#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../config.hpp"

HSAE_NAMESPACE_BEGIN

// --- IEEE 754 binary16 ---------------------------------------------------------------

/// binary16 bits -> float, exact for every pattern: subnormals are normalised, +-0,
/// +-Inf kept, NaNs stay NaN with their payload in the top mantissa bits.
constexpr float half_to_float(std::uint16_t h) noexcept {
  const std::uint32_t sign = std::uint32_t(h & 0x8000u) << 16;
  const std::uint32_t exp = (h >> 10) & 0x1fu;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);  // Inf or NaN (payload preserved)
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;  // +-0
    } else {
      // Subnormal: value = mant * 2^-24. Shift the leading one up to bit 10.
      std::uint32_t e = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --e;
      }
      bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  }
  return std::bit_cast<float>(bits);
}

/// float -> binary16 bits, rounding to nearest, ties to even. Overflow (|x| >= 65520)
/// gives +-Inf, underflow gives subnormals or +-0; NaNs stay NaN (top payload bits kept,
/// a quiet bit set if they would vanish).
constexpr std::uint16_t float_to_half(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  const auto sign = std::uint16_t((x >> 16) & 0x8000u);
  const std::uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) {  // Inf or NaN
    if (ax == 0x7f800000u) return std::uint16_t(sign | 0x7c00u);
    std::uint32_t payload = (ax >> 13) & 0x3ffu;
    if (payload == 0) payload = 0x200u;
    return std::uint16_t(sign | 0x7c00u | payload);
  }
  if (ax >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // >= 65520: rounds to Inf
  if (ax < 0x38800000u) {                                      // below 2^-14: subnormal or zero
    if (ax <= 0x33000000u) return sign;                        // <= 2^-25 (the tie goes to even 0)
    const std::uint32_t e = ax >> 23;                          // in [102, 112]
    const std::uint32_t m = (ax & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - e;  // value / 2^-24 = m >> shift, shift in [14, 24]
    std::uint32_t r = m >> shift;
    const std::uint32_t rem = m & ((1u << shift) - 1);
    const std::uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;  // may carry into the smallest normal: fine
    return std::uint16_t(sign | r);
  }
  std::uint32_t r = (ax >> 13) - ((127u - 15u) << 10);  // rebias the exponent
  const std::uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) ++r;  // carries into the exponent correctly
  return std::uint16_t(sign | r);
}

/// double -> binary16 bits, correctly rounded (nearest, ties to even) with no double
/// rounding: the double is first rounded to float *to odd*, which float_to_half then
/// rounds exactly as a direct conversion would.
inline std::uint16_t double_to_half(double d) noexcept {
  if (std::isnan(d)) {
    const std::uint64_t b = std::bit_cast<std::uint64_t>(d);
    std::uint32_t payload = std::uint32_t((b >> 42) & 0x3ffu);
    if (payload == 0) payload = 0x200u;
    return std::uint16_t(((b >> 48) & 0x8000u) | 0x7c00u | payload);
  }
  float f = static_cast<float>(d);
  if (std::isfinite(f) && static_cast<double>(f) != d) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    f = std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
  }
  return float_to_half(f);
}

// --- bfloat16 (the top half of an IEEE binary32) ----------------------------------------

/// bfloat16 bits -> float: exact for every pattern (NaN payloads included).
constexpr float bfloat16_to_float(std::uint16_t h) noexcept {
  return std::bit_cast<float>(std::uint32_t(h) << 16);
}

/// float -> bfloat16 bits, rounding to nearest, ties to even; overflow gives +-Inf;
/// a NaN becomes a quiet NaN keeping its sign and top payload bits.
constexpr std::uint16_t float_to_bfloat16(float f) noexcept {
  const std::uint32_t x = std::bit_cast<std::uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((x >> 16) | 0x0040u);  // NaN
  const std::uint32_t lsb = (x >> 16) & 1u;
  return std::uint16_t((x + 0x7fffu + lsb) >> 16);  // may carry into the exponent / to Inf: correct
}

/// double -> bfloat16 bits, correctly rounded (nearest, ties to even) without double
/// rounding: round to float *to odd* first, as double_to_half does.
inline std::uint16_t double_to_bfloat16(double d) noexcept {
  if (std::isnan(d)) {
    const std::uint64_t b = std::bit_cast<std::uint64_t>(d);
    return std::uint16_t(((b >> 48) & 0x8000u) | 0x7fc0u | ((b >> 45) & 0x3fu));
  }
  float f = static_cast<float>(d);
  if (std::isfinite(f) && static_cast<double>(f) != d) {
    if (std::fabs(static_cast<double>(f)) > std::fabs(d)) f = std::nextafter(f, 0.0f);
    f = std::bit_cast<float>(std::bit_cast<std::uint32_t>(f) | 1u);
  }
  return float_to_bfloat16(f);
}

namespace detail {

/// The little-endian float encodings the file readers decode.
enum class float_encoding { f16, bf16, f32, f64 };

/// out[i] = T(to_value(the i-th `Stored` at `src`)), for unaligned `src`.
template <class Stored, class T, class ToValue>
void decode_each(const unsigned char* src, std::size_t n, T* out, ToValue to_value) {
  for (std::size_t i = 0; i < n; ++i) {
    Stored v;
    std::memcpy(&v, src + sizeof(Stored) * i, sizeof(Stored));
    out[i] = T(to_value(v));
  }
}

/// Converts `n` elements encoded as `e` at `src` (unaligned little-endian bytes) to T. With
/// n = 0 nothing is touched: `out` (and `src`) may then be null, as an empty Eigen matrix's
/// data() is (memcpy with a null pointer is undefined even for 0 bytes).
template <class T>
void decode_floats(float_encoding e, const void* src_bytes, std::size_t n, T* out) {
  if (n == 0) return;
  const auto* src = static_cast<const unsigned char*>(src_bytes);
  const auto same = [](auto v) { return v; };
  switch (e) {
    case float_encoding::f32:
      if constexpr (std::is_same_v<T, float>) std::memcpy(out, src, n * sizeof(float));
      else decode_each<float>(src, n, out, same);
      break;
    case float_encoding::f64:
      if constexpr (std::is_same_v<T, double>) std::memcpy(out, src, n * sizeof(double));
      else decode_each<double>(src, n, out, same);
      break;
    case float_encoding::f16:
      decode_each<std::uint16_t>(src, n, out, [](std::uint16_t h) { return half_to_float(h); });
      break;
    case float_encoding::bf16:
      decode_each<std::uint16_t>(src, n, out, [](std::uint16_t h) { return bfloat16_to_float(h); });
      break;
  }
}

}  // namespace detail

HSAE_NAMESPACE_END
