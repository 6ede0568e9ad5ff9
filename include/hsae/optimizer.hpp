// SPDX-License-Identifier: Apache-2.0
/// \file optimizer.hpp
/// Adam's settings (`adam_options`: learning-rate schedule, betas, clipping, the decoder
/// constraint of docs/OBJECTIVE.md) and its state (`adam_state`), shared by every backend.
/// The update itself is backend code: cpu/optimizer.hpp, cuda/optimizer.cuh.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "matrix.hpp"
#include "model.hpp"

HSAE_NAMESPACE_BEGIN

struct adam_options {
  /// Peak learning rate; <= 0 selects the default 2e-4 / sqrt(d_sae / 2^14).
  double lr = 0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 6.25e-10;
  /// Steps of linear warm-up from lr/warmup_steps to lr (0: none).
  std::int64_t warmup_steps = 1000;
  /// Total steps of the run; with decay_steps > 0 the last decay_steps of them decay the
  /// learning rate linearly to final_lr_fraction * lr.
  std::int64_t total_steps = 0;
  std::int64_t decay_steps = 0;
  double final_lr_fraction = 0.0;
  /// Clip the global gradient norm to this value (<= 0: no clipping).
  double max_grad_norm = 0;
  /// The decoder constraint (both on by default).
  bool project_decoder_gradient = true;
  bool normalize_decoder = true;

  /// \throws hsae::config_error naming the first invalid field.
  void validate() const {
    detail::expects<config_error>(std::isfinite(lr), "adam: lr must be finite, got ", lr);
    detail::expects<config_error>(beta1 >= 0 && beta1 < 1, "adam: beta1 must be in [0, 1), got ", beta1);
    detail::expects<config_error>(beta2 >= 0 && beta2 < 1, "adam: beta2 must be in [0, 1), got ", beta2);
    detail::expects<config_error>(eps > 0, "adam: eps must be > 0, got ", eps);
    detail::expects<config_error>(warmup_steps >= 0, "adam: warmup_steps must be >= 0, got ", warmup_steps);
    detail::expects<config_error>(decay_steps >= 0 && (decay_steps == 0 || decay_steps <= total_steps),
                                  "adam: decay_steps=", decay_steps, " must be in [0, total_steps=", total_steps, "]");
    detail::expects<config_error>(final_lr_fraction >= 0 && final_lr_fraction <= 1,
                                  "adam: final_lr_fraction must be in [0, 1], got ", final_lr_fraction);
  }
  double peak_lr(int d_sae) const { return lr > 0 ? lr : 2e-4 / std::sqrt(double(d_sae) / 16384.0); }
  /// Learning rate of step `step` (0-based).
  double lr_at(std::int64_t step, int d_sae) const {
    double f = 1.0;
    if (warmup_steps > 0 && step < warmup_steps) f = double(step + 1) / double(warmup_steps);
    if (decay_steps > 0) {
      const std::int64_t start = total_steps - decay_steps;
      if (step >= start) {
        const double p = std::min(1.0, double(step - start + 1) / double(decay_steps));
        f *= 1.0 - p * (1.0 - final_lr_fraction);
      }
    }
    return peak_lr(d_sae) * f;
  }
};

/// The state of Adam for one `sae<T, F>`: options, step count, first and second moments
/// and the last learning rate. Backend-neutral: checkpoints write and read it, the CPU
/// optimizer (`adam`, cpu/optimizer.hpp) steps it, and the CUDA engine hands the trainer
/// a host copy of its device state in this form.
template <cpu_scalar T, int F = dynamic>
class adam_state {
 public:
  adam_state() = default;
  /// Zero moments shaped like `m`. \throws hsae::config_error if `opt` is invalid.
  adam_state(const sae<T, F>& m, adam_options opt) : opt_(opt) {
    opt_.validate();
    m_.zeros_like(m);
    v_.zeros_like(m);
  }

  std::int64_t steps() const { return t_; }
  double last_lr() const { return last_lr_; }
  const adam_options& options() const { return opt_; }
  /// Moments, for checkpoints.
  const sae_gradients<T, F>& first_moment() const { return m_; }
  const sae_gradients<T, F>& second_moment() const { return v_; }
  /// Restores the step count, the moments (shaped like the model's parameters, finite,
  /// second moments >= 0) and the last learning rate.
  /// \throws hsae::config_error / shape_error / numeric_error naming what is wrong.
  void set_state(std::int64_t steps, sae_gradients<T, F> m1, sae_gradients<T, F> m2, double last_lr = 0) {
    detail::expects<config_error>(steps >= 0 && steps < std::numeric_limits<std::int64_t>::max(),
                                  "adam state: step count ", steps, " is out of range");
    detail::expects<config_error>(std::isfinite(last_lr) && last_lr >= 0, "adam state: last learning rate ",
                                  last_lr, " must be finite and >= 0");
    for (const sae_gradients<T, F>* g : {&m1, &m2}) {
      const char* which = g == &m1 ? "first" : "second";
      detail::expects<shape_error>(g->W_enc.rows() == m_.W_enc.rows() && g->W_enc.cols() == m_.W_enc.cols() &&
                                       g->W_dec.rows() == m_.W_dec.rows() && g->W_dec.cols() == m_.W_dec.cols() &&
                                       g->b_enc.size() == m_.b_enc.size() && g->b_dec.size() == m_.b_dec.size(),
                                   "adam state: ", which, " moments do not match the model's shapes");
      detail::expects<numeric_error>(detail::all_finite(g->W_enc) && detail::all_finite(g->W_dec) &&
                                         detail::all_finite(g->b_enc) && detail::all_finite(g->b_dec),
                                     "adam state: ", which, " moments hold NaN or Inf");
    }
    detail::expects<numeric_error>((m2.W_enc.array() >= T(0)).all() && (m2.W_dec.array() >= T(0)).all() &&
                                       (m2.b_enc.array() >= T(0)).all() && (m2.b_dec.array() >= T(0)).all(),
                                   "adam state: second moments hold a negative value");
    t_ = steps;
    m_ = std::move(m1);
    v_ = std::move(m2);
    last_lr_ = last_lr;
  }

 protected:
  adam_options opt_{};
  sae_gradients<T, F> m_, v_;
  std::int64_t t_ = 0;
  double last_lr_ = 0;
};

HSAE_NAMESPACE_END
