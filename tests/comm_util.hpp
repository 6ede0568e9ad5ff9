// SPDX-License-Identifier: Apache-2.0
// Helpers of the communicator tests (test_comm.cpp, mpi/): rows that stress the top-k order
// and a shard's local top-k as latent sharding computes it.
#pragma once

#include <hsae/comm/sharded_topk.hpp>
#include <hsae/cpu/topk.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <random>

namespace hsae_test {

/// [rows, cols] drawn from a small set of values, so that rows have many ties, with
/// -0.0, +-inf and NaN among them; every 5th row is all zeros and every 7th all NaN.
template <class T>
hsae::row_matrix<T> tie_rows(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  constexpr T inf = std::numeric_limits<T>::infinity();
  const T pool[] = {T(-1), T(0), T(-0.0), T(0.5), T(1), T(2), T(2), T(3), inf, -inf,
                    std::numeric_limits<T>::quiet_NaN(), T(0.25)};
  std::mt19937_64 g(seed);
  std::uniform_int_distribution<int> pick(0, int(std::size(pool)) - 1);
  std::uniform_real_distribution<T> u(T(-2), T(2));
  hsae::row_matrix<T> x(rows, cols);
  for (Eigen::Index r = 0; r < rows; ++r)
    for (Eigen::Index c = 0; c < cols; ++c) {
      if (r % 5 == 4) x(r, c) = T(0);
      else if (r % 7 == 6) x(r, c) = std::numeric_limits<T>::quiet_NaN();
      else x(r, c) = (r % 3 == 2) ? u(g) : pool[pick(g)];
    }
  return x;
}

/// The local top-k of shard s of S over the whole rows `pre` [B, d_sae]: `topk` on the
/// slice's columns, min(k, width) entries, indices offset to global latents.
template <class T>
hsae::sparse_code<T> local_topk(const hsae::cpu_backend& be, const hsae::row_matrix<T>& pre, int shards, int s,
                                int k) {
  const auto slice = hsae::latent_slice(hsae::index_t(pre.cols()), shards, s);
  const int kc = std::min<int>(k, int(slice.count));
  hsae::sparse_code<T> out;
  if (kc == 0) {
    out.resize(pre.rows(), 0);
    return out;
  }
  const hsae::row_matrix<T> part = pre.middleCols(slice.first, slice.count);
  hsae::topk<T>(be, part, kc, out);
  out.indices.array() += slice.first;
  return out;
}

}  // namespace hsae_test
