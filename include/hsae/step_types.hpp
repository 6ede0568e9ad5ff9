// SPDX-License-Identifier: Apache-2.0
/// \file step_types.hpp
/// What a training step takes and reports, the same on every backend: the loss's
/// per-level statistics (`loss_stats`), the AuxK settings (`auxk_options`), and a step's
/// options and result (`step_options`, `step_stats`). The CPU step (cpu/train_step.hpp)
/// and the CUDA step (cuda/train_step.cuh) both use these, so neither backend includes
/// the other.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "config.hpp"
#include "error.hpp"

HSAE_NAMESPACE_BEGIN

/// What one evaluation of the schedule loss measured.
struct loss_stats {
  /// The loss L = 1/(B*D*W) sum_b sum_l w_l ||x_b - xhat_{b,k_l}||^2.
  double loss = 0;
  /// Per schedule level l: k_l and sum_b ||x_b - xhat_{b,k_l}||^2.
  std::vector<int> level_k;
  std::vector<double> level_sse;
  std::int64_t rows = 0;
  int d_model = 0;
  /// Mean squared error per element at level l (MSE@k_l).
  double mse(std::size_t l) const { return level_sse[l] / (double(rows) * double(d_model)); }
};

/// The auxiliary loss that revives dead latents (docs/OBJECTIVE.md): its settings.
struct auxk_options {
  /// Dead latents each row may use; <= 0 means the default min(512, d_model / 2).
  int k_aux = 0;
  /// Weight of the AuxK loss in the total.
  double alpha = 1.0 / 32.0;

  int resolved_k_aux(int d_model) const { return k_aux > 0 ? k_aux : std::max(1, std::min(512, d_model / 2)); }

  /// Checks the settings up front (AuxK itself first runs when a latent dies, maybe
  /// hours into a run): alpha must be finite and >= 0; every k_aux is valid.
  /// \throws hsae::config_error naming the field and its value.
  void validate() const {
    detail::expects<config_error>(std::isfinite(alpha) && alpha >= 0,
                                  "auxk_options.alpha must be finite and >= 0, got ", alpha);
  }
};

/// How one training step runs.
struct step_options {
  auxk_options auxk{};
  /// Apply AuxK (when any latent is dead).
  bool use_auxk = true;
  /// Reject a batch holding NaN/Inf (one O(B*D) scan).
  bool check_finite = true;

  /// Checks every setting: those of `auxk` (auxk_options::validate), whether or not
  /// use_auxk is set. A few comparisons; train_step calls it first.
  /// \throws hsae::config_error naming the field and its value.
  void validate() const { auxk.validate(); }
};

/// What one training step reports.
struct step_stats {
  double loss = 0;      ///< schedule loss
  double aux_loss = 0;  ///< AuxK loss (scaled; 0 when nothing is dead)
  double grad_norm = 0;
  double lr = 0;
  std::int64_t dead = 0;  ///< dead latents before this step's update
  loss_stats levels;      ///< per-level squared errors of this batch
};

HSAE_NAMESPACE_END
