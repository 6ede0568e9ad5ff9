// SPDX-License-Identifier: Apache-2.0
/// \file rng.hpp
/// A small, fully specified random generator (xoshiro256** seeded by splitmix64) and
/// the distributions hsae needs. Unlike `std::normal_distribution`, the streams are
/// identical on every standard library and platform, so seeded runs and checkpoints
/// reproduce bit for bit.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numbers>

#include "config.hpp"

HSAE_NAMESPACE_BEGIN

class rng {
 public:
  using result_type = std::uint64_t;
  explicit rng(std::uint64_t seed = 0x5eed) { reseed(seed); }

  void reseed(std::uint64_t seed) {
    std::uint64_t z = seed;
    for (auto& s : s_) s = splitmix64(z);
    has_spare_ = false;
  }
  static constexpr result_type min() { return 0; }
  static constexpr result_type max() { return std::numeric_limits<result_type>::max(); }

  result_type operator()() {
    const std::uint64_t result = rotl(s_[1] * 5, 7) * 9;
    const std::uint64_t t = s_[1] << 17;
    s_[2] ^= s_[0];
    s_[3] ^= s_[1];
    s_[1] ^= s_[2];
    s_[0] ^= s_[3];
    s_[2] ^= t;
    s_[3] = rotl(s_[3], 45);
    return result;
  }
  /// Uniform in [0, 1) with 53 random bits.
  double uniform() { return double((*this)() >> 11) * 0x1.0p-53; }
  /// Uniform integer in [0, n) (n > 0), by Lemire's multiply-shift (negligible bias for n << 2^64).
  std::uint64_t below(std::uint64_t n) {
    __extension__ using u128 = unsigned __int128;
    return std::uint64_t(u128((*this)()) * n >> 64);
  }
  /// Standard normal by the Box-Muller transform (pairs cached).
  double normal() {
    if (has_spare_) {
      has_spare_ = false;
      return spare_;
    }
    double u1 = uniform();
    while (u1 <= 0.0) u1 = uniform();
    const double u2 = uniform();
    const double r = std::sqrt(-2.0 * std::log(u1));
    spare_ = r * std::sin(2.0 * std::numbers::pi * u2);
    has_spare_ = true;
    return r * std::cos(2.0 * std::numbers::pi * u2);
  }

  /// The full state, for checkpoints.
  struct state_type {
    std::array<std::uint64_t, 4> s;
    bool has_spare;
    double spare;
  };
  state_type state() const { return {s_, has_spare_, spare_}; }
  void set_state(const state_type& st) {
    s_ = st.s;
    has_spare_ = st.has_spare;
    spare_ = st.spare;
  }

 private:
  static constexpr std::uint64_t rotl(std::uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }
  static constexpr std::uint64_t splitmix64(std::uint64_t& z) {
    std::uint64_t r = (z += 0x9e3779b97f4a7c15ull);
    r = (r ^ (r >> 30)) * 0xbf58476d1ce4e5b9ull;
    r = (r ^ (r >> 27)) * 0x94d049bb133111ebull;
    return r ^ (r >> 31);
  }
  std::array<std::uint64_t, 4> s_{};
  bool has_spare_ = false;
  double spare_ = 0;
};

HSAE_NAMESPACE_END
