// SPDX-License-Identifier: Apache-2.0
/// \file metrics.hpp
/// The evaluation metrics of docs/OBJECTIVE.md, defined once:
///
///   FVU@k = sum ||x - xhat_k||^2 / sum ||x - mean(x)||^2   over the evaluation set,
///   explained variance = 1 - FVU@k,   MSE@k = sum ||x - xhat_k||^2 / (N * D),
///   L0@k  = mean number of nonzero activations among the first k ranks,
///
/// for every level of a k-schedule from one encode at k_max and one streaming pass
/// (`hierarchical_loss` gives every level's squared error at once). `metrics_accumulator`
/// sums over batches in double. Each backend's `evaluate` (cpu/evaluate.hpp; the CUDA
/// engine's in cuda/trainer.cuh) feeds it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "error.hpp"
#include "k_schedule.hpp"
#include "matrix.hpp"
#include "sparse_code.hpp"
#include "step_types.hpp"

HSAE_NAMESPACE_BEGIN

/// The metrics of one schedule level.
struct level_metrics {
  int k = 0;
  double mse = 0;  ///< MSE@k, per element
  double fvu = 0;  ///< FVU@k
  double l0 = 0;   ///< L0@k: mean nonzero activations among the first k ranks
  double explained_variance() const { return 1.0 - fvu; }
};

/// Metrics of a model on an evaluation set.
struct evaluation {
  std::int64_t rows = 0;
  int d_model = 0;
  /// sum ||x - mean(x)||^2 over the set (FVU's denominator).
  double total_variance = 0;
  /// One entry per schedule level, in schedule order.
  std::vector<level_metrics> levels;
  /// Dead latents / d_sae at evaluation time (NaN when no tracker was given).
  double dead_fraction = std::numeric_limits<double>::quiet_NaN();

  /// The level with this k. \throws hsae::config_error when k is not a level.
  const level_metrics& at(int k) const {
    for (const auto& l : levels)
      if (l.k == k) return l;
    detail::throw_error<config_error>("evaluation: k=", k, " is not a level of the evaluated schedule");
  }
  const level_metrics& last() const { return levels.back(); }

  /// These metrics of inputs that were multiplied by `input_scale` before evaluation
  /// (trainer_options::normalize_inputs, train_summary::input_scale), in the units of the
  /// inputs as given: MSE and total variance divided by input_scale^2; FVU and L0 have no
  /// units. \throws hsae::config_error unless input_scale is positive and finite.
  evaluation in_input_units(double input_scale) const {
    detail::expects<config_error>(std::isfinite(input_scale) && input_scale > 0,
                                  "evaluation: input_scale must be positive and finite, got ", input_scale);
    evaluation e = *this;
    const double s2 = input_scale * input_scale;
    e.total_variance /= s2;
    for (auto& l : e.levels) l.mse /= s2;
    return e;
  }
};

/// Sums the metrics of batches (in double, in batch order: deterministic).
class metrics_accumulator {
 public:
  /// `x` [B, D] and its code; `stats` from `hierarchical_loss` on them under the
  /// schedule whose levels are reported.
  template <cpu_scalar T>
  void add(cref<T> x, const sparse_code<T>& code, const loss_stats& stats) {
    detail::expects<shape_error>(code.rows() == x.rows() && stats.rows == x.rows(),
                                 "metrics: the code, the loss stats and the batch disagree on the row count");
    if (rows_ == 0) {
      d_ = int(x.cols());
      k_ = stats.level_k;
      sse_.assign(k_.size(), 0.0);
      nnz_.assign(k_.size(), 0);
      sum_.setZero(d_);
    }
    detail::expects<shape_error>(x.cols() == d_ && stats.level_k == k_,
                                 "metrics: a batch of another width or schedule was added");
    for (std::size_t l = 0; l < k_.size(); ++l) sse_[l] += stats.level_sse[l];
    for (Eigen::Index b = 0; b < x.rows(); ++b) {
      int count = 0;
      std::size_t l = 0;
      for (int t = 0; t < code.k() && l < k_.size(); ++t) {
        count += code.values(b, t) != T(0);
        while (l < k_.size() && k_[l] == t + 1) nnz_[l++] += count;
      }
    }
    sum_ += x.template cast<double>().colwise().sum().transpose();
    sq_ += x.template cast<double>().squaredNorm();
    rows_ += x.rows();
  }

  std::int64_t rows() const { return rows_; }

  evaluation result() const {
    detail::expects<shape_error>(rows_ > 0, "metrics: nothing was added");
    evaluation e;
    e.rows = rows_;
    e.d_model = d_;
    // sum ||x - mean||^2 = sum ||x||^2 - N ||mean||^2 (double; the mean is small next
    // to the spread for activations, and the result is clamped at 0).
    e.total_variance = std::max(0.0, sq_ - sum_.squaredNorm() / double(rows_));
    for (std::size_t l = 0; l < k_.size(); ++l) {
      level_metrics m;
      m.k = k_[l];
      m.mse = sse_[l] / (double(rows_) * double(d_));
      m.fvu = e.total_variance > 0 ? sse_[l] / e.total_variance : std::numeric_limits<double>::quiet_NaN();
      m.l0 = double(nnz_[l]) / double(rows_);
      e.levels.push_back(m);
    }
    return e;
  }

 private:
  std::int64_t rows_ = 0;
  int d_ = 0;
  std::vector<int> k_;
  std::vector<double> sse_;
  std::vector<std::int64_t> nnz_;
  Eigen::VectorXd sum_;
  double sq_ = 0;
};

HSAE_NAMESPACE_END
