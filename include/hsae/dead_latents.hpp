// SPDX-License-Identifier: Apache-2.0
/// \file dead_latents.hpp
/// Dead-latent tracking (Gao et al. 2024): a latent is dead when it has not fired, i.e.
/// held a positive value in any row's top-k, for `dead_after_tokens` tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "sparse_code.hpp"

HSAE_NAMESPACE_BEGIN

class dead_latent_tracker {
 public:
  dead_latent_tracker() = default;
  /// \throws hsae::config_error on d_sae < 1 or dead_after_tokens < 1.
  dead_latent_tracker(int d_sae, std::int64_t dead_after_tokens = 10'000'000)
      : since_(std::size_t(d_sae), 0), dead_after_(dead_after_tokens) {
    detail::expects<config_error>(d_sae >= 1, "dead_latent_tracker: d_sae must be >= 1, got ", d_sae);
    detail::expects<config_error>(dead_after_tokens >= 1,
                                  "dead_latent_tracker: dead_after_tokens must be >= 1, got ", dead_after_tokens);
  }

  /// Counts the batch's rows as seen tokens; latents with a positive value among the
  /// first `k` ranks of `code` (all ranks when k < 0) fired and restart their count.
  template <class T>
  void update(const sparse_code<T>& code, int k = -1) {
    const int kk = k < 0 ? code.k() : std::min(k, code.k());
    for (auto& s : since_) s += std::int64_t(code.rows());
    for (Eigen::Index b = 0; b < code.rows(); ++b)
      for (int t = 0; t < kk; ++t)
        if (code.values(b, t) > T(0)) {
          const index_t f = code.indices(b, t);
          detail::expects<shape_error>(f >= 0 && std::size_t(f) < since_.size(), "dead_latent_tracker: latent index ",
                                       f, " outside [0, ", since_.size(), ")");
          since_[std::size_t(f)] = 0;
        }
  }

  /// Counts `tokens` seen tokens; latent f fired (restarts its count) where
  /// `fired[f] != 0`, for f in [0, d_sae). A distributed step passes the firings of every
  /// replica's rows, summed, and the global batch's row count.
  void update_fired(std::int64_t tokens, const std::int32_t* fired) {
    for (std::size_t f = 0; f < since_.size(); ++f) since_[f] = fired[f] != 0 ? 0 : since_[f] + tokens;
  }

  bool is_dead(index_t f) const { return since_[std::size_t(f)] >= dead_after_; }
  /// Dead latents in ascending order.
  std::vector<index_t> dead_latents() const {
    std::vector<index_t> out;
    dead_latents(out);
    return out;
  }
  /// Dead latents in ascending order into `out` (no allocation once its capacity is d_sae).
  void dead_latents(std::vector<index_t>& out) const {
    out.clear();
    out.reserve(since_.size());
    for (std::size_t f = 0; f < since_.size(); ++f)
      if (since_[f] >= dead_after_) out.push_back(index_t(f));
  }
  std::int64_t num_dead() const {
    return std::count_if(since_.begin(), since_.end(), [&](std::int64_t s) { return s >= dead_after_; });
  }
  double dead_fraction() const { return since_.empty() ? 0.0 : double(num_dead()) / double(since_.size()); }
  std::int64_t dead_after_tokens() const { return dead_after_; }
  /// Tokens since each latent last fired (for checkpoints and reports).
  const std::vector<std::int64_t>& tokens_since_fired() const { return since_; }
  void set_tokens_since_fired(std::vector<std::int64_t> s) {
    detail::expects<shape_error>(s.size() == since_.size(), "dead_latent_tracker: ", s.size(),
                                 " counters given, expected d_sae=", since_.size());
    for (std::size_t f = 0; f < s.size(); ++f)
      detail::expects<config_error>(s[f] >= 0, "dead_latent_tracker: counter of latent ", f, " is negative (", s[f],
                                    ")");
    since_ = std::move(s);
  }

 private:
  std::vector<std::int64_t> since_;
  std::int64_t dead_after_ = 10'000'000;
};

HSAE_NAMESPACE_END
