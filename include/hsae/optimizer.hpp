// SPDX-License-Identifier: Apache-2.0
/// \file optimizer.hpp
/// Adam with the SAE decoder constraint (docs/OBJECTIVE.md): before the update each decoder
/// row's gradient loses its component along the row, after it each row is scaled back
/// to unit norm. Learning rate: linear warm-up, then optional linear decay; optional
/// global-norm gradient clipping.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "config.hpp"
#include "cpu/backend.hpp"
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

/// Removes from each decoder row's gradient its component along the row:
/// `g_f -= <g_f, e_f> e_f` (exact for unit rows; the row's norm is used otherwise).
template <cpu_scalar T, int F>
void project_decoder_gradient(const cpu_backend& be, const sae<T, F>& m, sae_gradients<T, F>& g) {
  cpu::detail::parallel_for(be, m.W_dec.rows(), [&](std::ptrdiff_t f) {
    const auto e = m.W_dec.row(f);
    const T n2 = e.squaredNorm();
    if (n2 > T(0)) g.W_dec.row(f) -= (g.W_dec.row(f).dot(e) / n2) * e;
  });
}

/// Global L2 norm of all gradients (summed per row, then in index order: deterministic).
template <cpu_scalar T, int F>
double gradient_norm(const cpu_backend& be, const sae_gradients<T, F>& g) {
  std::vector<double> rows(std::size_t(g.W_enc.rows()));
  cpu::detail::parallel_for(be, g.W_enc.rows(), [&](std::ptrdiff_t f) {
    rows[std::size_t(f)] = double(g.W_enc.row(f).squaredNorm()) + double(g.W_dec.row(f).squaredNorm());
  });
  double s = double(g.b_enc.squaredNorm()) + double(g.b_dec.squaredNorm());
  for (double r : rows) s += r;
  return std::sqrt(s);
}

/// Adam state for one `sae<T, F>`: first and second moments of every parameter.
template <cpu_scalar T, int F = dynamic>
class adam {
 public:
  adam() = default;
  /// \throws hsae::config_error if `opt` is invalid.
  adam(const sae<T, F>& m, adam_options opt) : opt_(opt) {
    opt_.validate();
    m_.zeros_like(m);
    v_.zeros_like(m);
  }

  /// One step: optional decoder-gradient projection, optional global-norm clipping,
  /// the Adam update of every parameter, then decoder row renormalisation; the W_enc
  /// and W_dec rows of a latent are updated in one pass. `g` is modified (projected,
  /// clipped). Returns the gradient norm before clipping (after projection).
  /// \throws hsae::shape_error if the gradients do not match the model,
  ///         hsae::numeric_error if the gradient norm is not finite.
  double step(const cpu_backend& be, sae<T, F>& m, sae_gradients<T, F>& g) {
    detail::expect_shape("W_enc gradient", g.W_enc.rows(), g.W_enc.cols(), m.W_enc.rows(), m.W_enc.cols());
    detail::expect_shape("W_dec gradient", g.W_dec.rows(), g.W_dec.cols(), m.W_dec.rows(), m.W_dec.cols());
    detail::expect_shape("Adam state", m_.W_enc.rows(), m_.W_enc.cols(), m.W_enc.rows(), m.W_enc.cols());
    detail::expects<shape_error>(g.b_enc.size() == m.b_enc.size() && g.b_dec.size() == m.b_dec.size(),
                                 "bias gradients do not match the model");
    if (opt_.project_decoder_gradient) project_decoder_gradient(be, m, g);
    const double norm = gradient_norm(be, g);
    detail::expects<numeric_error>(std::isfinite(norm), "adam: the gradient norm is not finite (", norm,
                                   "); the step was not applied");
    double clip = 1.0;
    if (opt_.max_grad_norm > 0 && norm > opt_.max_grad_norm) clip = opt_.max_grad_norm / norm;

    detail::expects<config_error>(t_ < std::numeric_limits<std::int64_t>::max(), "adam: step count ", t_,
                                  " cannot grow further");
    const double lr = opt_.lr_at(t_, m.d_sae());
    ++t_;
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t_));
    const double bc2 = 1.0 - std::pow(opt_.beta2, double(t_));
    const T b1 = T(opt_.beta1), b2 = T(opt_.beta2), eps = T(opt_.eps), gs = T(clip);
    // w -= lr * (m / bc1) / (sqrt(v / bc2) + eps)
    const T step_size = T(lr / bc1), inv_sqrt_bc2 = T(1.0 / std::sqrt(bc2));
    auto update = [&](auto w, auto gr, auto mm, auto vv) {
      mm = b1 * mm + (T(1) - b1) * gs * gr;
      vv = b2 * vv + (T(1) - b2) * (gs * gr).square();
      w -= step_size * mm / (vv.sqrt() * inv_sqrt_bc2 + eps);
    };
    cpu::detail::parallel_for(be, m.W_dec.rows(), [&](std::ptrdiff_t f) {
      update(m.W_enc.row(f).array(), g.W_enc.row(f).array(), m_.W_enc.row(f).array(), v_.W_enc.row(f).array());
      update(m.W_dec.row(f).array(), g.W_dec.row(f).array(), m_.W_dec.row(f).array(), v_.W_dec.row(f).array());
      if (opt_.normalize_decoder) {
        const T n = m.W_dec.row(f).norm();
        if (n > T(0)) m.W_dec.row(f) /= n;
      }
    });
    update(m.b_enc.array(), g.b_enc.array(), m_.b_enc.array(), v_.b_enc.array());
    update(m.b_dec.array(), g.b_dec.array(), m_.b_dec.array(), v_.b_dec.array());
    last_lr_ = lr;
    return norm;
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

 private:
  adam_options opt_{};
  sae_gradients<T, F> m_, v_;
  std::int64_t t_ = 0;
  double last_lr_ = 0;
};

HSAE_NAMESPACE_END
