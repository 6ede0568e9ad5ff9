// SPDX-License-Identifier: Apache-2.0
/// \file cpu/latent_pairs.hpp
/// The B*k selected (row, rank) pairs of a sparse code grouped by latent (CSR by
/// latent, pairs in row-major order inside each group). Every sparse gradient is then
/// a loop over latents in which one thread owns each output row: no atomics, no
/// locks, and a summation order that does not depend on the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "../config.hpp"
#include "../matrix.hpp"

HSAE_NAMESPACE_BEGIN

namespace cpu {

struct latent_pairs {
  /// offsets[f] .. offsets[f+1] index `pairs` for latent f; size d_sae + 1.
  std::vector<std::int64_t> offsets;
  /// Flat pair ids `b * k + t`, grouped by latent, ascending within a group.
  std::vector<std::int64_t> pairs;

  /// Groups the pairs of `indices [B, k]` (entries in [0, d_sae)) by latent:
  /// a counting sort, O(B*k + d_sae).
  void build(const index_matrix& indices, int d_sae) {
    offsets.assign(std::size_t(d_sae) + 1, 0);
    const std::int64_t n = std::int64_t(indices.size());
    const index_t* idx = indices.data();
    for (std::int64_t p = 0; p < n; ++p) ++offsets[std::size_t(idx[p]) + 1];
    for (std::size_t f = 0; f < std::size_t(d_sae); ++f) offsets[f + 1] += offsets[f];
    pairs.resize(std::size_t(n));
    cursor_.assign(offsets.begin(), offsets.end() - 1);
    for (std::int64_t p = 0; p < n; ++p) pairs[std::size_t(cursor_[std::size_t(idx[p])]++)] = p;
  }
  std::int64_t begin(index_t f) const { return offsets[std::size_t(f)]; }
  std::int64_t end(index_t f) const { return offsets[std::size_t(f) + 1]; }

 private:
  std::vector<std::int64_t> cursor_;
};

}  // namespace cpu

HSAE_NAMESPACE_END
